"""float16 and bfloat16 storage, computed in float32 (README: "Half precision"),
as precision="exact" asks (bfloat16 products have their own tests:
test_bf16_products.py).

The claim tested: pyattn's half result is the float32 computation on the
half inputs, rounded once to the output dtype.  So on every kernel and code
path (direct decode, tiled, split keys, heads as rows, weights):

  * |out - exact| <= ulp(exact) / 2 + (float32's error), elementwise, where
    `exact` is the reference computed in float32 (and, as a sanity check,
    in float64) on the same half inputs, before any rounding;
  * out is pyattn.reference's half result or its neighbour;
  * the output has the input dtype; lse and weights are float32.

Plus the rounding itself (to nearest, ties to even, built from halfway
cases), layouts, out=, masks, errors, and a half-precision KVCache.
"""
import functools

import numpy as np
import pytest
from support import ALL_MODIFIERS_CASE, HALVES, bfloat16, ids, needs_bf16

import pyattn
from pyattn import _attention, _plan, functional
from pyattn import reference as ref

sdpa = functools.partial(pyattn.scaled_dot_product_attention, precision="exact")

# significand bits (with the implicit one) and the exponent of the smallest
# normal number, as frexp counts it (x = m * 2**e, 0.5 <= m < 1)
FORMAT = {"float16": (11, -13), "bfloat16": (8, -125)}


def ulp(x, dtype):
    """The spacing of `dtype`'s numbers around |x| (x a float64 array)."""
    p, e_min = FORMAT[np.dtype(dtype).name]
    x = np.abs(np.asarray(x, np.float64))
    _, e = np.frexp(x)
    e = np.where(x == 0, e_min, np.maximum(e, e_min))  # subnormals: evenly spaced
    return np.ldexp(1.0, e - p)


def f32_slack(exact, score_bound):
    """How far two float32 computations of the same attention may differ:
    a few float32 epsilons of the largest output, times the amplification
    of score errors by exp (see Helpers.tolerance)."""
    mag = float(np.max(np.abs(exact), initial=0.0))
    return 16 * float(np.finfo(np.float32).eps) * max(1.0, score_bound) * max(1.0, mag)


def assert_rounded_once(got, exact, dtype, score_bound=0.0):
    """`got` (of `dtype`) is `exact` rounded to nearest, up to float32's error."""
    got = np.asarray(got)
    assert got.dtype == np.dtype(dtype), (got.dtype, dtype)
    exact = np.asarray(exact, np.float64)
    assert got.shape == exact.shape
    err = np.abs(got.astype(np.float64) - exact)
    bound = 0.5 * ulp(exact, dtype) + f32_slack(exact, score_bound)
    bad = ~(err <= bound)
    assert not bad.any(), (
        f"{bad.sum()} of {bad.size} elements are more than half an ulp off; worst: "
        f"{(err / ulp(exact, dtype)).max():.3f} ulp (got {got.astype(np.float64)[bad][:4]}, "
        f"want {exact[bad][:4]})")


def assert_neighbours(got, want, dtype, score_bound=0.0):
    """`got` equals `want` (both of `dtype`) or one of its two neighbours."""
    assert got.dtype == want.dtype == np.dtype(dtype)
    g, w = got.astype(np.float64), want.astype(np.float64)
    bound = ulp(w, dtype) + f32_slack(w, score_bound)
    assert (np.abs(g - w) <= bound).all(), np.abs(g - w).max()


def half_inputs(rng, dtype, qs, ks, vs):
    return tuple(rng.standard_normal(s).astype(np.float32).astype(dtype) for s in (qs, ks, vs))


