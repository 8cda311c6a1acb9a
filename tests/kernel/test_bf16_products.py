"""bfloat16 products: the "amx" (TDPBF16PS) and "avx512_bf16" (VDPBF16PS)
kernel sets, and precision=.

What the tiled path of those sets computes (csrc/products_bf16.h): q, k and
v rounded to bfloat16 (to nearest, ties to even; bfloat16 inputs as they
are), S = Q K^T as bfloat16 products accumulated in float32, the scale
folded into Q before its rounding where that rounds nothing more (see
folded_scale), else applied to the float32 scores, the online softmax in
float32, each weight p_j rounded to bfloat16 for P V (accumulated in
float32), and the softmax's sum l adding the weights before that rounding
(since 71ae8b7; before, the rounded ones).  The direct (decode) path,
blocks of fewer than 8 query rows with no weights requested, is exact
float32.

The error model (check_result), in u = 2**-8, bfloat16's unit roundoff:

* Weights.  Rounding turns p_j into p_j (1 + d_j), |d_j| <= u, while l
  sums the p_j, so the output is sum_j w_j (1 + d_j) v_j, w the exact
  weights (with a sink too: its term is in l), and

      |err| = |sum_j w_j d_j v_j| <= u sum_j w_j |v_j|,

  the reference's attention over |v|.  Split keys merge such partials with
  float32 weights, which keeps the bound.  The weights' exp (weights_exp2,
  relative error 3e-6, 0.08% of u) is in C = 1.02.  The bound is attained
  in the worst case only (d_j of the signs of v_j); the cases here reach
  0.6-0.7 of it (C = 0.6 fails some).
* lse = m + log(l): float32's precision, but for the weights' exp in l:
  3e-6 (EXP_ERR).
* float32 arithmetic: score errors of (E + 4) * eps32 * the score bound
  (Cauchy-Schwarz, as Helpers.score_bound, plus mask, ALiBi and sink
  magnitudes) move weights by twice that; l and P V sum S terms
  (S * eps32).
* Output rounding: half an ulp of the output dtype.

It is applied against pyattn.reference in float64 on the inputs the
products read (q * folded scale, k, v rounded to bfloat16: the identity for
bfloat16 inputs); a query row may instead fit the direct path's exact
float32 computation (the last rows of L or of a q_lengths past a multiple
of the block, a few heads as rows).  For float32 and float16 inputs the
result is also held against the reference on the inputs as given, adding
the effect of their rounding: each score moves by at most D = (2u + u^2)
|scale| sum_i |q_i k_i|, so each weight by a factor within e^(+-2D), and v
by u: (e^(2D) - 1 + u e^(2D)) * sum_j w_j |v_j|.
test_the_error_model_rejects_wrong_results shows the check fails on two
swapped keys, a dropped last key, a 1% scale error and padding keys taking
part.

Pinned corners: the direct path keeps the exact kernel's bits past one key
tile (test_decode_past_one_exact_key_tile: the bfloat16 and float32 key
tiles agree); tiny normal q against huge k stays normal, as the scale is
then not folded into Q (test_tiny_q_against_huge_k); the bfloat16 units
flush float32 subnormal products to zero (test_products_below_float32s_
normal_range, xfail: a hardware limit); a decode row with 8 or more query
heads per key head runs as a tiled block of heads, so it takes the products
(the "gqa_heads_as_rows" case).
"""
import functools
import hashlib
import json
import math
import textwrap

import numpy as np
import pytest
from support import ALL_MODIFIERS_CASE, USABLE_KERNELS, bfloat16, using_kernel

import pyattn
from pyattn import _attention, _config, _dispatch, _plan, functional
from pyattn import reference as ref

if bfloat16 is None:
    pytest.skip("bfloat16 products are tested on bfloat16 arrays: needs ml_dtypes",
                allow_module_level=True)

sdpa = pyattn.scaled_dot_product_attention

U = 2.0 ** -8                     # bfloat16's unit roundoff (8 significant bits)
EPS32 = float(np.finfo(np.float32).eps)
C = 1.02                          # margin over the weights' rounding bound (see the top)
EXP_ERR = 3e-6                    # relative error of the weights' exp (weights_exp2)
BF16 = np.dtype(bfloat16)

BF16_KERNELS = [k for k in USABLE_KERNELS if _attention.has_bf16_products(k, "bfloat16")]
NO_BF16 = ("this CPU has no bfloat16 units (avx512_bf16/AMX): usable kernels are "
           + ", ".join(USABLE_KERNELS))
BF16_PARAMS = BF16_KERNELS or [pytest.param(None, id="no-bf16-units",
                                            marks=pytest.mark.skip(reason=NO_BF16))]
EXACT_KERNELS = [k for k in USABLE_KERNELS if k not in BF16_KERNELS]

# (input dtype, precision) that take bfloat16 products on a bfloat16 set
PRODUCTS = [pytest.param(bfloat16, None, id="bfloat16-default"),
            pytest.param(np.float32, "bf16", id="float32-bf16"),
            pytest.param(np.float16, "bf16", id="float16-bf16")]


@pytest.fixture(params=BF16_PARAMS)
def bf16_kernel(request, monkeypatch):
    """Runs the test on every usable kernel set with bfloat16 products (or
    skips, saying why, on a CPU with none)."""
    monkeypatch.setattr(_dispatch, "KERNEL", request.param)
    return request.param


def needs_dtype(kernel, dtype):
    name = np.dtype(dtype).name
    if not _attention.has_dtype(kernel, name):
        pytest.skip(f"this build has no {name} kernels")


def bits(a):
    """The bytes of an array, for bitwise comparison (NaN == NaN)."""
    a = np.asarray(a)
    return a.view(f"u{a.itemsize}")


def same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(bits(a), bits(b))


# --------------------------------------------------------------------------
# The error model
# --------------------------------------------------------------------------

FORMAT = {"float16": (11, -13), "bfloat16": (8, -125), "float32": (24, -125)}


def ulp(x, dtype):
    """The spacing of `dtype`'s numbers around |x| (x a float64 array)."""
    p, e_min = FORMAT[np.dtype(dtype).name]
    x = np.abs(np.asarray(x, np.float64))
    _, e = np.frexp(x)
    e = np.where(x == 0, e_min, np.maximum(e, e_min))
    return np.ldexp(1.0, e - p)


def as64(a):
    return np.asarray(a).astype(np.float64)


def to_bf16(a):
    """Values rounded to bfloat16 as the kernels do (to nearest even, from
    float32, which holds float16 and float32 exactly), as float64."""
    return np.asarray(a).astype(np.float32).astype(bfloat16).astype(np.float64)


