"""Argument checks shared by pyattn's API and its reference: scalars
(scale, flags, sizes, num_threads) and a whole call's shapes, heads and mask
(prepare_attention).  Array conversion is in _arrays, dtypes in _dtypes.

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
from ._arrays import (
    as_array,
    as_float_array,
    broadcast_shapes,
    check_fits,
    convert_stored,
    held_array,
)
from ._dtypes import SUPPORTED_NAMES, compute_dtype, is_mask_dtype


def check_size(value, name):
    """`value` as a positive int (NumPy integers too): TypeError for any other
    type (bool and floats such as 8.0 included), ValueError below 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


MAX_THREADS = _attention.MAX_THREADS


MAX_POSITIONS = _attention.MAX_POSITIONS


# Multiply-adds one call may claim: 2**60 is about 2.3e18 flops, over a day at
# 10 TFLOP/s (a large CPU server's float32 peak) and weeks on a workstation;
# the largest real prefill batches are ~2**50.  Beyond it a call, which cannot
# be interrupted once in the kernel, would only look like a hang.
MAX_WORK = 2**60


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


def check_mask(attn_mask, dtype, scores_shape, lifted_ndim):
    """attn_mask checked (dtype, dimensions, broadcasting to `scores_shape`)
    and as a view of that shape, a float mask in the compute `dtype`."""
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
    if math.prod(n for n in out_shape if n) * q.itemsize > np.iinfo(np.intp).max:
        # NumPy refuses such a shape even when a 0 makes it empty
        raise ValueError(f"the result, of shape {out_shape} (from query, key and value), is "
                         f"beyond what NumPy can describe, empty though it is")
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
        mask = check_mask(attn_mask, compute_dtype(q.dtype), scores_shape, ndim)

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
            f"query, key and value must share one dtype ({SUPPORTED_NAMES}); got "
            f"query {q_dtype}, key {k.dtype}, value {v.dtype}"
        )
    return k, v, None, None, (0, 0)