def check_against_reference(got, q, k, v, dtype, lse=None, **kwargs):
    """Every claim on one result: one rounding of the float32 and of the
    float64 computation, a neighbour of the reference's half result, and
    the reference's float32 logsumexp."""
    bound = float(np.nan_to_num(pyattn_score_bound(q, k, kwargs.get("scale"))))
    up32 = [a.astype(np.float32) for a in (q, k, v)]
    mask = kwargs.get("attn_mask")
    exact32, lse32 = ref.scaled_dot_product_attention(*up32, return_lse=True, **kwargs)
    kwargs64 = dict(kwargs)
    if mask is not None and mask.dtype != np.bool_:
        kwargs64["attn_mask"] = mask.astype(np.float32).astype(np.float64)
    exact64 = ref.scaled_dot_product_attention(*(a.astype(np.float64) for a in up32),
                                               **kwargs64)
    want_half = ref.scaled_dot_product_attention(q, k, v, **kwargs)
    assert got.dtype == want_half.dtype == np.dtype(dtype)
    assert not np.isnan(got).any()
    assert_rounded_once(got, exact32, dtype, bound)
    assert_rounded_once(got, exact64, dtype, bound)
    assert_neighbours(got, want_half, dtype, bound)
    if lse is not None:
        assert lse.dtype == np.float32 and lse.shape == got.shape[:-1]
        assert np.array_equal(np.isneginf(lse), np.isneginf(lse32))
        fin = np.isfinite(lse32)
        np.testing.assert_allclose(lse[fin], lse32[fin], rtol=1e-5, atol=1e-5 * max(1, bound))


def pyattn_score_bound(q, k, scale=None):
    q64, k64 = np.asarray(q, np.float64), np.asarray(k, np.float64)
    scale = 1 / np.sqrt(q64.shape[-1]) if scale is None else scale
    return abs(scale) * np.sqrt((q64 * q64).sum(-1)).max() * np.sqrt((k64 * k64).sum(-1)).max()


# ==========================================================================
# 1. Every kernel and path against the float32 and float64 computations
# ==========================================================================

# name: (q shape, k shape, v shape, keywords); masks drawn in the test
CASES = {
    # L < 4: fewer query rows than any kernel's MR, the direct decode path
    "decode": ((2, 3, 3, 16), (2, 3, 100, 16), (2, 3, 100, 24), {}),
    "plain": ((2, 3, 37, 16), (2, 3, 53, 16), (2, 3, 53, 24), {}),
    # several query blocks of every kernel (BLOCK_M <= 256), several key tiles
    "tiled": ((1, 2, 300, 32), (1, 2, 200, 32), (1, 2, 200, 8), {}),
    "causal": ((2, 3, 37, 16), (2, 3, 53, 16), (2, 3, 53, 24), dict(is_causal=True)),
    "causal_lower_right_tiled": ((1, 2, 130, 8), (1, 2, 260, 8), (1, 2, 260, 8),
                                 dict(is_causal=True, alignment="lower_right")),
    "bool_mask": ((2, 3, 37, 16), (2, 3, 53, 16), (2, 3, 53, 24), dict(attn_mask="bool")),
    "float32_mask": ((2, 3, 37, 16), (2, 3, 53, 16), (2, 3, 53, 24),
                     dict(attn_mask=np.float32)),
    "float64_mask_decode": ((2, 3, 2, 16), (2, 3, 53, 16), (2, 3, 53, 24),
                            dict(attn_mask=np.float64)),
    "float16_mask": ((2, 3, 37, 16), (2, 3, 53, 16), (2, 3, 53, 24),
                     dict(attn_mask=np.float16)),
    "gqa": ((2, 8, 5, 16), (2, 2, 70, 16), (2, 2, 70, 12), dict(enable_gqa=True)),
    "gqa_heads_as_rows": ((2, 8, 1, 16), (2, 2, 70, 16), (2, 2, 70, 12),
                          dict(enable_gqa=True)),
    "broadcast_batch": ((3, 1, 2, 9, 8), (1, 4, 2, 20, 8), (3, 4, 1, 20, 8), {}),
    "modifiers": ALL_MODIFIERS_CASE,
    "scale": ((1, 2, 9, 16), (1, 2, 40, 16), (1, 2, 40, 16), dict(scale=0.9)),
    "two_dims": ((17, 8), (33, 8), (33, 5), {}),
}


