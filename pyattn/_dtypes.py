"""The dtypes pyattn stores and computes in: names from the kernels' C
registry, their resolution (bfloat16 through ml_dtypes) and checks."""
import sys

import numpy as np

from . import _attention

# The kernels' storage dtypes, by name, from the C registry; the half types are
# stored as such and computed in float32.  bfloat16 is NumPy's only through
# ml_dtypes, an optional dependency imported only when a name asks for it (an
# array of it means that the caller already did).
KERNEL_DTYPE_NAMES = tuple(n for n in _attention.DTYPES if n not in _attention.KV_ONLY_DTYPES)


FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))  # computed in their own precision


SUPPORTED_NAMES = "float32, float64, float16 or bfloat16 (with ml_dtypes)"


def is_kernel_dtype(dtype):
    """Whether the kernels store arrays of `dtype` as they are."""
    return dtype.isnative and dtype.name in KERNEL_DTYPE_NAMES


def resolve_dtype(dtype):
    """np.dtype(dtype), with "bfloat16" and "float8_e4m3fn" found in ml_dtypes."""
    try:
        return np.dtype(dtype)
    except TypeError:
        if dtype not in ("bfloat16", "float8_e4m3fn"):
            raise
        try:
            import ml_dtypes
        except ImportError:
            raise TypeError(f"{dtype} needs ml_dtypes: pip install ml_dtypes") from None
        return np.dtype(getattr(ml_dtypes, dtype))


def check_dtype(dtype, allowed_names, names):
    """resolve_dtype(dtype) when its name is one of `allowed_names`, else a
    TypeError naming `dtype`; `names` lists them for the message.  None is
    refused: np.dtype(None) would silently be float64."""
    try:
        dt = None if dtype is None else resolve_dtype(dtype)
    except (TypeError, ValueError):
        raise TypeError(f"dtype must be {names}, got {dtype!r}") from None
    if dt is None or dt.name not in allowed_names:
        raise TypeError(f"dtype must be {names}, got {'None' if dt is None else dt.name}")
    if not dt.isnative:  # str(dt) keeps the byte order: '>f4', where dt.name says float32
        raise TypeError(f"dtype must be in native byte order, got {dt} (use "
                        f"{dt.newbyteorder('=')})")
    return dt


def compute_dtype(dtype):
    """The dtype a storage dtype is computed in (and its mask, logsumexp and
    weights are given in): float32 for the half types."""
    size = _attention.COMPUTE_ITEMSIZE.get(np.dtype(dtype).name, 4)
    return np.dtype(np.float64) if size == 8 else np.dtype(np.float32)


def _is_ml_dtypes_float(dtype):
    """A float type of ml_dtypes (bfloat16, the float8 and float4 formats;
    NumPy calls some of them kind "V"), which an array of means the caller
    imported it."""
    ml_dtypes = sys.modules.get("ml_dtypes")
    if ml_dtypes is None or dtype.kind != "V":
        return False
    try:
        ml_dtypes.finfo(dtype)
    except (TypeError, ValueError):  # int4 and the other integers
        return False
    return True


def is_mask_dtype(dtype):
    """Masks are bool, or any float (bfloat16 and float8 included) added to
    the scores."""
    return dtype == np.bool_ or dtype.kind == "f" or _is_ml_dtypes_float(dtype)
