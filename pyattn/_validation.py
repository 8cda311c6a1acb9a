"""Input checking and normalisation shared by pyattn's API and its reference.

Everything a user can get wrong is caught here, with a message that names the
argument and the shapes involved, before any compiled code runs.
"""
import math
import numbers
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from . import _attention

# The kernels' storage dtypes, by name, from the C registry; the half types are
# stored as such and computed in float32.  bfloat16 is NumPy's only through
# ml_dtypes, an optional dependency imported only when a name asks for it (an
# array of it means that the caller already did).
KERNEL_DTYPE_NAMES = tuple(n for n in _attention.DTYPES if n not in _attention.KV_ONLY_DTYPES)
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))  # computed in their own precision


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


def check_size(value, name):
    """`value` as a positive int (NumPy integers too): TypeError for any other
    type (bool and floats such as 8.0 included), ValueError below 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


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


_SUPPORTED_NAMES = "float32, float64, float16 or bfloat16 (with ml_dtypes)"


def compute_dtype(dtype):
    """The dtype a storage dtype is computed in (and its mask, logsumexp and
    weights are given in): float32 for the half types."""
    size = _attention.COMPUTE_ITEMSIZE.get(np.dtype(dtype).name, 4)
    return np.dtype(np.float64) if size == 8 else np.dtype(np.float32)
MAX_THREADS = _attention.MAX_THREADS
MAX_POSITIONS = _attention.MAX_POSITIONS
# Multiply-adds one call may claim: 2**60 is about 2.3e18 flops, over a day at
# 10 TFLOP/s (a large CPU server's float32 peak) and weeks on a workstation;
# the largest real prefill batches are ~2**50.  Beyond it a call, which cannot
# be interrupted once in the kernel, would only look like a hang.
MAX_WORK = 2**60


def physical_memory():
    """Bytes of RAM in this machine (a large number when it cannot be read);
    read once, in C, since every call checks sizes against it."""
    return _attention.physical_memory()


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


def check_fits(n_elements, itemsize, what):
    """Refuse, before allocating, an array larger than the machine's memory."""
    nbytes = int(n_elements) * itemsize
    if nbytes > physical_memory():
        raise ValueError(f"{what} would need {nbytes / 2**30:.4g} GiB, more than this "
                         f"machine's {physical_memory() / 2**30:.4g} GiB of memory")


def typed_access_ok(arr):
    """Whether C can address `arr` as typed elements: data aligned to the
    itemsize (misaligned access is UB in C) and strides in whole elements."""
    return arr.flags.aligned and not any(st % arr.itemsize for st in arr.strides)


def compact(arr, axes=None):
    """The smallest array that broadcasts back to `arr` (drops zero strides,
    of its first `axes` axes when given); a view, also of a 0-d array."""
    return arr[tuple(slice(0, 1) if st == 0 and n > 1 else slice(None)
                     for st, n in zip(arr.strides[:axes], arr.shape)) + (...,)]


def checked_cast(arr, dtype, name):
    """`arr` (the argument `name`) as a new array of `dtype`.  Every narrowing
    conversion of an input goes through here, under one rule: a finite value
    that `dtype` cannot hold raises ValueError (NumPy and torch would make it
    inf silently); inf and NaN pass through as given."""
    dtype = np.dtype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(dtype, order="C")
    overflow = np.isinf(out)
    if overflow.any():
        overflow &= ~np.isinf(arr)
        if overflow.any():
            raise ValueError(f"{name} holds {int(overflow.sum())} finite value(s) beyond the "
                             f"range of {dtype}, e.g. {float(arr[overflow][0])!r}, which would "
                             f"become inf; scale them, or pass inf itself")
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
    arr = as_array(x, name, f"an array of {_SUPPORTED_NAMES}", max_ndim)
    if arr.dtype.kind == "f" and not arr.dtype.isnative:  # e.g. '>f4'
        arr = convert_stored(arr, name)
    if not is_kernel_dtype(arr.dtype):
        raise TypeError(f"{name} has dtype {arr.dtype}; supported dtypes are {_SUPPORTED_NAMES}")
    if arr.ndim < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimensions {layout}; got shape {arr.shape}"
        )
    return convert_stored(arr, name)