def build(rng, dtype, name):
    qs, ks, vs, kwargs = CASES[name]
    q, k, v = half_inputs(rng, dtype, qs, ks, vs)
    kwargs = dict(kwargs)
    mask = kwargs.get("attn_mask")
    if mask is not None:  # (..., Hq, L, S)
        scores = np.broadcast_shapes(qs[:-3], ks[:-3]) + qs[-3:-1] + ks[-2:-1]
    if isinstance(mask, str):
        kwargs["attn_mask"] = rng.random(scores) < 0.7
    elif mask is not None:
        bias = rng.standard_normal(scores[-2:])
        bias[rng.random(scores[-2:]) < 0.2] = -np.inf
        kwargs["attn_mask"] = bias.astype(mask)
    return q, k, v, kwargs


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", HALVES, ids=ids)
def test_matches_reference(kernel, dtype, name, rng):
    q, k, v, kwargs = build(rng, dtype, name)
    got, lse = sdpa(q, k, v, return_lse=True, **kwargs)
    assert got.dtype == np.dtype(dtype) and got.shape == ref.scaled_dot_product_attention(
        q, k, v, **kwargs).shape
    check_against_reference(got, q, k, v, dtype, lse=lse, **kwargs)
    if "q_lengths" in kwargs:
        assert (got[1, :, 7:] == 0).all()


@pytest.mark.parametrize("L, S, B, H", [(1, 3000, 1, 2), (3, 2500, 1, 1), (20, 4100, 1, 1),
                                        (1, 2200, 2, 4)], ids=str)
@pytest.mark.parametrize("dtype", HALVES, ids=ids)
def test_split_keys(kernel, dtype, L, S, B, H, rng, spy_split):
    """Long key ranges with few work items are cut into chunks and merged
    (their partial outputs in float32): within one rounding of the float32
    computation."""
    q, k, v = half_inputs(rng, dtype, (B, H, L, 16), (B, H, S, 16), (B, H, S, 8))
    got, lse = sdpa(q, k, v, return_lse=True, is_causal=True, alignment="lower_right")
    assert spy_split[-1] > 0, "the keys were not split"
    assert got.dtype == np.dtype(dtype) and lse.dtype == np.float32
    up = [a.astype(np.float32) for a in (q, k, v)]
    exact, lse32 = ref.scaled_dot_product_attention(*up, return_lse=True, is_causal=True,
                                                    alignment="lower_right")
    err = np.abs(got.astype(np.float64) - exact)
    bound = 0.5 * ulp(exact, dtype)
    assert (err <= bound + f32_slack(exact, pyattn_score_bound(q, k))).all()
    np.testing.assert_allclose(lse, lse32, rtol=1e-5)


@pytest.mark.parametrize("dtype", HALVES, ids=ids)
def test_split_keys_round_once(kernel, dtype):
    """Two key chunks of 1024: the first averages to just above the middle of
    adjacent numbers a < b, the second is -a.  Exactly, the result is about
    (b - a) / 4; with the first chunk's output rounded to b, it becomes
    (b - a) / 2, twice as large.  The reference (float32, rounded once) and
    one rounding of the exact value agree on (b - a) / 4."""
    a, b = adjacent_with_odd_first(dtype)
    S = 2048
    v = np.empty((1, 1, S, 4), dtype=dtype)
    v[..., :513, :], v[..., 513:1024, :], v[..., 1024:, :] = b, a, -a
    q = np.zeros((1, 1, 1, 8), dtype)  # every score 0: equal weights, exactly
    k = np.ones((1, 1, S, 8), dtype)
    assert _plan.split_keys(1, S) == 1024
    exact = 513 * (np.float64(b) - np.float64(a)) / S
    want = ref.scaled_dot_product_attention(q, k, v)
    assert_rounded_once(want, np.full(want.shape, exact), dtype)
    got = sdpa(q, k, v)
    assert_rounded_once(got, np.full(got.shape, exact), dtype)