def folded_scale(dtype, E, scale=None, q=None):
    """The part of the scale the tiled path multiplies into Q (in float32)
    before rounding Q to bfloat16, as csrc/products_bf16.h's q_scale and
    pack_q: all of it when |scale| <= 1 (no q * scale can overflow) and the
    fold rounds nothing more: float32 and float16 Q is rounded anyway,
    bfloat16 Q stays exact only under a power of two; and when no q * scale
    falls below float32's normal range (the bfloat16 units would read it as
    0; the kernel decides per block of rows, this per call, which the
    tests' inputs make the same).  Otherwise 1: the float32 scores are
    scaled after the products."""
    scale = 1 / math.sqrt(E) if scale is None else float(scale)
    a = abs(scale)
    exact = np.dtype(dtype) != BF16 or math.frexp(a)[0] == 0.5
    if not (0 < a <= 1 and exact):
        return 1.0
    if q is not None:
        y = np.abs(np.asarray(q).astype(np.float32) * np.float32(scale))
        if ((y > 0) & (y < np.finfo(np.float32).tiny)).any():
            return 1.0
    return float(np.float32(scale))


def products_inputs(q, k, v, kwargs):
    """What the bfloat16 products read, as float64 (q with its folded scale),
    and the kwargs that finish the scores."""
    fold = folded_scale(np.asarray(q).dtype, q.shape[-1], kwargs.get("scale"), q)
    qh = to_bf16(np.asarray(q).astype(np.float32) * np.float32(fold))
    kwargs = dict(kwargs)
    if fold != 1.0:
        kwargs["scale"] = 1.0
    return qh, to_bf16(k), to_bf16(v), kwargs


def reference_kwargs(kwargs):
    """kwargs for the float64 reference: a float mask with its values in
    float64 (a bool mask as it is)."""
    out = dict(kwargs)
    mask = out.get("attn_mask")
    if mask is not None and mask.dtype != np.bool_:
        out["attn_mask"] = as64(mask)
    return out


def score_magnitude(q, k, kwargs):
    """An upper bound of |score|: |scale| max|q| max|k| (Cauchy-Schwarz, as
    conftest's Helpers.score_bound), plus what the mask, ALiBi and sinks
    add; for the float32 terms of the model."""
    scale = kwargs.get("scale")
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    norm = lambda a: float(np.sqrt((as64(a) ** 2).sum(axis=-1)).max(initial=0.0))  # noqa: E731
    bound = abs(scale) * norm(q) * norm(k)
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.dtype != np.bool_:
        fin = np.isfinite(as64(mask))
        bound += float(np.abs(as64(mask)[fin]).max(initial=0.0))
    if kwargs.get("alibi_slopes") is not None:
        bound += float(np.abs(kwargs["alibi_slopes"]).max()) * max(q.shape[-2], k.shape[-2])
    if kwargs.get("sinks") is not None:
        s = np.asarray(kwargs["sinks"], np.float64)
        bound += float(np.abs(s[np.isfinite(s)]).max(initial=0.0))
    return bound


def where(bad, *arrays):
    idx = np.argwhere(bad)[:4]
    return "; ".join(f"at {tuple(map(int, i))}: " + ", ".join(f"{a[tuple(i)]:.6g}" for a in arrays)
                     for i in idx)


