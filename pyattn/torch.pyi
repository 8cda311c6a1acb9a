__all__ = ["scaled_dot_product_attention"]

from typing import Literal, overload

import torch
from numpy.typing import ArrayLike

from .functional import _Alignment, _Window

_TensorOrArray = torch.Tensor | ArrayLike

@overload
def scaled_dot_product_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attn_mask: _TensorOrArray | None = ..., dropout_p: float = ..., is_causal: bool = ...,
    scale: float | None = ..., enable_gqa: bool = ..., *, out: torch.Tensor | None = ...,
    num_threads: int | None = ..., alignment: _Alignment = ..., window: _Window = ...,
    alibi_slopes: _TensorOrArray | None = ..., softcap: float | None = ...,
    sinks: _TensorOrArray | None = ..., q_lengths: _TensorOrArray | None = ...,
    kv_lengths: _TensorOrArray | None = ..., return_lse: Literal[False] = ...,
    precision: Literal['exact', 'bf16'] | None = ...,
) -> torch.Tensor: ...
@overload
def scaled_dot_product_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attn_mask: _TensorOrArray | None = ..., dropout_p: float = ..., is_causal: bool = ...,
    scale: float | None = ..., enable_gqa: bool = ..., *, out: torch.Tensor | None = ...,
    num_threads: int | None = ..., alignment: _Alignment = ..., window: _Window = ...,
    alibi_slopes: _TensorOrArray | None = ..., softcap: float | None = ...,
    sinks: _TensorOrArray | None = ..., q_lengths: _TensorOrArray | None = ...,
    kv_lengths: _TensorOrArray | None = ..., return_lse: Literal[True],
    precision: Literal['exact', 'bf16'] | None = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...
