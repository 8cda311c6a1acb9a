__all__ = ["scaled_dot_product_attention"]

from typing import Any

def scaled_dot_product_attention(query: Any, key: Any, value: Any, *, is_causal: bool = ...,
                                 scale: float | None = ..., enable_gqa: bool = ...,
                                 alignment: str = ...,
                                 window: int | tuple[int | None, int | None] | None = ...,
                                 softcap: float | None = ..., sinks: Any = ...,
                                 precision: str | None = ..., return_lse: bool = ...,
                                 **unsupported: Any) -> Any: ...