def score_rounding_error(q, k, kwargs):
    """Per row: D = (2u + u^2) |scale| max_j sum_i |q_i k_ji|, the most
    rounding q and k to bfloat16 moves a score (softcap only shrinks
    differences; masks, ALiBi and sinks are added unrounded)."""
    aq, ak = np.abs(as64(q)), np.abs(as64(k))
    if kwargs.get("enable_gqa") and ak.ndim >= 3 and ak.shape[-3] not in (1, aq.shape[-3]):
        ak = np.repeat(ak, aq.shape[-3] // ak.shape[-3], axis=-3)
    scale = kwargs.get("scale")
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    return (2 * U + U * U) * abs(scale) * (aq @ np.swapaxes(ak, -1, -2)).max(axis=-1)


def attention_terms(q, k, v, kwargs):
    """The float64 reference's output, lse and sum_j w_j |v_j| (its
    attention over |v|) for q, k, v (float64) and kwargs."""
    kwargs = reference_kwargs(kwargs)
    with np.errstate(all="ignore"):
        out, lse = ref.scaled_dot_product_attention(q, k, v, return_lse=True, **kwargs)
        mad = ref.scaled_dot_product_attention(q, k, np.abs(v), **kwargs)
    return out, as64(lse), mad


def check_result(got, q, k, v, lse=None, **kwargs):
    """`got` (and `lse`) of a call with bfloat16 products on q, k, v and
    kwargs, against the float64 reference, by the model at the top: each
    query row (output and lse) fits the tiled model, or the direct path's
    exact float32 one (blocks of fewer than 8 rows: the last rows of L, of
    a sequence's q_lengths, a few heads as rows)."""
    got = np.asarray(got)
    dtype = np.asarray(q).dtype
    assert got.dtype == dtype
    g = as64(got)
    E, S = q.shape[-1], k.shape[-2]
    # the tiled model: the inputs the products read
    qh, kh, vh, kwh = products_inputs(q, k, v, kwargs)
    want, want_lse, mad = attention_terms(qh, kh, vh, kwh)
    assert g.shape == want.shape, (g.shape, want.shape)
    sb = max(1.0, score_magnitude(qh, kh, kwh))
    out_round = 0.5 * ulp(np.maximum(np.abs(want), np.abs(g)), dtype)
    bound = (C * U + EPS32 * (2 * (E + 4) * sb + S)) * mad + out_round
    lse_tol = C * EXP_ERR + EPS32 * ((E + 4) * sb + S + 4 * np.abs(want_lse))
    # the direct path's: exact float32 on the inputs as given
    want0, want0_lse, mad0 = attention_terms(as64(q), as64(k), as64(v), kwargs)
    sb0 = max(1.0, score_magnitude(q, k, kwargs))
    bound0 = EPS32 * (2 * (E + 4) * sb0 + S + 8) * (mad0 + np.abs(want0)) + out_round
    lse_tol0 = EPS32 * ((E + 4) * sb0 + S + 4 + 4 * np.abs(want0_lse))

    nan_differs = np.isnan(g) != np.isnan(want)
    assert not nan_differs.any(), f"NaN pattern: {where(nan_differs, g, want)}"
    fin = ~np.isnan(want)
    with np.errstate(invalid="ignore"):
        err, err0 = np.abs(g - want), np.abs(g - want0)
        fits = (~fin | (err <= bound)).all(axis=-1)
        fits0 = (~fin | (err0 <= bound0)).all(axis=-1)
    if lse is not None:
        lse = np.asarray(lse)
        assert lse.dtype == np.float32 and lse.shape == got.shape[:-1]
        for name, test in (("-inf", np.isneginf), ("NaN", np.isnan)):
            differs = test(lse) != test(want_lse)
            assert not differs.any(), f"lse {name} pattern: {where(differs, lse, want_lse)}"
        ok = np.isfinite(want_lse)
        with np.errstate(invalid="ignore"):  # -inf - -inf where not ok
            fits &= ~ok | (np.abs(lse - want_lse) <= lse_tol)
            fits0 &= ~ok | (np.abs(lse - want0_lse) <= lse_tol0)
    bad = ~(fits | fits0)
    if bad.any():
        ratio = np.where(fin, err / np.maximum(bound, 1e-300), 0).max(axis=-1)
        with np.errstate(invalid="ignore"):
            lse_ratio = (np.zeros(bad.shape) if lse is None else
                         np.where(ok, np.abs(lse - want_lse) / lse_tol, 0))
        raise AssertionError(
            f"{bad.sum()} of {bad.size} rows off the bfloat16 model (and not exact); "
            f"worst output err/bound {ratio[bad].max():.3f}, lse err/tol "
            f"{lse_ratio[bad].max():.3f}; rows (output err/bound, lse err/tol): "
            f"{where(bad, ratio, lse_ratio)}")

    if dtype != BF16:  # against the inputs as given, adding their rounding
        D = score_rounding_error(q, k, kwargs)[..., None]
        inputs = (np.expm1(2 * D) + U * np.exp(2 * D)) * mad0
        with np.errstate(invalid="ignore"):
            bad0 = fin & ~(err0 <= bound + inputs)
        assert not bad0.any(), f"off the reference on the given inputs: {where(bad0, g, want0)}"
    return want


def run(q, k, v, precision, **kwargs):
    """One call with return_lse and one without (the fast path where the call
    allows): the same launch, so the same bits."""
    got, lse = sdpa(q, k, v, precision=precision, return_lse=True, **kwargs)
    plain = sdpa(q, k, v, precision=precision, **kwargs)
    assert same_bits(plain, got)
    return got, lse


# --------------------------------------------------------------------------
# 1. Correctness on every path
# --------------------------------------------------------------------------

# name: (q shape, k shape, v shape, keywords); "attn_mask" strings are drawn
CASES = {
    "plain": ((2, 3, 37, 40), (2, 3, 77, 40), (2, 3, 77, 24), {}),
    "bool_mask": ((2, 3, 37, 40), (2, 3, 77, 40), (2, 3, 77, 24), dict(attn_mask="bool")),
    "bool_mask_full": ((2, 2, 20, 32), (2, 2, 90, 32), (2, 2, 90, 16),
                       dict(attn_mask="bool_full")),
    "additive_mask": ((2, 2, 20, 32), (2, 2, 90, 32), (2, 2, 90, 16), dict(attn_mask="float")),
    "additive_mask_broadcast": ((2, 3, 37, 40), (2, 3, 77, 40), (2, 3, 77, 24),
                                dict(attn_mask="float_broadcast")),
    "causal": ((2, 2, 37, 40), (2, 2, 77, 40), (2, 2, 77, 24), dict(is_causal=True)),
    # several key tiles (BLOCK_N is 128), tiles skipped above the diagonal
    "causal_lower_right": ((1, 2, 130, 32), (1, 2, 600, 32), (1, 2, 600, 16),
                           dict(is_causal=True, alignment="lower_right")),
    # L > S: the first L - S rows see no key (zeros, lse -inf)
    "causal_lower_right_tall": ((1, 2, 90, 32), (1, 2, 40, 32), (1, 2, 40, 16),
                                dict(is_causal=True, alignment="lower_right")),
    "window": ((1, 2, 200, 32), (1, 2, 600, 32), (1, 2, 600, 16),
               dict(window=(30, 10), alignment="lower_right")),
    "alibi": ((1, 4, 40, 32), (1, 4, 90, 32), (1, 4, 90, 16),
              dict(alibi_slopes=[0.5, 0.25, 0.125, 0.0625], is_causal=True)),
    "softcap": ((1, 2, 40, 32), (1, 2, 90, 32), (1, 2, 90, 16), dict(softcap=2.0, scale=1.0)),
    "sinks": ((1, 4, 40, 32), (1, 4, 90, 32), (1, 4, 90, 16),
              dict(sinks=[0.0, 3.0, -1.0, -np.inf])),
    "lengths": ((2, 2, 37, 40), (2, 2, 77, 40), (2, 2, 77, 24),
                dict(q_lengths=[37, 20], kv_lengths=[77, 33])),
    "gqa": ((2, 8, 20, 40), (2, 2, 77, 40), (2, 2, 77, 24), dict(enable_gqa=True)),
    # L = 1 with 8 query heads per key head: the heads run as the 8 rows of
    # one problem, a tiled block (so bfloat16 products, not the exact decode)
    "gqa_heads_as_rows": ((1, 16, 1, 40), (1, 2, 77, 40), (1, 2, 77, 24), dict(enable_gqa=True)),
    "modifiers": ALL_MODIFIERS_CASE,
    "scale": ((1, 2, 9, 16), (1, 2, 40, 16), (1, 2, 40, 16), dict(scale=0.9)),
    "negative_scale": ((1, 2, 9, 16), (1, 2, 40, 16), (1, 2, 40, 16), dict(scale=-0.3)),
    # odd sizes: E, Ev not multiples of 16 or 32, S not of 32, L around the blocks
    "odd_9": ((1, 2, 9, 40), (1, 2, 77, 40), (1, 2, 77, 24), {}),
    "odd_33": ((1, 1, 33, 17), (1, 1, 301, 17), (1, 1, 301, 5), {}),
    "odd_300": ((1, 1, 300, 72), (1, 1, 257, 72), (1, 1, 257, 40), dict(is_causal=True)),
    # 257 rows: the last block of one row takes the exact direct path
    "odd_257_e130": ((1, 1, 257, 130), (1, 1, 100, 130), (1, 1, 100, 33), {}),
    "two_dims": ((17, 8), (33, 8), (33, 5), {}),
    "broadcast_batch": ((3, 1, 2, 9, 8), (1, 4, 2, 20, 8), (3, 4, 1, 20, 8), {}),
}


def build(rng, dtype, name):
    qs, ks, vs, kwargs = CASES[name]
    q, k, v = (rng.standard_normal(s).astype(np.float32).astype(dtype) for s in (qs, ks, vs))
    kwargs = dict(kwargs)
    mask = kwargs.get("attn_mask")
    L, S = qs[-2], ks[-2]
    if mask == "bool":
        kwargs["attn_mask"] = rng.random((L, S)) < 0.7
    elif mask == "bool_full":
        kwargs["attn_mask"] = rng.random(qs[:-1] + (S,)) < 0.6
    elif mask == "float":
        m = rng.standard_normal(qs[:-1] + (S,)).astype(np.float32)
        m[rng.random(m.shape) < 0.2] = -np.inf
        kwargs["attn_mask"] = m
    elif mask == "float_broadcast":  # (H, 1, S): over the batch and the rows
        m = (2 * rng.standard_normal((qs[-3], 1, S))).astype(np.float32)
        m[..., ::5] = -np.inf
        kwargs["attn_mask"] = m
    return q, k, v, kwargs


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype, precision", PRODUCTS)
def test_matches_reference(bf16_kernel, dtype, precision, name, rng):
    needs_dtype(bf16_kernel, dtype)
    q, k, v, kwargs = build(rng, dtype, name)
    got, lse = run(q, k, v, precision, **kwargs)
    check_result(got, q, k, v, lse=lse, **kwargs)
    if "q_lengths" in kwargs:  # padding rows: zeros, lse -inf
        assert (got[1, :, kwargs["q_lengths"][1]:] == 0).all()
        assert np.isneginf(lse[1, :, kwargs["q_lengths"][1]:]).all()
    if name == "causal_lower_right_tall":
        assert (got[..., :50, :] == 0).all() and np.isneginf(lse[..., :50]).all()


@pytest.mark.parametrize("L", [9, 20])
@pytest.mark.parametrize("dtype, precision", PRODUCTS)
def test_split_keys(bf16_kernel, dtype, precision, L, rng, spy_split):
    """Few work items, many keys: the planner cuts the keys into chunks whose
    float32 partials are merged, then rounded once."""
    needs_dtype(bf16_kernel, dtype)
    q, k, v = (rng.standard_normal(s).astype(np.float32).astype(dtype)
               for s in [(1, 1, L, 16), (1, 1, 5000, 16), (1, 1, 5000, 8)])
    kwargs = dict(is_causal=True, alignment="lower_right")
    got, lse = run(q, k, v, precision, **kwargs)
    assert spy_split and spy_split[-1] > 0, "the keys were not split"
    check_result(got, q, k, v, lse=lse, **kwargs)


@pytest.mark.parametrize("weights", ["heads", "mean"])
@pytest.mark.parametrize("L", [3, 13])
@pytest.mark.parametrize("dtype, precision", PRODUCTS)
def test_weights(bf16_kernel, dtype, precision, L, weights, rng):
    """functional.attention(weights=...): the tiled path even for L < 8.  The
    probabilities are e^(s - m) / l recomputed in float32 from the scores of
    the bfloat16 products, l the sum of the weights before their rounding:
    float32-accurate on the inputs the products read, but for the weights'
    exp in l (EXP_ERR); a mean of such values too."""
    needs_dtype(bf16_kernel, dtype)
    q, k, v = (rng.standard_normal(s).astype(np.float32).astype(dtype)
               for s in [(2, 4, L, 40), (2, 2, 77, 40), (2, 2, 77, 24)])
    mask = rng.random((L, 77)) < 0.8
    kwargs = dict(attn_mask=mask, is_causal=True, enable_gqa=True)
    out, probs, lse = functional.attention(q, k, v, weights=weights, return_lse=True,
                                           precision=precision, **kwargs)
    check_result(out, q, k, v, lse=lse, **kwargs)
    assert probs.dtype == np.float32
    qh, kh, _, kwh = products_inputs(q, k, v, {})
    kh = np.repeat(kh, 2, axis=1)
    scores = qh @ kh.swapaxes(-1, -2) * kwh.get("scale", 1 / math.sqrt(40))
    scores = np.where(mask & np.tri(L, 77, dtype=bool), scores, -np.inf)
    want = ref.softmax(scores)
    if weights == "mean":
        want = want.mean(axis=1)
    sb = max(1.0, score_magnitude(qh, kh, kwh))
    rtol = C * EXP_ERR + EPS32 * (2 * 44 * sb + 77 + 8)
    err = np.abs(probs - want)
    assert (err <= rtol * want + 1e-30).all(), (err / np.maximum(want, 1e-30)).max() / rtol
    if L >= 8:  # the same tiled computation as without weights (no split here)
        assert same_bits(out, sdpa(q, k, v, precision=precision, **kwargs))


# --------------------------------------------------------------------------
# 2. The decode path stays exact; layouts, out= and threads change no bit
# --------------------------------------------------------------------------

DECODE = {
    "plain": ((2, 3, None, 40), (2, 3, 300, 40), (2, 3, 300, 24), {}),
    "masked": ((2, 3, None, 40), (2, 3, 300, 40), (2, 3, 300, 24),
               dict(attn_mask="bool", is_causal=True, alignment="lower_right")),
    "modifiers": ((2, 4, None, 16), (2, 2, 90, 16), (2, 2, 90, 16),
                  dict(enable_gqa=True, is_causal=True, alignment="lower_right",
                       window=(30, None), alibi_slopes=[0.5, 0.25, 0.125, 0.0625],
                       softcap=3.0, sinks=[0.0, 1.0, -1.0, -np.inf], kv_lengths=[90, 33])),
    # L = 1 and 4 query heads per key head: heads as the 4 rows, still direct
    "gqa_heads_as_rows": ((1, 8, None, 40), (1, 2, 300, 40), (1, 2, 300, 24),
                          dict(enable_gqa=True)),
    # a split of the keys: each chunk is a direct block too
    "split": ((1, 1, None, 16), (1, 1, 5000, 16), (1, 1, 5000, 8), {}),
}


@pytest.mark.parametrize("name", DECODE)
@pytest.mark.parametrize("L", [1, 3, 7])
@pytest.mark.parametrize("dtype, precision", PRODUCTS)
def test_decode_path_is_exact(bf16_kernel, dtype, precision, L, name, rng):
    """Fewer than 8 query rows and no weights: the direct path, exact float32,
    so the same bits as precision="exact" (output and lse)."""
    needs_dtype(bf16_kernel, dtype)
    qs, ks, vs, kwargs = DECODE[name]
    if name == "gqa_heads_as_rows" and L > 1:
        pytest.skip("heads run as rows for one query row only")
    qs = qs[:2] + (L,) + qs[3:]
    q, k, v = (rng.standard_normal(s).astype(np.float32).astype(dtype) for s in (qs, ks, vs))
    kwargs = dict(kwargs)
    if kwargs.get("attn_mask") == "bool":
        kwargs["attn_mask"] = rng.random((L, ks[-2])) < 0.7
    got, lse = run(q, k, v, precision, **kwargs)
    exact, exact_lse = run(q, k, v, "exact", **kwargs)
    assert same_bits(got, exact) and same_bits(lse, exact_lse)


def test_decode_past_one_exact_key_tile(bf16_kernel):
    """The smallest case of test_decode_path_is_exact that fails on amx (a
    kernel bug, found by this file): one float32 query row, 129 keys.  amx's
    bfloat16-products instance tiles keys by 256 (BF16_BLOCK_N) where the
    exact float32 instance tiles by 128, and its direct path walks its own
    tiles: the online softmax rescales at other places, so float32 rounds
    differently (output off by up to 3e-8, as accurate as the exact one, not
    the same bits; from S = 129 on, and for bfloat16 inputs too, where the
    lse shows it).  avx512_bf16 tiles both by 128 and passes."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s).astype(np.float32)
               for s in [(1, 1, 1, 40), (1, 1, 129, 40), (1, 1, 129, 24)])
    assert same_bits(sdpa(q, k[..., :128, :], v[..., :128, :], precision="bf16"),
                     sdpa(q, k[..., :128, :], v[..., :128, :], precision="exact"))
    got = sdpa(q, k, v, precision="bf16")
    exact = sdpa(q, k, v, precision="exact")
    assert same_bits(got, exact), f"max |bf16 - exact| = {np.abs(got - exact).max():.3g}"


def strided_views(rng, dtype, L):
    """(q, k, v) views with negative, column and zero strides, and the
    contiguous copies; E = 72 and Ev = 40 mix the 32-wide vector conversions
    with element-wise ones."""
    big = [rng.standard_normal(s).astype(np.float32).astype(dtype)
           for s in [(3, 8, 2 * L, 150), (3, 4, 200, 80), (3, 4, 200, 82), (2, 4, 72, 150)]]
    q = big[0][::2, 1::2, ::-2, 3:147:2]       # (2, 4, L, 72), a negative row stride
    k = big[1][1:, ::-1, :150, 4:76]           # (2, 4, 150, 72), heads reversed
    v = big[2][1:, :, 20:170, ::-2][..., :40]  # (2, 4, 150, 40), a negative column stride
    kt = big[3].swapaxes(-1, -2)               # (2, 4, 150, 72), column-major rows
    qb = np.broadcast_to(q[:, :1], q.shape)    # one query head, broadcast (stride 0)
    return q, k, v, kt, qb


@pytest.mark.parametrize("dtype, precision", PRODUCTS)
def test_strided_inputs_give_the_contiguous_result(bf16_kernel, dtype, precision, rng):
    """Layouts change no bit.  L = the block size + 1 puts a one-row (exact,
    direct) block after a tiled one, both reading the same packed panels."""
    needs_dtype(bf16_kernel, dtype)
    block = _attention.block_rows(bf16_kernel, np.dtype(dtype).name, True)
    for L in (15, block + 1):
        q, k, v, kt, qb = strided_views(rng, dtype, L)
        kw = dict(is_causal=True, alignment="lower_right", precision=precision)
        for args in [(q, k, v), (qb, kt, v), (q, kt, v[:, :1])]:
            for threads in (1, 2):
                got = sdpa(*args, num_threads=threads, **kw)
                same = sdpa(*(np.ascontiguousarray(a) for a in args), num_threads=threads, **kw)
                assert same_bits(got, same), (L, threads, [a.strides for a in args])
        check_result(got, *args, is_causal=True, alignment="lower_right")


@pytest.mark.parametrize("dtype, precision",
                         [*PRODUCTS, pytest.param(np.float32, "exact", id="float32-exact")])
@pytest.mark.parametrize("pattern", [dict(is_causal=True), dict(window=(70, 10))],
                         ids=["causal", "window"])
def test_skipped_columns_change_no_bit(bf16_kernel, dtype, precision, pattern, rng):
    """Causal and window patterns compute only the columns each row group
    can see; the same pattern as a boolean mask computes every column and
    masks them.  Both give the same bits: what is skipped weighs 0."""
    needs_dtype(bf16_kernel, dtype)
    L, S = 300, 600
    q, k, v = (rng.standard_normal(s).astype(np.float32).astype(dtype)
               for s in [(1, 2, L, 40), (1, 2, S, 40), (1, 2, S, 24)])
    left, right = pattern.get("window", (S, 0))
    i, j = np.arange(L)[:, None] + (S - L), np.arange(S)[None, :]
    mask = (j >= i - left) & (j <= i + right)
    kw = dict(alignment="lower_right", precision=precision, return_lse=True)
    got, lse = sdpa(q, k, v, **pattern, **kw)
    masked, masked_lse = sdpa(q, k, v, attn_mask=mask, **kw)
    assert same_bits(got, masked) and same_bits(lse, masked_lse)
    check_result(got, q, k, v, attn_mask=mask)


@pytest.mark.parametrize("dtype, precision", PRODUCTS)
def test_out_and_threads_change_no_bit(bf16_kernel, dtype, precision, rng, exact_threads):
    needs_dtype(bf16_kernel, dtype)
    q, k, v = (rng.standard_normal(s).astype(np.float32).astype(dtype)
               for s in [(2, 8, 40, 40), (2, 2, 300, 40), (2, 2, 300, 24)])
    kw = dict(enable_gqa=True, is_causal=True, precision=precision)
    want = sdpa(q, k, v, num_threads=1, **kw)
    assert same_bits(sdpa(q, k, v, num_threads=2, **kw), want)
    storage = np.full((2, 8, 40, 72), 3, dtype)
    out = storage[..., ::3]
    assert sdpa(q, k, v, out=out, num_threads=2, **kw) is out
    assert same_bits(out, want) and (storage[..., 1::3] == 3).all()
    # split keys too: the chunks never depend on the team
    q1, k1, v1 = q[:1, :1, :9], np.repeat(k[:1, :1], 17, axis=2), np.repeat(v[:1, :1], 17, axis=2)
    assert _plan.split_keys(1, k1.shape[-2]) > 0
    assert same_bits(sdpa(q1, k1, v1, num_threads=1, precision=precision),
                     sdpa(q1, k1, v1, num_threads=2, precision=precision))


# --------------------------------------------------------------------------
# 3. Rounding: what the products read, and the logsumexp
# --------------------------------------------------------------------------

def rounding_cases():
    """float32 values at and around bfloat16's halfway points: ties to even
    both ways (1 + 2^-8 -> 1, 1 + 3 2^-8 -> 1 + 2^-6), just above and below
    a tie, negatives, and values bfloat16 holds."""
    t = 2.0 ** -8
    base = [1 + t, 1 + 3 * t, 1 + t + 2 ** -20, 1 + t - 2 ** -20, 1 + 2 * t, 1.0,
            -(1 + t), -(1 + 3 * t), 3 + 2 ** -6, 0.1, -0.7, 1234.5]
    return np.array(base + [x * 0.375 for x in base], np.float32)  # 24 values


@pytest.mark.parametrize("dtype", [np.float32, np.float16, bfloat16],
                         ids=lambda d: np.dtype(d).name)
def test_q_k_v_are_rounded_to_nearest_even(bf16_kernel, dtype):
    """One key (its weight is e^0 = 1, exactly): each row's lse is its score
    and the output is bf16(v).  The score is bf16(q * scale) . bf16(k) where
    the scale is folded into Q (see folded_scale), else bf16(q) . bf16(k)
    times the scale, in float32; the key here is (1, ...), so the score shows
    q's rounding."""
    needs_dtype(bf16_kernel, dtype)
    c = rounding_cases()
    if np.dtype(dtype) == BF16:  # values bfloat16 holds: the rounding is the scale's
        c = c.astype(bfloat16).astype(np.float32)
    c = c.astype(dtype)
    n = c.size
    c32 = c.astype(np.float32)
    q = np.zeros((1, 1, n, 4), dtype)
    q[0, 0, :, 0] = c                            # score r = c[r] * k0
    k = np.array([[[[1, 0.5, -2, 3]]]], dtype)   # one key
    v = c.reshape(1, 1, 1, n)                    # its value row
    bf = lambda x: x.astype(bfloat16).astype(np.float32)  # noqa: E731  (from float32: RNE)
    for scale in (1.0, 1 / 3, 0.5, -0.25, 3.0):
        s32 = np.float32(scale)
        if folded_scale(dtype, 4, scale) != 1.0:
            want = bf(c32 * s32)
        else:
            want = bf(c32) * s32
        out, lse = sdpa(q, k, v, scale=scale, precision="bf16", return_lse=True)
        assert np.array_equal(lse[0, 0], want), (scale, lse[0, 0] - want)
        assert same_bits(out[0, 0], np.broadcast_to(bf(c32).astype(dtype), (n, n)))
        out, lse = sdpa(q, k, v, scale=scale, precision="exact", return_lse=True)
        assert np.array_equal(lse[0, 0], c32 * s32)
        assert same_bits(out[0, 0], np.broadcast_to(c, (n, n)))
    # and the second lane of a bfloat16 pair (element 1 of q and k)
    q2 = np.zeros((1, 1, n, 4), dtype)
    q2[0, 0, :, 1] = c
    _, lse = sdpa(q2, np.array([[[[0, 1, 0, 0]]]], dtype), v, scale=1.0, precision="bf16",
                  return_lse=True)
    assert np.array_equal(lse[0, 0], bf(c32))


@pytest.mark.parametrize("dtype, precision", PRODUCTS)
def test_lse_keeps_float32_precision(bf16_kernel, dtype, precision, rng):
    """The softmax's sum l adds the weights before their rounding to bfloat16,
    so the logsumexp keeps float32's precision.  q and k are multiples of 1/8
    in [-1/2, 1/2] and E = 64 (scale 1/8): every score is exact in float32,
    so the error is the weights' exp in l (EXP_ERR), l's float32 sum of S
    terms and the last roundings.  Summing the rounded weights instead puts l
    off by u |sum_j w_j d_j|: emulated on these shapes, 4e-4..5e-4, 5-22
    times this tolerance (the kernels measure 0.02-0.05 of it)."""
    needs_dtype(bf16_kernel, dtype)
    for L, S in [(40, 128), (300, 600)]:
        q, k = (rng.integers(-4, 5, s).astype(dtype) / np.array(8, dtype)
                for s in [(1, 2, L, 64), (1, 2, S, 64)])
        v = rng.standard_normal((1, 2, S, 16)).astype(np.float32).astype(dtype)
        _, lse = sdpa(q, k, v, precision=precision, return_lse=True)
        _, want, _ = attention_terms(as64(q), as64(k), as64(v), {})
        tol = C * EXP_ERR + EPS32 * (S + 4 + 4 * np.abs(want))
        err = np.abs(lse - want)
        assert (err <= tol).all(), (L, S, err.max(), (err / tol).max())


def test_the_error_model_rejects_wrong_results(bf16_kernel, rng):
    """The check is tight enough to see real mistakes: results with two keys'
    values swapped, without the last key, with a 1% scale error, or with the
    zero padding keys of the last tile taking part, all fail it (measured:
    the worst row 2-150 times its bound).  Rounding the inputs moves a
    random result less than the weights' bound, so that q, k and v are
    rounded, and how, is test_q_k_v_are_rounded_to_nearest_even's."""
    q, k, v = (rng.standard_normal(s).astype(np.float32).astype(bfloat16)
               for s in [(2, 3, 37, 40), (2, 3, 77, 40), (2, 3, 77, 24)])
    check_result(sdpa(q, k, v), q, k, v)  # the right one passes
    perm = np.arange(77)
    perm[[5, 60]] = perm[[60, 5]]  # two keys swap their values
    pad = np.zeros((2, 3, 19, 40), bfloat16)  # keys 77..95 of the padded tile, K = V = 0
    wrong = {
        "shuffled key": sdpa(q, k[..., perm, :], v),
        "last key dropped": sdpa(q, k[..., :-1, :], v[..., :-1, :]),
        "scale 1% off": sdpa(q, k, v, scale=1.01 / math.sqrt(40)),
        "padding keys weighed": sdpa(q, np.concatenate([k, pad], axis=-2),
                                     np.concatenate([v, pad[..., :24]], axis=-2)),
    }
    for what, got in wrong.items():
        with pytest.raises(AssertionError, match="off the bfloat16 model"):
            check_result(got, q, k, v)
            pytest.fail(f"the check accepted the result with a {what}")


# --------------------------------------------------------------------------
# 4. precision= semantics
# --------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["BF16", "bfloat16", "fast", "", 16, True, b"bf16", ("bf16",)])
def test_invalid_precision_is_refused(bad):
    x = np.ones((1, 9, 8), np.float32)
    for call in (sdpa, functional.attention):
        with pytest.raises(ValueError, match="precision"):
            call(x, x, x, precision=bad)
        with pytest.raises(ValueError, match="precision"):  # the general path too
            call(x, x, x, attn_mask=np.ones((9, 9), bool), precision=bad)


def test_precision_names_and_rules():
    assert _attention.PRECISIONS == (None, "exact", "bf16")
    wants = {p: [d for d in ("float32", "float16", "bfloat16")
                 if _attention.wants_bf16_products(p, d)] for p in _attention.PRECISIONS}
    assert wants == {None: ["bfloat16"], "exact": [], "bf16": ["float32", "float16", "bfloat16"]}
    for kernel in _attention.kernel_names():  # float64 never has them
        assert not _attention.has_bf16_products(kernel, "float64")
    assert not _attention.has_bf16_products("no-such-kernel", "float32")


TILED = [(2, 3, 40, 40), (2, 3, 300, 40), (2, 3, 300, 24)]


def tiled_inputs(rng, dtype):
    return [rng.standard_normal(s).astype(np.float32).astype(dtype) for s in TILED]


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
def test_defaults_and_float64_are_exact(bf16_kernel, dtype, rng):
    """float32 and float16 inputs are never silently rounded to bfloat16:
    their default is "exact"; float64 is exact even when "bf16" is asked."""
    needs_dtype(bf16_kernel, dtype)
    q, k, v = tiled_inputs(rng, dtype)
    mask = rng.random((40, 300)) < 0.8
    for kw in [{}, dict(attn_mask=mask, is_causal=True)]:
        exact = sdpa(q, k, v, precision="exact", **kw)
        assert same_bits(sdpa(q, k, v, **kw), exact)
        assert same_bits(functional.attention(q, k, v, **kw)[0], exact)
        if dtype == np.float64:
            assert same_bits(sdpa(q, k, v, precision="bf16", **kw), exact)
        else:  # while "bf16" really changes them
            assert not same_bits(sdpa(q, k, v, precision="bf16", **kw), exact)


def test_bfloat16_default_takes_the_products(bf16_kernel, rng):
    q, k, v = tiled_inputs(rng, bfloat16)
    got = sdpa(q, k, v)
    assert same_bits(got, sdpa(q, k, v, precision="bf16"))
    assert same_bits(got, functional.attention(q, k, v)[0])
    assert not same_bits(got, sdpa(q, k, v, precision="exact"))


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, bfloat16],
                         ids=lambda d: np.dtype(d).name)
