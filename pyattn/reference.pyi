__all__ = ["scaled_dot_product_attention", "softmax"]

from typing import Literal, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray

_Alignment = Literal["top_left", "lower_right"]
_Window = int | tuple[int | None, int | None] | None

@overload
def scaled_dot_product_attention(
    query: ArrayLike, key: ArrayLike, value: ArrayLike, attn_mask: ArrayLike | None = ...,
    is_causal: bool = ..., scale: float | None = ..., enable_gqa: bool = ..., *,
    out: NDArray[np.generic] | None = ..., num_threads: int | None = ...,
    alignment: _Alignment = ..., window: _Window = ..., alibi_slopes: ArrayLike | None = ...,
    softcap: float | None = ..., sinks: ArrayLike | None = ..., q_lengths: ArrayLike | None = ...,
    kv_lengths: ArrayLike | None = ..., return_lse: Literal[False] = ...,
) -> NDArray[np.generic]: ...
@overload
def scaled_dot_product_attention(
    query: ArrayLike, key: ArrayLike, value: ArrayLike, attn_mask: ArrayLike | None = ...,
    is_causal: bool = ..., scale: float | None = ..., enable_gqa: bool = ..., *,
    out: NDArray[np.generic] | None = ..., num_threads: int | None = ...,
    alignment: _Alignment = ..., window: _Window = ..., alibi_slopes: ArrayLike | None = ...,
    softcap: float | None = ..., sinks: ArrayLike | None = ..., q_lengths: ArrayLike | None = ...,
    kv_lengths: ArrayLike | None = ..., return_lse: Literal[True],
) -> tuple[NDArray[np.generic], NDArray[np.floating]]: ...
def softmax(
    scores: ArrayLike, axis: int = ..., sink: ArrayLike | None = ...
) -> NDArray[np.floating]: ...
