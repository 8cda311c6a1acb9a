__all__ = ["MultiHeadAttention", "SelfAttention"]

from typing import Any, Literal, Mapping

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

_Rng = np.random.Generator | int | None

class SelfAttention:
    embed_dim: int
    kdim: int
    vdim: int
    dtype: np.dtype[Any]
    precision: str | None
    w_q: NDArray[np.floating]
    w_k: NDArray[np.floating]
    w_v: NDArray[np.floating]
    b_q: NDArray[np.floating] | None
    b_k: NDArray[np.floating] | None
    b_v: NDArray[np.floating] | None
    def __init__(self, embed_dim: int, kdim: int | None = ..., vdim: int | None = ...,
                 bias: bool = ..., dtype: DTypeLike = ..., rng: _Rng = ...,
                 precision: Literal['exact', 'bf16'] | None = ...) -> None: ...
    def __call__(self, x: ArrayLike, attn_mask: ArrayLike | None = ..., is_causal: bool = ...,
                 return_weights: bool = ..., *, num_threads: int | None = ...) -> Any: ...

class MultiHeadAttention:
    embed_dim: int
    num_heads: int
    head_dim: int
    kdim: int
    vdim: int
    batch_first: bool
    dtype: np.dtype[Any]
    precision: str | None
    in_proj_weight: NDArray[np.floating] | None
    q_proj_weight: NDArray[np.floating] | None
    k_proj_weight: NDArray[np.floating] | None
    v_proj_weight: NDArray[np.floating] | None
    in_proj_bias: NDArray[np.floating] | None
    out_proj_weight: NDArray[np.floating]
    out_proj_bias: NDArray[np.floating] | None
    def __init__(self, embed_dim: int, num_heads: int, bias: bool = ..., kdim: int | None = ...,
                 vdim: int | None = ..., batch_first: bool = ..., dtype: DTypeLike = ...,
                 rng: _Rng = ..., precision: Literal['exact', 'bf16'] | None = ...) -> None: ...
    def state_dict(self) -> dict[str, NDArray[np.floating]]: ...
    def load_state_dict(self, state_dict: Mapping[str, ArrayLike], strict: bool = ...) -> None: ...
    def __call__(self, query: ArrayLike, key: ArrayLike, value: ArrayLike,
                 key_padding_mask: ArrayLike | None = ..., need_weights: bool = ...,
                 attn_mask: ArrayLike | None = ..., average_attn_weights: bool = ...,
                 is_causal: bool = ..., *, num_threads: int | None = ...
                 ) -> tuple[NDArray[np.floating], NDArray[np.floating] | None]: ...
