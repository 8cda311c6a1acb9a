"""Pure-NumPy attention: the oracle for pyattn's tests and the baseline of its
benchmarks.  Same signature and rules as ``pyattn.scaled_dot_product_attention``,
written as the classic four steps; it materialises the full (..., L, S) score
matrix, which is exactly what the compiled kernel avoids."""
import math

import numpy as np

from ._arrays import broadcast_shapes, check_fits, check_ndim, compact, convert_stored
from ._dtypes import resolve_dtype
from ._options import prepare_options
from ._outputs import prepare_lse, prepare_out
from ._validation import check_flag, check_num_threads, cpu_count, prepare_attention

__all__ = ["dequantize", "dequantize_float8_e4m3fn", "dequantize_int8",
           "float8_e4m3fn_values", "quantize_float8_e4m3fn", "quantize_int8",
           "scaled_dot_product_attention", "softmax", "to_float8_e4m3fn_bits"]


def softmax(scores, axis=-1, sink=None):
    """Softmax along `axis`; a row that is all -inf gives zeros, not NaN.
    `sink`, broadcastable to the scores without `axis`, is one more logit in
    the denominator (an attention sink)."""
    scores = np.moveaxis(np.asarray(scores), axis, -1)
    sink = None if sink is None else np.asarray(sink)
    return np.moveaxis(_softmax_lse(scores, sink)[0], -1, axis)


def _softmax_lse(scores, sink=None):
    """(softmax over the last axis, its logsumexp) with an optional sink logit."""
    row_max = scores.max(axis=-1, keepdims=True, initial=-np.inf)  # S = 0 too
    if sink is not None:
        row_max = np.maximum(row_max, sink[..., None])
    shift = np.where(row_max == -np.inf, 0, row_max)  # all masked: shift by 0
    e = np.exp(scores - shift)
    total = e.sum(axis=-1, keepdims=True)
    if sink is not None:
        total = total + np.exp(sink[..., None] - shift)
    weights = np.divide(e, total, out=np.zeros_like(e), where=total != 0)
    with np.errstate(divide="ignore"):
        lse = (shift + np.log(total))[..., 0]
    return weights, lse


