"""pyattn: fast exact attention for the CPU with a NumPy API."""


def _borrow_installed_extension():
    """Run from a source checkout after `pip install .`, `import pyattn` finds
    this uncompiled tree first (the current directory leads sys.path).  Then
    take the compiled module from the installed copy instead of failing."""
    import os
    import sys
    from importlib.machinery import EXTENSION_SUFFIXES

    def has_extension(folder):
        return any(os.path.exists(os.path.join(folder, "_attention" + suffix))
                   for suffix in EXTENSION_SUFFIXES)

    here = os.path.dirname(os.path.abspath(__file__))
    if has_extension(here):
        return
    for entry in sys.path:
        candidate = os.path.join(os.path.abspath(entry or os.curdir), "pyattn")
        if os.path.realpath(candidate) != os.path.realpath(here) and has_extension(candidate):
            __path__.append(candidate)
            return


_borrow_installed_extension()


# Idle OpenMP workers of libgomp spin for a while after a parallel region
# before they sleep (GOMP_SPINCOUNT: 300000 iterations by default, about a
# millisecond).  pyattn's calls are usually followed by NumPy's BLAS (the
# layers' projections, the user's own matmuls), and spinning workers then take
# cores from the BLAS threads: on 2 cores the MultiHeadAttention block ran
# 20-40 % slower.  Unless the user chose a wait policy, pyattn's libgomp spins
# only briefly.  libgomp reads this once, when the extension loads it (if
# another library loaded libgomp first, its setting stays).
OPENMP_SPINCOUNT = "10000"


def _load_extension_with_short_spin():
    import os

    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        from . import _attention  # noqa: F401  (the user's choice stands)
        return
    os.environ["GOMP_SPINCOUNT"] = OPENMP_SPINCOUNT
    try:
        from . import _attention  # noqa: F401
    finally:
        del os.environ["GOMP_SPINCOUNT"]  # child processes see the user's environment


_load_extension_with_short_spin()

from . import reference  # noqa: E402
from ._config import config, show_config  # noqa: E402
from ._version import __version__  # noqa: E402
from .functional import merge_attention, scaled_dot_product_attention  # noqa: E402
from .kv_cache import KVCache, decode_attention  # noqa: E402
from .layers import MultiHeadAttention, SelfAttention  # noqa: E402
from .quantized import QuantizedKV  # noqa: E402

__all__ = ["KVCache", "MultiHeadAttention", "QuantizedKV", "SelfAttention", "__version__",
           "config", "decode_attention", "merge_attention", "reference",
           "scaled_dot_product_attention", "show_config"]
