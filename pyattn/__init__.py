"""pyattn: fast exact attention for the CPU with a NumPy API."""
from . import reference
from ._config import config, show_config
from ._version import __version__
from .functional import scaled_dot_product_attention

__all__ = ["__version__", "config", "reference", "scaled_dot_product_attention", "show_config"]