def test_exact_precision_is_the_avx512_kernel(bf16_kernel, dtype, rng):
    """precision="exact" on a bfloat16 set runs the avx512 set's computation."""
    if "avx512" not in USABLE_KERNELS:
        pytest.skip("the avx512 kernel set is not usable here")
    needs_dtype(bf16_kernel, dtype)
    q, k, v = tiled_inputs(rng, dtype)
    mask = rng.random((300,)) < 0.9
    for L in (3, 40):
        for kw in [dict(is_causal=True), dict(attn_mask=mask, softcap=4.0, return_lse=True)]:
            got = sdpa(q[..., :L, :], k, v, precision="exact", **kw)
            with using_kernel("avx512"):
                want = sdpa(q[..., :L, :], k, v, precision="exact", **kw)
            if not kw.get("return_lse"):
                got, want = (got,), (want,)
            for a, b in zip(got, want):
                assert same_bits(a, b), (L, sorted(kw))


@pytest.mark.parametrize("kernel", EXACT_KERNELS or [pytest.param(None, marks=pytest.mark.skip(
    reason="every usable kernel set has bfloat16 products"))])
@pytest.mark.parametrize("dtype", [np.float32, bfloat16], ids=lambda d: np.dtype(d).name)
def test_sets_without_bf16_units_run_exact(kernel, dtype, rng, monkeypatch):
    monkeypatch.setattr(_dispatch, "KERNEL", kernel)
    assert not _attention.has_bf16_products(kernel, np.dtype(dtype).name)
    q, k, v = tiled_inputs(rng, dtype)
    exact = sdpa(q, k, v, precision="exact")
    assert same_bits(sdpa(q, k, v, precision="bf16"), exact)
    assert same_bits(sdpa(q, k, v), exact)