def representable(value, name, dtype, positive=False):
    """`value` (a float) after checking that the compute `dtype` holds it
    finite (and nonzero when `positive`): the kernel computes with it there,
    so 1e300 must be refused for float32, not become inf and NaN outputs."""
    with np.errstate(over="ignore"):
        stored = np.asarray(value, dtype=np.float64).astype(dtype)
    if not np.isfinite(stored).all() or (positive and (stored == 0).any()):
        raise ValueError(f"{name} = {value} is outside the range of {np.dtype(dtype)}, "
                         f"the dtype the kernel computes in for these inputs")
    return value


def check_scale(scale, head_dim, dtype):
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    try:
        scale = float(scale)
    except OverflowError:  # an int beyond float range
        raise ValueError(
            f"scale must be finite, got an integer of {scale.bit_length()} bits"
        ) from None
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return representable(scale, "scale", dtype)


def cpu_count():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_num_threads(num_threads, default):
    """Threads to use: `default()` for None, n for n > 0, and for negative n
    joblib's convention: -1 is all CPUs, -2 all but one, ..."""
    if num_threads is None:
        return default()
    if isinstance(num_threads, bool) or not isinstance(num_threads, numbers.Integral):
        raise TypeError(f"num_threads must be an int or None, got {type(num_threads).__name__}")
    n = int(num_threads)
    ncpu = cpu_count()
    if n > MAX_THREADS:
        raise ValueError(f"num_threads must be at most {MAX_THREADS}; got {n}")
    if n > 0:
        return n
    if n == 0 or n < -ncpu:
        raise ValueError(
            f"num_threads must be a positive int, or a negative int in [-{ncpu}, -1] "
            f"counting back from this machine's {ncpu} CPUs; got {n}"
        )
    return ncpu + 1 + n


