__all__ = ["ShardedKVCache", "scaled_dot_product_attention"]

from typing import Any

from numpy.typing import ArrayLike, DTypeLike

def scaled_dot_product_attention(query: Any, key: Any, value: Any, attn_mask: Any = ...,
                                 is_causal: bool = ..., scale: float | None = ...,
                                 enable_gqa: bool = ..., *, alignment: str = ...,
                                 window: int | tuple[int | None, int | None] | None = ...,
                                 alibi_slopes: ArrayLike | None = ...,
                                 softcap: float | None = ..., sinks: ArrayLike | None = ...,
                                 q_lengths: ArrayLike | None = ...,
                                 kv_lengths: ArrayLike | None = ...,
                                 precision: str | None = ..., return_lse: bool = ...) -> Any: ...

class ShardedKVCache:
    client: Any
    shard_size: int
    workers: list[str]
    length: int
    def __init__(self, client: Any, batch: int, num_kv_heads: int, head_dim: int,
                 shard_size: int, *, dtype: DTypeLike = ..., value_dim: int | None = ...,
                 workers: list[str] | None = ...) -> None: ...
    @property
    def shards(self) -> list[tuple[str, int, int]]: ...
    def append(self, k_new: ArrayLike, v_new: ArrayLike) -> None: ...
    def decode(self, query: ArrayLike, *, scale: float | None = ...,
               window: int | tuple[int | None, int | None] | None = ...,
               alibi_slopes: ArrayLike | None = ..., softcap: float | None = ...,
               sinks: ArrayLike | None = ..., precision: str | None = ...,
               return_lse: bool = ...) -> Any: ...