# --------------------------------------------------------------------------
# 5. Special values
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, precision", PRODUCTS)
def test_nan_propagates_like_the_reference(bf16_kernel, dtype, precision, rng):
    """A NaN in a query row makes that row (and its lse) NaN, no other; one in
    a key makes every row that sees it NaN; one in a value makes its column
    NaN (in every row: 0 * NaN is NaN, in the reference's matmul too)."""
    needs_dtype(bf16_kernel, dtype)
    for where_nan in ("q", "k", "v"):
        q, k, v = (rng.standard_normal(s).astype(np.float32).astype(dtype)
                   for s in [(1, 2, 40, 40), (1, 2, 77, 40), (1, 2, 77, 24)])
        {"q": q, "k": k, "v": v}[where_nan][0, 1, 10, 3] = np.nan
        with np.errstate(invalid="ignore"):
            got, lse = sdpa(q, k, v, is_causal=True, precision=precision, return_lse=True)
            want, want_lse = ref.scaled_dot_product_attention(
                as64(q), as64(k), as64(v), is_causal=True, return_lse=True)
        nan = np.isnan(got)
        assert nan.any() and np.array_equal(nan, np.isnan(want)), where_nan
        assert np.array_equal(np.isnan(lse), np.isnan(want_lse)), where_nan
        if where_nan == "q":
            assert nan[0, 1, 10].all() and nan.sum() == 24
        fin = ~nan
        got[nan] = want[nan] = 0
        err = np.abs(as64(got) - want)[fin]
        assert (err <= 2 * U * np.abs(as64(v)[np.isfinite(as64(v))]).max()).all()


