__all__ = ["NAME", "KernelMask", "attention_forward", "build_mask", "register"]

import dataclasses
from typing import Any, Callable, ClassVar

import torch

NAME: str

@dataclasses.dataclass(frozen=True)
class KernelMask:
    ndim: ClassVar[int]
    q_length: int
    kv_length: int
    is_causal: bool = ...
    alignment: str = ...
    window: tuple[int | None, int | None] | None = ...
    kv_lengths: torch.Tensor | None = ...
    attn_mask: torch.Tensor | None = ...
    def keywords(self, query: torch.Tensor, key: torch.Tensor) -> dict[str, Any]: ...

def build_mask(
    batch_size: int, q_length: int, kv_length: int, q_offset: int | torch.Tensor = ...,
    kv_offset: int = ..., mask_function: Callable[..., Any] = ...,
    attention_mask: torch.Tensor | None = ..., local_size: int | None = ..., **kwargs: Any,
) -> KernelMask | torch.Tensor | None: ...
def attention_forward(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: KernelMask | torch.Tensor | None, dropout: float = ...,
    scaling: float | None = ..., is_causal: bool | None = ..., softcap: float | None = ...,
    s_aux: torch.Tensor | None = ..., position_bias: torch.Tensor | None = ...,
    output_attentions: bool = ..., **kwargs: Any,
) -> tuple[torch.Tensor, None]: ...
def register() -> None: ...