def scaled_dot_product_attention(query, key, value, attn_mask=None, is_causal=False,
                                 scale=None, enable_gqa=False, *, out=None, num_threads=None,
                                 alignment="top_left", window=None, alibi_slopes=None,
                                 softcap=None, sinks=None, q_lengths=None, kv_lengths=None,
                                 return_lse=False):
    prob = prepare_attention(query, key, value, attn_mask, is_causal, scale, enable_gqa)
    opts = prepare_options(prob, alignment, window, alibi_slopes, softcap, sinks, q_lengths,
                           kv_lengths)
    return_lse = check_flag(return_lse, "return_lse")
    check_num_threads(num_threads, cpu_count)  # validated for parity; NumPy's BLAS decides
    result = prepare_out(out, prob.out_shape, prob.dtype, prob.inputs)
    lse_out = prepare_lse(prob) if return_lse else None

    # Computed once per distinct batch item: a batch axis that every operand
    # broadcasts (zero strides) stays of length 1, and so do the scores, until
    # the result is broadcast back.  Half types are computed in float32, like
    # the kernel does.
    nb = len(prob.batch)
    k, v = prob.k, prob.v
    if prob.k_scales is not None:  # quantized: the float32 numbers they stand for
        k, v = dequantize(k, prob.k_scales), dequantize(v, prob.v_scales)
    q, k, v = (compact(convert_stored(a, name, prob.compute_dtype), nb)
               for name, a in (("query", prob.q), ("key", k), ("value", v)))
    mask = None if prob.mask is None else compact(prob.mask, nb)
    diag, q_len, kv_len = (None if a is None else compact(a)[..., None, None, None]
                           for a in (opts.diag, opts.q_lengths, opts.kv_lengths))
    batch = broadcast_shapes(*(a.shape[:nb] for a in (q, k, v, mask, diag, q_len, kv_len)
                                  if a is not None))
    L, S, H = q.shape[-2], k.shape[-2], prob.num_heads
    scores_shape = batch + (H, L, S)
    # scores, their exponentials, the weights and the int64 key offsets live at once
    check_fits(4 * math.prod(scores_shape), 8,
               f"the reference's scores of query against key, of shape {scores_shape}, "
               f"and three arrays like them,")

    # GQA: query head h reads key/value head h // group, through views
    g = prob.kv_group

    def grouped(a):  # (..., Hkv * g, N, W) -> (..., Hkv, g, N, W)
        return a.reshape(a.shape[:-3] + (a.shape[-3] // g, g) + a.shape[-2:])

    def shared(a):  # (..., Hkv, N, W) -> (..., Hkv, 1, N, W)
        return a[..., None, :, :]

    def heads(a):  # (..., Hkv, g, N, W) -> (..., Hkv * g, N, W)
        return a.reshape(a.shape[:-4] + (a.shape[-4] * a.shape[-3],) + a.shape[-2:])

    # 1. scores: every query against every key
    scores = heads(grouped(q) @ np.swapaxes(shared(k), -1, -2))
    # 2. scaling, then the optional modifiers in the kernel's order
    scores = scores * prob.scale
    if opts.softcap:
        scores = opts.softcap * np.tanh(scores / opts.softcap)
    # key j's offset from row i's diagonal key i + diag
    offset = np.arange(S) - np.arange(L)[:, None] - diag
    if opts.alibi is not None:
        # in the scores' dtype, as the kernel computes it
        distance = np.abs(offset).astype(scores.dtype)
        scores = scores - opts.alibi[:, None, None].astype(scores.dtype) * distance
    if mask is not None:
        if mask.dtype == np.bool_:
            scores = np.where(mask, scores, -np.inf)
        else:
            scores = scores + mask
    left, right = opts.window  # causality is right = 0
    visible = True
    if left >= 0:
        visible = visible & (offset >= -left)
    if right >= 0:
        visible = visible & (offset <= right)
    if kv_len is not None:
        visible = visible & (np.arange(S) < kv_len)
    scores = np.where(visible, scores, -np.inf)
    # 3. softmax over the keys (and the sink, if any)
    sink = None if opts.sinks is None else opts.sinks[:, None].astype(scores.dtype)
    weights, lse = _softmax_lse(scores, sink)
    # 4. weighted sum of the values
    attended = heads(grouped(weights) @ shared(v))
    if q_len is not None:  # rows past a sequence's queries: zeros
        padded = np.arange(L)[:, None] >= q_len
        attended = np.where(padded, 0, attended)
        lse = np.where(padded[..., 0], -np.inf, lse)
    result[...] = np.broadcast_to(attended, prob.work_shape).reshape(prob.out_shape)
    if not return_lse:
        return result
    lse_out[...] = lse
    return result, lse_out.reshape(prob.out_shape[:-1])


# The quantized KV formats of docs/kv-cache.md: each group's scale maps its
# largest magnitude to the format's largest value.
LARGEST = {"int8": 127, "float8_e4m3fn": 448}


def float8_e4m3fn_values():
    """The float32 value of each float8_e4m3fn bit pattern 0..255: sign, 4
    exponent bits (bias 7), 3 mantissa bits; no infinities; 0x7f and 0xff
    are NaN."""
    bits = np.arange(256)
    e, m = bits >> 3 & 15, bits & 7
    magnitude = np.where(e > 0, np.ldexp(1 + m / 8, e - 7), np.ldexp(m, -9))
    magnitude = np.where(bits & 0x7f == 0x7f, np.nan, magnitude)
    return np.where(bits & 0x80, -magnitude, magnitude).astype(np.float32)


def to_float8_e4m3fn_bits(x):
    """float8_e4m3fn bit patterns (uint8) of the reals `x`: round half to
    even, saturating at +-448 (infinities included), NaN kept NaN."""
    x = np.asarray(x, dtype=np.float64)
    a = np.minimum(np.abs(x), 448.0)
    # the spacing of the format at a: 2^(E - 3) for a in [2^E, 2^(E + 1)),
    # E >= -6, and the subnormals' 2^-9 below 2^-6 (frexp: a = f 2^k, f in [0.5, 1))
    _, k = np.frexp(np.nan_to_num(a))
    step = np.ldexp(1.0, np.maximum(k - 1, -6) - 3)
    rounded = np.rint(a / step) * step  # a / step is exact: step is a power of two
    positive = float8_e4m3fn_values()[:0x7f].astype(np.float64)  # ascending, 0 to 448
    bits = np.searchsorted(positive, np.nan_to_num(rounded)).astype(np.uint8)
    bits = np.where(np.isnan(x), np.uint8(0x7f), bits)
    return (bits | np.signbit(x).astype(np.uint8) << 7).astype(np.uint8)


def _quantize(x, group_size, dtype):
    """(data, float16 scales) of `x` in format `dtype`, as data's bytes."""
    try:
        x = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"x must hold real numbers: {exc}") from None
    if x.ndim == 0:
        raise ValueError("x must have at least 1 dimension (..., D), got a 0-d array")
    check_ndim(x, "x")
    d = x.shape[-1]
    if group_size is None:
        group_size = 32 if dtype == "int8" else d
    if group_size not in (32, 64, d) or d % group_size:
        raise ValueError(f"group_size must be 32, 64 or D={d} and divide D, "
                         f"got {group_size}")
    if not np.isfinite(x).all():
        raise ValueError(f"x must be finite to be quantized to {dtype}")
    largest = LARGEST[dtype]
    groups = x.reshape(x.shape[:-1] + (d // group_size, group_size))
    # one symmetric scale per group: its largest magnitude maps to +-largest
    amax = np.abs(groups).max(axis=-1, initial=0.0)
    with np.errstate(over="ignore"):  # overflow is the error just below
        scales = (amax / np.float32(largest)).astype(np.float16)
    if not np.isfinite(scales).all():
        raise ValueError(f"x has a group whose scale overflows float16 "
                         f"(|x| > 65504 * {largest})")
    # divide by the stored (rounded) scale, so dequantizing inverts exactly
    # what was rounded; a zero scale (all-zero or tiny group) stores zeros
    s32 = scales.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s32 > 0, groups / s32, np.float32(0))
    # round half to even, then saturate: a scale rounded down can push one
    # element just past the largest value
    if dtype == "int8":
        q = np.clip(np.rint(q), -127, 127).astype(np.int8)
    else:
        q = to_float8_e4m3fn_bits(q).view(resolve_dtype("float8_e4m3fn"))
    return q.reshape(x.shape), scales


def _dequantize(q, scales, dtype):
    q = check_ndim(np.asarray(q), "q")
    scales = np.asarray(scales)
    if dtype not in LARGEST or q.dtype.name != dtype or scales.dtype != np.float16:
        raise TypeError(f"q must be {dtype} and scales float16, got {q.dtype} "
                        f"and {scales.dtype}")
    if q.shape[:-1] != scales.shape[:-1] or scales.shape[-1] == 0 \
            or q.shape[-1] % scales.shape[-1]:
        raise ValueError(f"scales shape {scales.shape} does not split q shape "
                         f"{q.shape} into equal groups")
    groups = q.reshape(scales.shape + (q.shape[-1] // scales.shape[-1],))  # S = 0 too
    values = (groups.astype(np.float32) if dtype == "int8"
              else float8_e4m3fn_values()[groups.view(np.uint8)])
    return (values * scales.astype(np.float32)[..., None]).reshape(q.shape)


def quantize_int8(x, group_size=32):
    """The int8 KV format of docs/kv-cache.md, in NumPy: the oracle the
    compiled quantizer is to be tested against.  Splits the last axis of `x`
    into groups of `group_size` channels; returns (int8 data shaped like `x`,
    float16 scales shaped (..., D // group_size))."""
    return _quantize(x, group_size, "int8")


def dequantize_int8(q, scales):
    """float32 values of int8 data `q` with per-group float16 `scales`
    (as quantize_int8 returns them): what the decode kernel computes."""
    return _dequantize(q, scales, "int8")


def quantize_float8_e4m3fn(x, group_size=None):
    """The float8_e4m3fn KV format of docs/kv-cache.md, in NumPy (the
    compiled quantizer's oracle): one float16 scale per row of `x` (or per
    group of `group_size` channels) mapping its largest magnitude to 448,
    each element x / scale rounded half to even and saturated.  Returns
    (ml_dtypes.float8_e4m3fn data shaped like `x`, float16 scales)."""
    return _quantize(x, group_size, "float8_e4m3fn")


def dequantize_float8_e4m3fn(q, scales):
    """float32 values of float8_e4m3fn data `q` with float16 `scales` (as
    quantize_float8_e4m3fn returns them): what the decode kernel computes."""
    return _dequantize(q, scales, "float8_e4m3fn")


def dequantize(q, scales):
    """float32 values of quantized data (int8 or float8_e4m3fn) with scales."""
    return _dequantize(q, scales, np.asarray(q).dtype.name)