@pytest.mark.parametrize("weights", ["heads", "mean"])
@pytest.mark.parametrize("dtype", HALVES, ids=ids)
def test_weights_path(kernel, dtype, weights, rng):
    """functional.attention with weights: float32 probabilities, the output
    still one rounding of the float32 computation."""
    q, k, v = half_inputs(rng, dtype, (2, 4, 13, 16), (2, 2, 40, 16), (2, 2, 40, 8))
    mask = rng.random((13, 40)) < 0.8
    kwargs = dict(attn_mask=mask, is_causal=True, enable_gqa=True)
    out, probs, lse = functional.attention(q, k, v, weights=weights, return_lse=True,
                                         precision="exact", **kwargs)
    check_against_reference(out, q, k, v, dtype, lse=lse, **kwargs)
    assert probs.dtype == np.float32
    up = [a.astype(np.float32) for a in (q, k, v)]
    kr = np.repeat(up[1], 2, axis=1)
    scores = up[0] @ kr.swapaxes(-1, -2) / np.float32(4.0)
    scores = np.where(mask & np.tri(13, 40, dtype=bool), scores, -np.inf)
    want = ref.softmax(scores.astype(np.float64))
    if weights == "mean":
        want = want.mean(axis=1)
    np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", HALVES, ids=ids)
def test_strided_inputs_give_the_contiguous_result(kernel, dtype, rng):
    big = [rng.standard_normal(s).astype(np.float32).astype(dtype)
           for s in [(3, 8, 30, 40), (3, 4, 90, 20), (3, 4, 90, 24), (2, 4, 16, 70)]]
    q = big[0][::2, 1::2, ::-2, 3:35:2]       # (2, 4, 15, 16), a negative row stride
    k = big[1][1:, ::-1, :70, 2:18]           # (2, 4, 70, 16), heads reversed
    v = big[2][1:, :, 10:80, ::-2]            # (2, 4, 70, 12), a negative column stride
    kt = big[3].swapaxes(-1, -2)              # (2, 4, 70, 16), column-major rows
    qb = np.broadcast_to(q[:, :1], q.shape)   # one query head, broadcast (stride 0)
    kw = dict(is_causal=True, alignment="lower_right")
    for args in [(q, k, v), (qb, kt, v), (q[..., :1, :], kt, v)]:
        got = sdpa(*args, **kw)
        same = sdpa(*(np.ascontiguousarray(a) for a in args), **kw)
        assert np.array_equal(got.view(np.uint16), same.view(np.uint16))
        check_against_reference(got, *args, dtype, **kw)


def test_misaligned_half_input_is_copied(kernel, rng):
    raw = rng.standard_normal((5, 8)).astype(np.float16)
    buf = np.zeros(raw.nbytes + 1, np.uint8)[1:]  # an odd byte offset
    mis = np.ndarray((5, 8), np.float16, buffer=buf)
    mis[...] = raw
    assert not mis.flags.aligned
    got = sdpa(mis, raw, mis)
    assert np.array_equal(got.view(np.uint16), sdpa(raw, raw, raw).view(np.uint16))


@pytest.mark.parametrize("dtype", HALVES, ids=ids)
@pytest.mark.parametrize("L", [1, 3, 40])
def test_out(kernel, dtype, L, rng):
    q, k, v = half_inputs(rng, dtype, (2, 8, L, 16), (2, 2, 70, 16), (2, 2, 70, 12))
    want = sdpa(q, k, v, enable_gqa=True, is_causal=True)
    out = np.empty((2, 8, L, 12), dtype)
    assert sdpa(q, k, v, enable_gqa=True, is_causal=True, out=out) is out
    assert np.array_equal(out.view(np.uint16), want.view(np.uint16))
    storage = np.full((2, 8, L, 36), 3, dtype)
    strided = storage[..., ::3]
    sdpa(q, k, v, enable_gqa=True, is_causal=True, out=strided, num_threads=1)
    assert np.array_equal(strided.view(np.uint16), want.view(np.uint16))
    assert (storage[..., 1::3] == 3).all() and (storage[..., 2::3] == 3).all()
    with pytest.raises(TypeError, match=r"out has dtype float32; the result has dtype"):
        sdpa(q, k, v, enable_gqa=True, out=np.empty((2, 8, L, 12), np.float32))