@pytest.mark.parametrize("dtype, precision", PRODUCTS)
def test_rows_with_no_key(bf16_kernel, dtype, precision, rng):
    """A row whose keys are all False or -inf: zeros, lse -inf; a row where
    every key has finfo(float32).min added: in float32 every score becomes that
    number, so equal weights: the mean of (bfloat16-rounded) V, as the
    reference computes in float32 for bfloat16 inputs."""
    needs_dtype(bf16_kernel, dtype)
    q, k, v = (rng.standard_normal(s).astype(np.float32).astype(dtype)
               for s in [(1, 2, 40, 40), (1, 2, 77, 40), (1, 2, 77, 24)])
    boolean = rng.random((40, 77)) < 0.7
    boolean[3] = False
    got, lse = sdpa(q, k, v, attn_mask=boolean, precision=precision, return_lse=True)
    assert (got[:, :, 3] == 0).all() and np.isneginf(lse[:, :, 3]).all()
    assert np.isfinite(lse[:, :, np.arange(40) != 3]).all()
    add = np.zeros((40, 77), np.float32)
    add[3] = -np.inf
    add[5] = np.finfo(np.float32).min
    got, lse = sdpa(q, k, v, attn_mask=add, precision=precision, return_lse=True)
    assert (got[:, :, 3] == 0).all() and np.isneginf(lse[:, :, 3]).all()
    mean = to_bf16(v).mean(axis=-2)
    err = np.abs(as64(got[:, :, 5]) - mean)
    assert (err <= 0.5 * ulp(mean, dtype) + 77 * EPS32 * np.abs(to_bf16(v)).max()).all()
    assert (lse[:, :, 5] == np.finfo(np.float32).min).all()


