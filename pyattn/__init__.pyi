from . import reference as reference
from ._config import config as config
from ._config import show_config as show_config
from .functional import merge_attention as merge_attention
from .functional import scaled_dot_product_attention as scaled_dot_product_attention
from .kv_cache import KVCache as KVCache
from .kv_cache import decode_attention as decode_attention
from .layers import MultiHeadAttention as MultiHeadAttention
from .layers import SelfAttention as SelfAttention
from .quantized import QuantizedKV as QuantizedKV

__version__: str
OPENMP_SPINCOUNT: str
__all__ = ["KVCache", "MultiHeadAttention", "QuantizedKV", "SelfAttention", "__version__",
           "config", "decode_attention", "merge_attention", "reference",
           "scaled_dot_product_attention", "show_config"]
