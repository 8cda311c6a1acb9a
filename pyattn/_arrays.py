"""Inputs as arrays the kernels can read: conversion (once, of what is
stored, never of a broadcast view's claimed shape), narrowing checks, and
sizes checked against the machine's memory before anything is allocated."""
import numpy as np

from . import _attention
from ._dtypes import SUPPORTED_NAMES, is_kernel_dtype


def physical_memory():
    """Bytes of RAM in this machine (a large number when it cannot be read);
    read once, in C, since every call checks sizes against it."""
    return _attention.physical_memory()


def check_fits(n_elements, itemsize, what):
    """Refuse, before allocating, an array larger than the machine's memory."""
    nbytes = int(n_elements) * itemsize
    if nbytes > physical_memory():
        raise ValueError(f"{what} would need {nbytes / 2**30:.4g} GiB, more than this "
                         f"machine's {physical_memory() / 2**30:.4g} GiB of memory")


def broadcast_shapes(*shapes):
    """np.broadcast_shapes for any number of dimensions (NumPy's stops at
    32): sizes must agree or be 1, and 0 against 1 gives 0."""
    ndim = max(map(len, shapes), default=0)
    out = []
    for axis in range(-ndim, 0):
        sizes = {s[axis] for s in shapes if len(s) >= -axis} - {1}
        if len(sizes) > 1:
            raise ValueError(f"shapes {shapes} do not broadcast")
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def typed_access_ok(arr):
    """Whether C can address `arr` as typed elements: data aligned to the
    itemsize (misaligned access is UB in C) and strides in whole elements."""
    return arr.flags.aligned and not any(st % arr.itemsize for st in arr.strides)


def compact(arr, axes=None):
    """The smallest array that broadcasts back to `arr` (drops zero strides,
    of its first `axes` axes when given); a view, also of a 0-d array."""
    return arr[tuple(slice(0, 1) if st == 0 and n > 1 else slice(None)
                     for st, n in zip(arr.strides[:axes], arr.shape)) + (...,)]


def checked_cast(arr, dtype, name, inf_allowed=True):
    """`arr` (the argument `name`) as a new array of `dtype`.  Every narrowing
    conversion of an input goes through here, under one rule: a finite value
    that `dtype` cannot hold raises ValueError (NumPy and torch would make it
    inf silently); inf and NaN pass through as given (`inf_allowed`: the
    message offers inf itself as the way out, where the caller takes it)."""
    dtype = np.dtype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(dtype, order="C")
        if np.isinf(out).any():
            stored = compact(arr)  # a broadcast view's values counted once, as stored
            overflow = np.isinf(stored.astype(dtype)) & ~np.isinf(stored)
            if overflow.any():
                way_out = "scale them, or pass inf itself" if inf_allowed else "scale them"
                example = stored[overflow][0]  # beyond float64 too (longdouble): as it is
                shown = repr(float(example)) if np.isfinite(float(example)) else str(example)
                raise ValueError(f"{name} holds {int(overflow.sum())} finite value(s) beyond "
                                 f"the range of {dtype}, e.g. {shown}, which would become inf; "
                                 f"{way_out}")
    return out


def _span_elements(arr):
    """Elements of `arr`'s dtype from its lowest element to its highest, or
    None when its strides are not whole elements (no such count exists)."""
    if any(st % arr.itemsize for st in arr.strides):
        return None
    return 1 + sum(abs(st) // arr.itemsize * (n - 1) for st, n in zip(arr.strides, arr.shape))


def _convert_span(arr, dtype, n, name):
    """`arr` as a read-only view into one converted copy of the `n` elements
    that its elements span: overlapping elements are converted once (and
    checked once, gaps between them included)."""
    flip = tuple(slice(None, None, -1) if st < 0 else slice(None) for st in arr.strides)
    up = arr[flip]  # strides >= 0: the data pointer is at the lowest element
    as_strided = np.lib.stride_tricks.as_strided
    copy = checked_cast(as_strided(up, (n,), (arr.itemsize,)), dtype, name)
    strides = tuple(st // arr.itemsize * dtype.itemsize for st in up.strides)
    return as_strided(copy, up.shape, strides, writeable=False)[flip]


def convert_stored(arr, name, dtype=None):
    """`arr` (the argument `name`) as `dtype` (default: its own), native byte
    order, aligned, in whole-element strides.  Whatever must be copied is
    copied as it is stored: the distinct elements of a broadcast view
    (dropping zero strides) or, when fewer, the memory that its elements span
    (overlapping views such as sliding windows), never the claimed shape."""
    dtype = arr.dtype.newbyteorder("=") if dtype is None else np.dtype(dtype)
    if arr.dtype == dtype and typed_access_ok(arr):
        return arr
    stored = compact(arr)
    span = _span_elements(arr) if arr.size else None
    if span is not None and span < stored.size:
        check_fits(span, dtype.itemsize, f"a converted copy of {name} ({span} elements)")
        return _convert_span(arr, dtype, span, name)
    check_fits(stored.size, dtype.itemsize, f"a converted copy of {name} "
               f"({stored.size} distinct elements)")
    return np.broadcast_to(checked_cast(stored, dtype, name), arr.shape)


# Dimensions an input may have: NumPy's 64, less the axes that the
# reference, the quantizers and merge_attention add to their inputs.
MAX_NDIM = 60


def check_ndim(arr, name, max_ndim=MAX_NDIM):
    if arr.ndim > max_ndim:
        raise ValueError(f"{name} has {arr.ndim} dimensions; pyattn takes at most {max_ndim}")
    return arr


def as_array(x, name, what="an array", max_ndim=MAX_NDIM):
    """np.asarray(x), with None and unconvertible input (ragged nested lists
    and the like) reported against the argument's `name`, and at most
    `max_ndim` dimensions."""
    if x is None:
        raise TypeError(f"{name} must be {what}, got None")
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{name} cannot be converted to an array: {exc}") from None
    return check_ndim(arr, name, max_ndim)


def as_float_array(x, name, min_ndim=2, layout="(..., L, E)", max_ndim=MAX_NDIM):
    """`x` as an ndarray of a supported float dtype, without copying when it
    already is one."""
    arr = as_array(x, name, f"an array of {SUPPORTED_NAMES}", max_ndim)
    if arr.dtype.kind == "f" and not arr.dtype.isnative:  # e.g. '>f4'
        arr = convert_stored(arr, name)
    if not is_kernel_dtype(arr.dtype):
        raise TypeError(f"{name} has dtype {arr.dtype}; supported dtypes are {SUPPORTED_NAMES}")
    if arr.ndim < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimensions {layout}; got shape {arr.shape}"
        )
    return convert_stored(arr, name)


def held_array(x, name):
    """A buffer or __array__ object as the array it holds, converted once (a
    second conversion may cost as much again, or give other memory than the
    kernel reads: what `out` is checked against); anything else as given."""
    from .quantized import QuantizedKV  # it imports this module

    if x is None or isinstance(x, (np.ndarray, list, tuple, QuantizedKV)):
        return x
    return as_array(x, name)