@pytest.mark.parametrize("dtype, precision", PRODUCTS)
def test_extreme_magnitudes_the_reference_handles(bf16_kernel, dtype, precision, rng):
    """q of 1e30 against k of 1e-30 (each representable in bfloat16, their
    products of order 1), and a scale of 1e15 on q of 1e-15: the model holds
    as for unit inputs."""
    needs_dtype(bf16_kernel, dtype)
    if np.dtype(dtype) == np.float16:
        pytest.skip("float16 holds neither 1e30 nor 1e-15")
    a, b = rng.standard_normal((1, 2, 40, 40)), rng.standard_normal((1, 2, 77, 40))
    v = rng.standard_normal((1, 2, 77, 24)).astype(np.float32).astype(dtype)
    q, k = (a * 1e30).astype(np.float32).astype(dtype), (b * 1e-30).astype(np.float32).astype(dtype)
    got, lse = sdpa(q, k, v, precision=precision, return_lse=True)
    check_result(got, q, k, v, lse=lse)
    q, k = (a * 1e-15).astype(np.float32).astype(dtype), b.astype(np.float32).astype(dtype)
    got, lse = sdpa(q, k, v, scale=1e15, precision=precision, return_lse=True)
    check_result(got, q, k, v, lse=lse, scale=1e15)


@pytest.mark.parametrize("dtype, precision", PRODUCTS[:2])
def test_tiny_q_against_huge_k(bf16_kernel, dtype, precision, rng):
    """Every q element in [2^-125, 2^-124), every k element in [2^124, 2^125):
    normal numbers in float32 and bfloat16, their products of order 1, the
    scores of order 1, as the reference and the exact kernels compute them
    (error ~1e-3 for bfloat16 inputs).  Folding a scale of 1/8 (E = 64) into
    Q first makes q * scale subnormal, which the bfloat16 conversion and
    products flush to 0: every score 0, equal weights (error ~0.7, 80-125
    times the model's bound).  Fails with the scale folded (see
    folded_scale); with the scale applied to the float32 scores, as before
    the fold (q_scale in csrc/products_bf16.h), the same inputs pass: a
    scale of 1.5, never folded, here."""
    sign = lambda shape: rng.choice([-1.0, 1.0], shape)  # noqa: E731
    q = (sign((1, 1, 16, 64)) * rng.uniform(1, 2, (1, 1, 16, 64)) * 2.0 ** -125).astype(dtype)
    k = (sign((1, 1, 40, 64)) * rng.uniform(1, 2, (1, 1, 40, 64)) * 2.0 ** 124).astype(dtype)
    v = rng.standard_normal((1, 1, 40, 8)).astype(dtype)
    assert (np.abs(as64(q)) >= 2.0 ** -126).all() and np.isfinite(as64(k)).all()
    got, lse = sdpa(q, k, v, scale=1.5, precision=precision, return_lse=True)
    check_result(got, q, k, v, lse=lse, scale=1.5)  # |scale| > 1: never folded; passes
    got, lse = sdpa(q, k, v, precision=precision, return_lse=True)
    check_result(got, q, k, v, lse=lse)