# ==========================================================================
# 2. Rounding: to nearest, ties to even
# ==========================================================================

def adjacent_with_odd_first(dtype, near=1.0):
    """Two adjacent numbers of `dtype` near `near`, the first with an odd
    last significand bit."""
    a = np.array([near], dtype)
    if a.view(np.uint16)[0] % 2 == 0:
        a = (a.view(np.uint16) + 1).view(dtype)
    return a[0], (a.view(np.uint16) + 1).view(dtype)[0]


@pytest.mark.parametrize("L", [1, 3, 40])
@pytest.mark.parametrize("dtype", HALVES, ids=ids)
def test_halfway_cases_round_to_even(kernel, dtype, L, rng):
    """With every score equal (q = 0) and two keys, each output is exactly the
    mean of two values, computed exactly in float32.  The means of adjacent
    numbers are halfway cases: they must go to the one with an even last bit,
    whichever side it is on; means of numbers two apart are representable."""
    n = 64
    starts = np.concatenate([rng.uniform(0.01, 1000, n // 2), -rng.uniform(0.01, 1000, n // 2)])
    lo = np.array(starts, dtype)
    bits = lo.view(np.uint16)
    hi = (bits + 1).view(dtype)             # the neighbour away from zero
    two_apart = (bits + 2).view(dtype)
    v = np.stack([np.concatenate([lo, lo]), np.concatenate([hi, two_apart])])  # (2, 2n)
    v = np.broadcast_to(v, (1, 1, 2, 2 * n))
    q = np.zeros((1, 1, L, 4), dtype)
    k = rng.standard_normal((1, 1, 2, 4)).astype(dtype)
    got = sdpa(q, k, v)
    assert got.dtype == np.dtype(dtype)
    even = np.where(bits % 2 == 0, bits, bits + 1).view(dtype)  # of lo and hi
    want = np.concatenate([even, hi])  # the mean of lo and lo + 2 ulp is hi
    for row in got[0, 0]:
        assert np.array_equal(row.view(np.uint16), want.view(np.uint16)), (row, want)
    # the reference computes in float32 and rounds the same way
    ref_out = ref.scaled_dot_product_attention(q, k, v)
    assert np.array_equal(ref_out.view(np.uint16), got.view(np.uint16))


@pytest.mark.parametrize("dtype", HALVES, ids=ids)
def test_representable_outputs_are_exact(kernel, dtype, rng):
    """Rows of V that are all equal: the output is that row, whatever the
    weights (their sum is 1 up to float32 rounding, far below half an ulp)."""
    row = rng.standard_normal(24).astype(np.float32).astype(dtype)
    for L, S in [(1, 50), (3, 700), (40, 300), (1, 3000)]:
        q, k, _ = half_inputs(rng, dtype, (1, 2, L, 16), (1, 2, S, 16), (1, 1, 1, 1))
        v = np.broadcast_to(row, (1, 2, S, 24))
        got = sdpa(q, k, v, is_causal=True, alignment="lower_right")
        assert np.array_equal(got.view(np.uint16),
                              np.broadcast_to(row, got.shape).view(np.uint16))


@pytest.mark.parametrize("dtype", HALVES, ids=ids)
def test_special_values(kernel, dtype):
    """Large values stay finite, NaN stays NaN, the smallest subnormal is
    kept (not flushed to zero)."""
    info = {"float16": (65504.0, 2.0**-24), "bfloat16": (2.0**120, 2.0**-133)}
    big, tiny = info[np.dtype(dtype).name]
    q = np.zeros((1, 4, 8), dtype)
    k = np.zeros((1, 2, 8), dtype)
    v = np.array([[[big, tiny, 1.0, np.nan], [big, tiny, 1.0, 1.0]]], dtype)
    got = sdpa(q, k, v)
    assert got.dtype == np.dtype(dtype)
    assert float(got[0, 0, 0]) == float(np.array(big, dtype))  # mean of equal values: exact
    assert float(got[0, 0, 1]) == float(np.array(tiny, dtype)) > 0
    assert float(got[0, 0, 2]) == 1.0 and np.isnan(got[0, :, 3]).all()


# ==========================================================================
# 3. Masks, dtypes and errors
# ==========================================================================

@pytest.mark.parametrize("mask_dtype", [np.float32, np.float64, np.float16], ids=ids)
@pytest.mark.parametrize("dtype", HALVES, ids=ids)
def test_float_masks_of_any_float_dtype(kernel, dtype, mask_dtype, rng):
    q, k, v = half_inputs(rng, dtype, (2, 2, 6, 8), (2, 2, 30, 8), (2, 2, 30, 8))
    bias = rng.standard_normal((6, 30)).astype(mask_dtype)
    bias[:, ::7] = -np.inf
    got = sdpa(q, k, v, attn_mask=bias)
    check_against_reference(got, q, k, v, dtype, attn_mask=bias)
    # the same as the float32 mask with the values it holds
    same = sdpa(q, k, v, attn_mask=bias.astype(np.float32))
    assert np.array_equal(got.view(np.uint16), same.view(np.uint16))


@needs_bf16
def test_bfloat16_mask(kernel, rng):
    q, k, v = half_inputs(rng, bfloat16, (1, 2, 6, 8), (1, 2, 30, 8), (1, 2, 30, 8))
    bias = rng.standard_normal((6, 30)).astype(bfloat16)
    got = sdpa(q, k, v, attn_mask=bias)
    assert np.array_equal(got.view(np.uint16),
                          sdpa(q, k, v, attn_mask=bias.astype(np.float32)).view(np.uint16))


@pytest.mark.parametrize("dtype", HALVES, ids=ids)
def test_mixing_dtypes_is_refused(dtype):
    half = np.zeros((2, 3, 4), dtype)
    for other in [np.float32, np.float64] + ([np.float16] if dtype is not np.float16 else
                                             [bfloat16] if bfloat16 is not None else []):
        full = np.zeros((2, 3, 4), other)
        for args in [(half, full, full), (full, half, full), (half, half, full),
                     (full, full, half)]:
            with pytest.raises(TypeError, match="must share one dtype"):
                sdpa(*args)
            with pytest.raises(TypeError, match="must share one dtype"):
                ref.scaled_dot_product_attention(*args)


@pytest.mark.parametrize("dtype", HALVES, ids=ids)
def test_half_merge_attention(kernel, dtype, rng):
    """Parts computed in half precision merge with their float32 logsumexps."""
    q, k, v = half_inputs(rng, dtype, (1, 2, 5, 8), (1, 2, 60, 8), (1, 2, 60, 8))
    o1, l1 = sdpa(q, k[..., :25, :], v[..., :25, :], return_lse=True)
    o2, l2 = sdpa(q, k[..., 25:, :], v[..., 25:, :], return_lse=True)
    whole, whole_lse = sdpa(q, k, v, return_lse=True)
    out = np.empty_like(whole)
    assert pyattn.merge_attention([o1, o2], [l1, l2], out=out)[0] is out
    # the parts were rounded, then the merge: one ulp of the largest |v|
    atol = float(ulp(np.abs(v.astype(np.float64)).max(), dtype))
    np.testing.assert_allclose(out.astype(np.float64), whole.astype(np.float64), rtol=0,
                               atol=atol)
    merged, lse = pyattn.merge_attention([o1, o2], [l1, l2])
    assert lse.dtype == np.float32
    np.testing.assert_allclose(lse, whole_lse, rtol=1e-6)
    np.testing.assert_allclose(merged.astype(np.float64), whole.astype(np.float64), rtol=0,
                               atol=atol)
    with pytest.raises(TypeError, match="lses must have dtype float32"):
        pyattn.merge_attention([o1, o2], [l1.astype(np.float64), l2.astype(np.float64)])


@pytest.mark.parametrize("dtype", HALVES, ids=ids)
def test_half_merge_attention_keeps_the_dtype(dtype):
    o = np.zeros((1, 2, 4), dtype)
    lse = np.zeros((1, 2), np.float32)
    assert pyattn.merge_attention([o, o], [lse, lse])[0].dtype == np.dtype(dtype)


@pytest.mark.parametrize("dtype", HALVES, ids=ids)
def test_every_kernel_has_the_half_dtypes(kernel, dtype):
    name = np.dtype(dtype).name
    assert _attention.has_dtype(kernel, name)
    assert _attention.block_rows(kernel, name) == _attention.block_rows(kernel, "float32")


# ==========================================================================
# 4. A half-precision KVCache
# ==========================================================================

@pytest.mark.parametrize("dtype", HALVES, ids=ids)
@pytest.mark.parametrize("L, lengths", [(1, [90, 90]), (1, [90, 31]), (3, [90, 31]),
                                        (1, [3000])], ids=str)
def test_kv_cache_decode(kernel, dtype, L, lengths, rng):
    B, hq, hkv = len(lengths), 8, 2
    n = max(lengths)
    cache = pyattn.KVCache(B, hkv, 16, dtype=dtype, value_dim=8)
    k, v = half_inputs(rng, dtype, (B, hkv, n, 16), (B, hkv, n, 8), (1,))[:2]
    cache.append(k, v, lengths=lengths)
    assert cache.keys.dtype == np.dtype(dtype) and cache.keys.itemsize == 2
    q = rng.standard_normal((B, hq, L, 16)).astype(np.float32).astype(dtype)
    got, lse = pyattn.decode_attention(q, cache, return_lse=True, softcap=5.0)
    keys, values = cache.keys.copy(), cache.values.copy()
    for b, m in enumerate(lengths):  # storage past a length is unused
        keys[b, :, m:] = values[b, :, m:] = 0
    kwargs = dict(is_causal=True, alignment="lower_right", kv_lengths=cache.lengths,
                  enable_gqa=True, softcap=5.0)
    if n > 2048:  # one rounding per key chunk (of at most max|v|), then one of the merge
        exact = ref.scaled_dot_product_attention(
            q.astype(np.float32), keys.astype(np.float32), values.astype(np.float32), **kwargs)
        err = np.abs(got.astype(np.float64) - exact)
        vmax = np.abs(values.astype(np.float64)).max()
        bound = 0.5 * ulp(exact, dtype) + 0.5 * ulp(vmax, dtype) + f32_slack(exact, 10.0)
        assert (err <= bound).all()
    else:
        check_against_reference(got, q, keys, values, dtype, lse=lse, **kwargs)
    # and the float32 cache on the same numbers gives the unrounded result
    cache32 = pyattn.KVCache(B, hkv, 16, value_dim=8)
    cache32.append(k.astype(np.float32), v.astype(np.float32), lengths=lengths)
    full = pyattn.decode_attention(q.astype(np.float32), cache32, softcap=5.0)
    if n <= 2048:
        assert_rounded_once(got, full, dtype, 10.0)


@pytest.mark.parametrize("dtype", HALVES, ids=ids)
def test_kv_cache_generation_loop(kernel, dtype, rng):
    cache = pyattn.KVCache(1, 2, 8, dtype=dtype)
    q, k, v = half_inputs(rng, dtype, (1, 4, 20, 8), (1, 2, 20, 8), (1, 2, 20, 8))
    for t in range(20):
        cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        got = pyattn.decode_attention(q[:, :, t:t + 1], cache)
        whole = sdpa(q[:, :, :t + 1], k[:, :, :t + 1], v[:, :, :t + 1], is_causal=True,
                     enable_gqa=True)
        assert_neighbours(got, whole[:, :, -1:], dtype)
