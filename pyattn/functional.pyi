__all__ = ["merge_attention", "scaled_dot_product_attention"]

from typing import Literal, Sequence, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .quantized import QuantizedKV

_Alignment = Literal["top_left", "lower_right"]
_Window = int | tuple[int | None, int | None] | None

@overload
def scaled_dot_product_attention(
    query: ArrayLike, key: ArrayLike | QuantizedKV, value: ArrayLike | QuantizedKV,
    attn_mask: ArrayLike | None = ...,
    is_causal: bool = ..., scale: float | None = ..., enable_gqa: bool = ..., *,
    out: NDArray[np.generic] | None = ..., num_threads: int | None = ...,
    alignment: _Alignment = ..., window: _Window = ..., alibi_slopes: ArrayLike | None = ...,
    softcap: float | None = ..., sinks: ArrayLike | None = ..., q_lengths: ArrayLike | None = ...,
    kv_lengths: ArrayLike | None = ..., return_lse: Literal[False] = ...,
    precision: Literal['exact', 'bf16'] | None = ...,
) -> NDArray[np.generic]: ...
@overload
def scaled_dot_product_attention(
    query: ArrayLike, key: ArrayLike | QuantizedKV, value: ArrayLike | QuantizedKV,
    attn_mask: ArrayLike | None = ...,
    is_causal: bool = ..., scale: float | None = ..., enable_gqa: bool = ..., *,
    out: NDArray[np.generic] | None = ..., num_threads: int | None = ...,
    alignment: _Alignment = ..., window: _Window = ..., alibi_slopes: ArrayLike | None = ...,
    softcap: float | None = ..., sinks: ArrayLike | None = ..., q_lengths: ArrayLike | None = ...,
    kv_lengths: ArrayLike | None = ..., return_lse: Literal[True],
    precision: Literal['exact', 'bf16'] | None = ...,
) -> tuple[NDArray[np.generic], NDArray[np.floating]]: ...
def merge_attention(
    outputs: Sequence[ArrayLike] | ArrayLike, lses: Sequence[ArrayLike] | ArrayLike, *,
    out: NDArray[np.generic] | None = ...,
) -> tuple[NDArray[np.generic], NDArray[np.floating]]: ...
