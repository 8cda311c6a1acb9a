"""Checks of the arrays a call writes: the caller's `out`, which must not
overlap what the call reads (nor itself), and the logsumexp."""
import math

import numpy as np

from ._validation import check_fits

_TooHardError = getattr(np, "exceptions", np).TooHardError


def prepare_lse(prob):
    """The array for a call's logsumexp, (*batch, H, L) in the compute dtype,
    after checking that it fits."""
    shape = prob.work_shape[:-1]
    check_fits(math.prod(shape), prob.compute_dtype.itemsize,
               f"return_lse: the logsumexp, of shape {shape},")
    return np.empty(shape, dtype=prob.compute_dtype)


def _overlaps(a, b):
    if not np.may_share_memory(a, b):
        return False
    try:
        return np.shares_memory(a, b, max_work=10**6)
    except _TooHardError:
        return True  # cannot prove otherwise: refuse rather than risk it


def _self_overlapping(arr):
    """Whether two elements of `arr` may share memory: with its axes sorted by
    stride, each stride must clear the extent of the axes below it."""
    if arr.size == 0:
        return False
    extent = arr.itemsize
    for stride, n in sorted((abs(st), n) for n, st in zip(arr.shape, arr.strides) if n > 1):
        if stride < extent:
            return True
        extent = stride * (n - 1) + extent
    return False


def prepare_out(out, shape, dtype, inputs):
    """The array to write a result of `shape` and `dtype` into: `out` after
    checks, or a new one.  `inputs` names the arrays it must not overlap."""
    if out is None:
        return np.empty(shape, dtype=dtype)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"out has dtype {out.dtype}; the result has dtype {dtype}")
    if out.shape != tuple(shape):
        raise ValueError(f"out has shape {out.shape}; the result has shape {tuple(shape)}")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    if _self_overlapping(out):
        raise ValueError("out has elements that share memory (zero or overlapping strides); "
                         "pass an array whose every element is its own")
    for name, arr in inputs.items():
        if arr is not None and _overlaps(out, arr):
            raise ValueError(f"out overlaps {name} in memory; pass a separate array")
    return out
