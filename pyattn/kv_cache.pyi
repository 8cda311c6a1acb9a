__all__ = ["KVCache", "decode_attention"]

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from .quantized import QuantizedKV

INITIAL_CAPACITY: int


class KVCache:
    batch: int
    num_kv_heads: int
    head_dim: int
    value_dim: int
    max_len: int | None
    dtype: np.dtype[Any]
    group_size: int | None
    lengths: NDArray[np.int64]
    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, max_len: int | None = ...,
                 dtype: DTypeLike = ..., value_dim: int | None = ...,
                 group_size: int | None = ...) -> None: ...
    @property
    def capacity(self) -> int: ...
    @property
    def quantized(self) -> bool: ...
    @property
    def nbytes(self) -> int: ...
    def dequantize(self) -> tuple[NDArray[np.float32], NDArray[np.float32]]: ...
    @property
    def keys(self) -> NDArray[Any] | QuantizedKV: ...
    @property
    def values(self) -> NDArray[Any] | QuantizedKV: ...
    def append(
        self, k_new: ArrayLike, v_new: ArrayLike, lengths: ArrayLike | None = ...
    ) -> None: ...
    def __copy__(self) -> KVCache: ...
    def reset(self) -> None: ...
    def truncate(self, n: int | ArrayLike) -> None: ...

def decode_attention(query: ArrayLike, cache: KVCache, *, q_lengths: ArrayLike | None = ...,
                     scale: float | None = ..., num_threads: int | None = ...,
                     **modifiers: Any) -> Any: ...
