"""Checks of the arrays a call writes: the caller's `out`, which must not
overlap what the call reads (nor itself), and the logsumexp."""
import math

import numpy as np

from ._arrays import check_fits

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


EXACT_OVERLAP_LIMIT = 1 << 24  # elements: beyond, an interleaved layout is refused unverified


def _self_overlapping(arr):
    """Whether two elements of `arr` may share memory.  Sorted by stride, each
    axis' stride clearing the extent of the axes below it proves they do not;
    an interleaved layout that fails that test has its byte offsets compared
    (up to EXACT_OVERLAP_LIMIT elements)."""
    if arr.size == 0:
        return False
    extent = arr.itemsize
    for stride, n in sorted((abs(st), n) for n, st in zip(arr.shape, arr.strides) if n > 1):
        if stride < extent:
            break
        extent = stride * (n - 1) + extent
    else:
        return False
    if arr.size > EXACT_OVERLAP_LIMIT:
        return True
    offsets = np.zeros((), np.int64)
    for n, st in zip(arr.shape, arr.strides):
        offsets = np.add.outer(offsets, np.arange(n, dtype=np.int64) * st)
    offsets = np.sort(offsets, axis=None)
    return bool((np.diff(offsets) < arr.itemsize).any())


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
        raise ValueError("out has elements that share memory (zero or overlapping strides, or "
                         f"an interleaved layout of more than {EXACT_OVERLAP_LIMIT} elements, "
                         "not verified); pass an array whose every element is its own")
    for name, arr in inputs.items():
        if arr is not None and _overlaps(out, arr):
            raise ValueError(f"out overlaps {name} in memory; pass a separate array")
    return out