@pytest.mark.xfail(strict=True, reason="VDPBF16PS and TDPBF16PS treat denormal inputs as zero "
                   "and flush denormal results (they ignore MXCSR): a product below float32's "
                   "normal range is 0, which a huge scale then makes visible")
def test_products_below_float32s_normal_range(bf16_kernel, rng):
    """q and k of 1e-20 (bfloat16 holds them), products of 1e-40 (float32
    subnormals), times a scale of 1e38: scores of order 1, which the
    reference and the exact kernels compute (error ~1e-7); the bfloat16
    products flush them to 0, so every weight is equal (error ~3e-2)."""
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in
               [(1, 2, 40, 40), (1, 2, 77, 40), (1, 2, 77, 24)])
    q, k = (q * 1e-20).astype(bfloat16), (k * 1e-20).astype(bfloat16)
    v = v.astype(bfloat16)
    got, lse = sdpa(q, k, v, scale=1e38, return_lse=True)
    check_result(got, q, k, v, lse=lse, scale=1e38)


# --------------------------------------------------------------------------
# 6. Accuracy against PyTorch's bfloat16 attention
# --------------------------------------------------------------------------

def to_torch(torch, a):
    return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)


@functools.lru_cache(maxsize=None)
def accuracy_problem(N, D):
    """Fixed-seed N(0, 1) bfloat16 inputs (1, 2, N, D), the float64 reference
    on them (by blocks of query rows: rows are independent), and torch's
    absolute errors."""
    torch = pytest.importorskip("torch", reason="the accuracy bar is PyTorch's bfloat16 SDPA")
    rng = np.random.default_rng(1000 * N + D)
    q, k, v = (rng.standard_normal((1, 2, N, D)).astype(bfloat16) for _ in range(3))
    k64, v64 = as64(k), as64(v)
    want = np.concatenate([ref.scaled_dot_product_attention(as64(q[..., r:r + 512, :]), k64, v64)
                           for r in range(0, N, 512)], axis=-2)
    with torch.no_grad():
        t = torch.nn.functional.scaled_dot_product_attention(
            *(to_torch(torch, a) for a in (q, k, v)))
    t = t.contiguous().view(torch.int16).numpy().view(bfloat16)
    return q, k, v, want, np.abs(as64(t) - want)


# 4096: about 6 s of the float64 reference, within this file's budget
@pytest.mark.parametrize("N, D", [(128, 64), (128, 128), (1024, 64), (1024, 128), (4096, 64),
                                  (4096, 128)], ids=str)
def test_accuracy_against_torch(bf16_kernel, N, D):
    """On the same bfloat16 tensors, pyattn's mean absolute error against the
    float64 reference is at most 1.25x torch's (measured: 0.99-1.04x), its
    maximum at most 2x.  The maximum is an extreme-value statistic dominated
    by the rounding of the output to bfloat16 (half an ulp of the largest
    outputs outweighs the rest of the error): measured 0.74-1.76x torch's
    across seeds and kernels (1.0-1.47x on these seeds), median about 1.15x,
    so 2x is its bar."""
    q, k, v, want, torch_err = accuracy_problem(N, D)
    err = np.abs(as64(sdpa(q, k, v)) - want)
    assert err.mean() <= 1.25 * torch_err.mean(), (err.mean(), torch_err.mean())
    assert err.max() <= 2.0 * torch_err.max(), (err.max(), torch_err.max())
    # and the products ran: exact ones are more accurate (measured 0.6-0.7x)
    exact_err = np.abs(as64(sdpa(q, k, v, precision="exact")) - want)
    assert exact_err.mean() < 0.85 * err.mean()


# --------------------------------------------------------------------------
# 7. Dispatch and configuration
# --------------------------------------------------------------------------

def test_which_sets_have_bf16_products():
    """amx and avx512_bf16, for every dtype computed in float32, and no other
    set; USABLE_KERNELS decides which of them this CPU runs."""
    for kernel in USABLE_KERNELS:
        has = [_attention.has_bf16_products(kernel, d) for d in ("float32", "bfloat16")]
        assert has == [kernel in ("amx", "avx512_bf16")] * 2, kernel
        if _attention.has_dtype(kernel, "float16"):
            assert _attention.has_bf16_products(kernel, "float16") == has[0]
    assert BF16_KERNELS == [k for k in USABLE_KERNELS if k in ("amx", "avx512_bf16")]


@pytest.mark.parametrize("kernel", USABLE_KERNELS)
def test_config_reports_bf16_products(kernel, monkeypatch, capsys):
    monkeypatch.setattr(_dispatch, "KERNEL", kernel)
    has = kernel in BF16_KERNELS
    assert _config.config()["bf16_products"] is has
    assert pyattn.config()["bf16_products"] is has
    pyattn.show_config()
    lines = [line.split(":", 1) for line in capsys.readouterr().out.splitlines()]
    assert {key.strip(): value.strip() for key, value in lines}["bf16_products"] == str(has)


CHILD = textwrap.dedent("""
    import hashlib, json
    import ml_dtypes
    import numpy as np
    import pyattn
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal(s).astype(ml_dtypes.bfloat16)
               for s in [(1, 2, 40, 40), (1, 2, 77, 40), (1, 2, 77, 24)])
    out = pyattn.scaled_dot_product_attention(q, k, v)
    cfg = pyattn.config()
    print(json.dumps({"kernel": cfg["kernel"], "bf16_products": cfg["bf16_products"],
                      "digest": hashlib.sha256(out.tobytes()).hexdigest()}))
""")


@pytest.mark.parametrize("isa", ["amx", "avx512_bf16", "avx512"])
def test_pyattn_isa_selects_the_set(isa, helpers, tmp_path):
    """PYATTN_ISA picks the set in a fresh interpreter, which then computes
    what that set computes here (bfloat16 products or not)."""
    if isa not in USABLE_KERNELS:
        pytest.skip(f"{isa} is not usable on this CPU (usable: {', '.join(USABLE_KERNELS)})")
    proc = helpers.run_python(CHILD, cwd=tmp_path, PYATTN_ISA=isa)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["kernel"] == isa
    assert got["bf16_products"] is (isa in BF16_KERNELS)
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal(s).astype(bfloat16)
               for s in [(1, 2, 40, 40), (1, 2, 77, 40), (1, 2, 77, 24)])
    with using_kernel(isa):
        here = sdpa(q, k, v)
    assert got["digest"] == hashlib.sha256(here.tobytes()).hexdigest()
    exact = sdpa(q, k, v, precision="exact")
    assert (got["digest"] == hashlib.sha256(exact.tobytes()).hexdigest()) is (
        isa not in BF16_KERNELS)