@dataclass
class AttentionProblem:
    """A validated attention call, with q, k, v (and mask) viewed as
    (*batch, heads, rows, width) arrays of one common ndim >= 3."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    mask: Optional[np.ndarray]  # broadcast view of the scores' shape, or None
    is_causal: bool
    scale: float
    kv_group: int  # query heads per key/value head
    batch: Tuple[int, ...]
    num_heads: int
    out_shape: Tuple[int, ...]  # what the caller gets back
    work_shape: Tuple[int, ...]  # (*batch, heads, L, Ev)
    # quantized key and value (pyattn.QuantizedKV): k and v hold their int8 or
    # float8 data, these their float16 scales (lifted like k and v) and group sizes
    k_scales: Optional[np.ndarray] = None
    v_scales: Optional[np.ndarray] = None
    groups: Tuple[int, int] = (0, 0)
    # query, key, value and attn_mask as the caller gave them (before any
    # conversion but a buffer's to the array it holds): the memory `out`
    # must not overlap
    sources: Optional[dict] = None

    @property
    def dtype(self):
        return self.q.dtype

    @property
    def kernel_dtype(self):
        """The name of the kernel table entry: the storage of k and v."""
        return self.k.dtype.name if self.k_scales is not None else self.q.dtype.name

    @property
    def compute_dtype(self):
        return compute_dtype(self.q.dtype)

    @property
    def inputs(self):
        """The caller's arrays a call reads, by argument name: what `out` must
        not overlap.  As given: a converted copy overlaps nothing, the array
        it was made from may (and a view covers no more than its base)."""
        from .quantized import QuantizedKV  # it imports this module

        used = {"query": self.q, "key": self.k, "value": self.v, "attn_mask": self.mask}
        arrays = {}
        for name, x in self.sources.items():
            if isinstance(x, QuantizedKV):
                arrays[name], arrays[f"{name}.scales"] = x.data, x.scales
            elif isinstance(x, (list, tuple)) or x is None:  # converted into a new array
                arrays[name] = used[name]
            else:  # an array (a buffer / __array__ object's, converted once: held_array)
                arrays[name] = x
        return arrays

    @property
    def scores_shape(self):
        return self.batch + (self.num_heads, self.q.shape[-2], self.k.shape[-2])


def _lift(arr, ndim):
    """View `arr` with leading length-1 axes up to `ndim` dimensions."""
    return arr.reshape((1,) * (ndim - arr.ndim) + arr.shape)


def _broadcast_size(a, b):
    """NumPy's broadcast of two axis lengths (1 against n gives n, also 0), or
    None when they do not broadcast."""
    return a if b == 1 or a == b else b if a == 1 else None


def _heads(hq, hk, hv, enable_gqa):
    """Output heads and the GQA group size, from query and key/value heads."""
    hkv = _broadcast_size(hk, hv)
    if hkv is None:
        raise ValueError(
            f"key and value must have the same number of heads (dim -3); got {hk} and {hv}"
        )
    heads = _broadcast_size(hq, hkv)
    if heads is not None:
        return heads, 1
    if not enable_gqa or 0 in (hq, hkv):  # no group of 0 heads
        groups = not enable_gqa and hkv > 0 and hq % hkv == 0
        hint = " (pass enable_gqa=True for grouped-query attention)" if groups else ""
        raise ValueError(
            f"query has {hq} heads and key/value have {hkv} (dim -3); they must match "
            f"or broadcast{hint}"
        )
    if hq % hkv != 0:
        raise ValueError(
            f"with enable_gqa=True the query heads Hq={hq} must be a multiple of the "
            f"key/value heads Hkv={hkv}"
        )
    return hq, hq // hkv


def is_mask_dtype(dtype):
    """Masks are bool, or any float (bfloat16 included) added to the scores."""
    return dtype == np.bool_ or dtype.kind == "f" or is_kernel_dtype(dtype)


def _check_mask(attn_mask, dtype, scores_shape, lifted_ndim):
    mask = as_array(attn_mask, "attn_mask")
    if not is_mask_dtype(mask.dtype):
        raise TypeError(
            f"attn_mask has dtype {mask.dtype}; it must be bool (True = take part) "
            f"or floating (added to the scores)"
        )
    if mask.ndim > lifted_ndim:
        raise ValueError(
            f"attn_mask of shape {mask.shape} has more dimensions than the scores "
            f"(..., Hq, L, S) = {scores_shape}"
        )
    try:
        broadcast = broadcast_shapes(mask.shape, scores_shape)
    except ValueError:
        broadcast = None
    if broadcast != scores_shape:
        raise ValueError(
            f"attn_mask of shape {mask.shape} does not broadcast to the scores shape "
            f"(..., Hq, L, S) = {scores_shape}"
        )
    if mask.dtype != np.bool_:  # the compute dtype, where a finite mask value is a score
        mask = convert_stored(mask, "attn_mask", dtype)
    return np.broadcast_to(mask, scores_shape)  # a view, no copy



def check_flag(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def held_array(x, name):
    """A buffer or __array__ object as the array it holds, converted once (a
    second conversion may cost as much again, or give other memory than the
    kernel reads: what `out` is checked against); anything else as given."""
    from .quantized import QuantizedKV  # it imports this module

    if x is None or isinstance(x, (np.ndarray, list, tuple, QuantizedKV)):
        return x
    return as_array(x, name)


def prepare_attention(query, key, value, attn_mask, is_causal, scale, enable_gqa):
    """Validate a scaled_dot_product_attention call; see docs/api.md for the rules."""
    is_causal = check_flag(is_causal, "is_causal")
    enable_gqa = check_flag(enable_gqa, "enable_gqa")
    query, key, value, attn_mask = (held_array(x, n) for x, n in (
        (query, "query"), (key, "key"), (value, "value"), (attn_mask, "attn_mask")))
    q = as_float_array(query, "query", layout="(..., L, E)")
    k, v, k_scales, v_scales, groups = _key_value(key, value, q.dtype)
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"query and key must have the same last dimension E; got query {q.shape} "
            f"and key {k.shape}"
        )
    if q.shape[-1] == 0:
        raise ValueError(f"the head dimension E must be at least 1; got query {q.shape}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"key and value must have the same sequence length S (dim -2); got key "
            f"{k.shape} and value {v.shape}"
        )

    out_ndim = max(q.ndim, k.ndim, v.ndim)
    ndim = max(out_ndim, 3)
    q, k, v = _lift(q, ndim), _lift(k, ndim), _lift(v, ndim)
    if k_scales is not None:
        k_scales, v_scales = _lift(k_scales, ndim), _lift(v_scales, ndim)
    num_heads, kv_group = _heads(q.shape[-3], k.shape[-3], v.shape[-3], enable_gqa)
    try:
        batch = broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    except ValueError:
        raise ValueError(
            f"the batch dimensions of query {q.shape[:-3]}, key {k.shape[:-3]} and "
            f"value {v.shape[:-3]} do not broadcast"
        ) from None

    L, S, Ev = q.shape[-2], k.shape[-2], v.shape[-1]
    if L > MAX_POSITIONS or S > MAX_POSITIONS:
        raise ValueError(
            f"query has L = {L} rows and key/value S = {S}; pyattn handles at most "
            f"{MAX_POSITIONS} (2**31 - 1) of each"
        )
    work_shape = batch + (num_heads, L, Ev)
    out_shape = work_shape[ndim - out_ndim:]
    scores_shape = batch + (num_heads, L, S)
    check_fits(math.prod(out_shape), q.itemsize, f"the result, of shape {out_shape} (from query, "
               f"key and value),")
    # after the result: a result beyond memory is the more specific error
    work = math.prod(batch) * num_heads * L * S * (q.shape[-1] + Ev)
    if work > MAX_WORK:
        raise ValueError(
            f"query, key and value claim {work:.3g} multiply-adds (batch x heads x L x S x "
            f"(E + Ev) = {math.prod(batch)} x {num_heads} x {L} x {S} x {q.shape[-1] + Ev}), "
            f"beyond pyattn's limit of 2**60, which no CPU computes within a day; broadcast "
            f"views are computed as they claim, never expanded"
        )
    mask = None
    if attn_mask is not None:
        mask = _check_mask(attn_mask, compute_dtype(q.dtype), scores_shape, ndim)

    return AttentionProblem(
        q=q, k=k, v=v, mask=mask, is_causal=is_causal,
        scale=check_scale(scale, q.shape[-1], compute_dtype(q.dtype)), kv_group=kv_group,
        batch=batch,
        num_heads=num_heads, out_shape=out_shape, work_shape=work_shape,
        k_scales=k_scales, v_scales=v_scales, groups=groups,
        sources={"query": query, "key": key, "value": value, "attn_mask": attn_mask},
    )


def _key_value(key, value, q_dtype):
    """(k, v, k_scales, v_scales, groups) of a call: float arrays of the
    query's dtype, or what the kernels read of two pyattn.QuantizedKV."""
    from .quantized import QuantizedKV, kernel_operands  # it imports this module

    if isinstance(key, QuantizedKV) or isinstance(value, QuantizedKV):
        return kernel_operands(key, value, q_dtype)
    k = as_float_array(key, "key", layout="(..., S, E)")
    v = as_float_array(value, "value", layout="(..., S, Ev)")
    if not (q_dtype == k.dtype == v.dtype):
        raise TypeError(
            f"query, key and value must share one dtype ({_SUPPORTED_NAMES}); got "
            f"query {q_dtype}, key {k.dtype}, value {v.dtype}"
        )
    return k, v, None, None, (0, 0)
