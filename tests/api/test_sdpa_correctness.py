"""pyattn.scaled_dot_product_attention against the pure-NumPy reference and
against facts that need no reference (means, one-hot softmaxes, invariances)."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import FULL as DTYPES
from support import draw_batch, ids, random_mask

import pyattn
from pyattn import _attention
from pyattn import reference as ref

sdpa = pyattn.scaled_dot_product_attention


# --------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------

SHAPE_CASES = {
    # name: (query shape, key shape, value shape, kwargs, expected output shape)
    "L1_S1_E1": ((1, 1, 1, 1), (1, 1, 1, 1), (1, 1, 1, 1), {}, (1, 1, 1, 1)),
    "L1_long_S": ((2, 3, 1, 16), (2, 3, 200, 16), (2, 3, 200, 16), {}, (2, 3, 1, 16)),
    "S1_long_L": ((2, 2, 100, 8), (2, 2, 1, 8), (2, 2, 1, 8), {}, (2, 2, 100, 8)),
    "E1": ((1, 2, 33, 1), (1, 2, 47, 1), (1, 2, 47, 5), {}, (1, 2, 33, 5)),
    "E256": ((1, 2, 70, 256), (1, 2, 90, 256), (1, 2, 90, 256), {}, (1, 2, 70, 256)),
    "E256_Ev3": ((1, 1, 33, 256), (1, 1, 65, 256), (1, 1, 65, 3), {}, (1, 1, 33, 3)),
    "L_ne_S_Ev_ne_E": ((2, 3, 17, 16), (2, 3, 29, 16), (2, 3, 29, 5), {}, (2, 3, 17, 5)),
    "Ev_gt_E": ((1, 2, 9, 3), (1, 2, 11, 3), (1, 2, 11, 40), {}, (1, 2, 9, 40)),
    "odd_everything": ((3, 5, 37, 13), (3, 5, 71, 13), (3, 5, 71, 19), {}, (3, 5, 37, 19)),
    "gqa_8_2": ((2, 8, 20, 16), (2, 2, 30, 16), (2, 2, 30, 16), {"enable_gqa": True},
                (2, 8, 20, 16)),
    "gqa_6_3": ((1, 6, 19, 8), (1, 3, 23, 8), (1, 3, 23, 12), {"enable_gqa": True},
                (1, 6, 19, 12)),
    "gqa_same_heads": ((1, 4, 9, 8), (1, 4, 9, 8), (1, 4, 9, 8), {"enable_gqa": True},
                       (1, 4, 9, 8)),
    "kv_one_head_broadcast": ((2, 4, 21, 8), (2, 1, 25, 8), (2, 1, 25, 8), {}, (2, 4, 21, 8)),
    "q_one_head_broadcast": ((2, 1, 21, 8), (2, 3, 25, 8), (2, 3, 25, 8), {}, (2, 3, 21, 8)),
    "multi_batch": ((2, 3, 2, 11, 8), (2, 3, 2, 13, 8), (2, 3, 2, 13, 8), {}, (2, 3, 2, 11, 8)),
    "batch_broadcast": ((2, 1, 2, 11, 8), (1, 3, 2, 13, 8), (3, 2, 13, 6), {},
                        (2, 3, 2, 11, 6)),
    "batch_broadcast_q_fewer_dims": ((2, 11, 8), (4, 2, 13, 8), (4, 2, 13, 8), {},
                                     (4, 2, 11, 8)),
    "three_d": ((3, 10, 8), (3, 12, 8), (3, 12, 4), {}, (3, 10, 4)),
    "two_d": ((10, 8), (12, 8), (12, 4), {}, (10, 4)),
    "two_d_query_3d_kv": ((10, 8), (3, 12, 8), (3, 12, 4), {}, (3, 10, 4)),
    "five_d_gqa_causal": ((2, 1, 4, 70, 8), (1, 2, 2, 70, 8), (2, 2, 2, 70, 8),
                          {"enable_gqa": True, "is_causal": True}, (2, 2, 4, 70, 8)),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("case", list(SHAPE_CASES))
def test_shapes_match_reference(case, dtype, rng, helpers):
    qs, ks, vs, kwargs, out_shape = SHAPE_CASES[case]
    q, k, v = helpers.qkv(rng, qs, ks, vs, dtype)
    got = sdpa(q, k, v, **kwargs)
    assert got.shape == out_shape
    assert got.dtype == dtype
    helpers.assert_close(got, ref.scaled_dot_product_attention(q, k, v, **kwargs))


def test_gqa_equals_repeated_heads(rng, helpers):
    """Query head h uses key/value head h // (Hq / Hkv)."""
    q, k, v = helpers.qkv(rng, (2, 6, 33, 16), (2, 3, 40, 16), (2, 3, 40, 7))
    got = sdpa(q, k, v, enable_gqa=True)
    rep = sdpa(q, np.repeat(k, 2, axis=1), np.repeat(v, 2, axis=1))
    helpers.assert_close(got, rep)
    # The grouping is h // group (not h % Hkv): check one head directly.
    helpers.assert_close(got[:, 1], sdpa(q[:, 1], k[:, 0], v[:, 0]))
    helpers.assert_close(got[:, 4], sdpa(q[:, 4], k[:, 2], v[:, 2]))


def test_gqa_key_and_value_head_broadcast_separately(rng, helpers):
    """Key with 1 head and value with Hkv heads: each broadcasts on its own (as
    PyTorch's repeat_interleave of each)."""
    q, k, v = helpers.qkv(rng, (4, 5, 8), (1, 6, 8), (2, 6, 3), np.float64)
    got = sdpa(q, k, v, enable_gqa=True)
    expected = ref.scaled_dot_product_attention(q, np.repeat(k, 4, axis=0),
                                                np.repeat(v, 2, axis=0))
    helpers.assert_close(got, expected)


def test_batch_items_are_independent(rng, helpers):
    q, k, v = helpers.qkv(rng, (3, 2, 70, 16), (3, 2, 50, 16), (3, 2, 50, 8))
    mask = rng.random((3, 1, 70, 50)) < 0.8
    got = sdpa(q, k, v, attn_mask=mask, is_causal=True)
    for b in range(3):
        helpers.assert_close(got[b], sdpa(q[b], k[b], v[b], attn_mask=mask[b], is_causal=True))


# --------------------------------------------------------------------------
# Block boundaries, for every kernel this machine can run
# --------------------------------------------------------------------------

# Sizes around the tiles: key tiles (BLOCK_N) of 64 or 128 keys so far, and
# micro-tiles of up to 8 rows; BLOCK_M comes from each kernel.
EDGE_SIZES = [1, 2, 7, 63, 64, 65, 127, 128, 129]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_block_boundaries(kernel, dtype, causal, rng, helpers):
    """Every combination of row/key counts around the tile sizes, for each
    kernel: BLOCK_N keys per tile and the kernel's own BLOCK_M query rows.
    Blocks of fewer rows than a micro-tile take a separate (direct) path, so
    every small remainder after a full block is included too."""
    bm = _attention.block_rows(kernel, np.dtype(dtype).name)
    rows = sorted(set(EDGE_SIZES + list(range(1, 10)) + [bm - 1, bm, 2 * bm + 1]
                      + [bm + r for r in range(1, 10)]))
    keys = [1, 3, 63, 64, 65, 127, 128, 129, 255, 256, 257]
    for L in rows:
        for S in keys:
            q, k, v = helpers.qkv(rng, (1, 2, L, 11), (1, 2, S, 11), (1, 2, S, 9), dtype)
            got = sdpa(q, k, v, is_causal=causal)
            helpers.assert_close(got, ref.scaled_dot_product_attention(q, k, v, is_causal=causal))


@pytest.mark.parametrize("E,Ev", [(1, 1), (3, 5), (8, 8), (16, 17), (33, 31), (64, 64),
                                  (100, 7), (256, 256)])
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_head_widths(kernel, dtype, E, Ev, rng, helpers):
    """Widths around the micro-tile's vector widths (4/8/16 lanes)."""
    q, k, v = helpers.qkv(rng, (2, 67, E), (2, 70, E), (2, 70, Ev), dtype)
    mask = rng.random((67, 70)) < 0.9
    for kwargs in ({}, {"attn_mask": mask, "is_causal": True}):
        helpers.assert_close(sdpa(q, k, v, **kwargs),
                             ref.scaled_dot_product_attention(q, k, v, **kwargs))


# --------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------

B, HQ, L_, S_, E_ = 2, 3, 37, 150, 16
MASK_SHAPES = {
    "LS": (L_, S_),
    "1S": (1, S_),
    "L1": (L_, 1),
    "H1S": (HQ, 1, S_),
    "B1LS": (B, 1, L_, S_),
    "full": (B, HQ, L_, S_),
    "11": (1, 1),
    "S": (S_,),
    "scalar": (),
}


@pytest.mark.parametrize("causal", [False, True], ids=["nocausal", "causal"])
@pytest.mark.parametrize("shape", list(MASK_SHAPES))
@pytest.mark.parametrize("kind", ["bool", "float", "float_neginf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_mask_kinds_and_broadcasts(kernel, dtype, kind, shape, causal, rng, helpers):
    q, k, v = helpers.qkv(rng, (B, HQ, L_, E_), (B, HQ, S_, E_), (B, HQ, S_, 8), dtype)
    mask = random_mask(rng, kind, MASK_SHAPES[shape], dtype)
    got = sdpa(q, k, v, attn_mask=mask, is_causal=causal)
    expected = ref.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    assert not np.isnan(got).any()
    helpers.assert_close(got, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_mask_of_other_float_dtype_and_array_likes(dtype, rng, helpers):
    """A float mask of another float dtype counts as its values cast to the
    inputs' dtype; nested lists work as masks."""
    q, k, v = helpers.qkv(rng, (2, 30, 8), (2, 40, 8), (2, 40, 8), dtype)
    m64 = rng.standard_normal((30, 40))
    m64[rng.random((30, 40)) < 0.2] = -np.inf
    for mask in (m64, m64.astype(np.float32), m64.astype(np.float16)):
        expected = ref.scaled_dot_product_attention(q, k, v, attn_mask=mask.astype(dtype))
        helpers.assert_close(sdpa(q, k, v, attn_mask=mask), expected)
    helpers.assert_close(sdpa(q, k, v, attn_mask=m64.tolist()),
                         sdpa(q, k, v, attn_mask=m64.astype(dtype)))
    keep = rng.random((30, 40)) < 0.5
    assert np.array_equal(sdpa(q, k, v, attn_mask=keep.tolist()), sdpa(q, k, v, attn_mask=keep))


def test_masks_of_ml_dtypes_floats(rng, helpers):
    """float8 and bfloat16 masks (ml_dtypes' floats, some of NumPy kind "V")
    count as their values, as every float mask does; ml_dtypes' int4 is no
    float."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    q, k, v = helpers.qkv(rng, (2, 30, 8), (2, 40, 8), (2, 40, 8), np.float32)
    m = 3 * rng.standard_normal((30, 40))
    m[rng.random((30, 40)) < 0.2] = -np.inf
    for name in ("float8_e4m3fn", "float8_e5m2", "bfloat16"):
        mask = m.astype(getattr(ml_dtypes, name))
        expected = ref.scaled_dot_product_attention(q, k, v, attn_mask=mask.astype(np.float32))
        helpers.assert_close(sdpa(q, k, v, attn_mask=mask), expected)
    with pytest.raises(TypeError, match="^attn_mask has dtype int4; it must be bool"):
        sdpa(q, k, v, attn_mask=np.zeros((30, 40), ml_dtypes.int4))


def test_bool_mask_equals_neginf_float_mask(rng, helpers):
    q, k, v = helpers.qkv(rng, (2, 70, 16), (2, 130, 16), (2, 130, 8), np.float64)
    keep = rng.random((70, 130)) < 0.6
    additive = np.where(keep, 0.0, -np.inf)
    helpers.assert_close(sdpa(q, k, v, attn_mask=keep), sdpa(q, k, v, attn_mask=additive))


def test_zero_float_mask_is_no_mask(rng, helpers):
    q, k, v = helpers.qkv(rng, (2, 70, 16), (2, 130, 16), (2, 130, 8))
    helpers.assert_close(sdpa(q, k, v, attn_mask=np.zeros((70, 130), np.float32)),
                         sdpa(q, k, v))
    helpers.assert_close(sdpa(q, k, v, attn_mask=np.ones((1, 1), bool)), sdpa(q, k, v))


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_fully_masked_rows_are_exact_zeros(kernel, dtype, rng, helpers):
    L, S = 130, 129
    q, k, v = helpers.qkv(rng, (2, L, 16), (2, S, 16), (2, S, 8), dtype)
    dead = [0, 5, 63, 64, 65, 127, 129]
    keep = rng.random((L, S)) < 0.5
    keep[:, 0] = True
    keep[dead] = False
    additive = np.where(keep, rng.standard_normal((L, S)), -np.inf).astype(dtype)
    for mask in (keep, additive):
        for causal in (False, True):
            got = sdpa(q, k, v, attn_mask=mask, is_causal=causal)
            assert not np.isnan(got).any()
            assert np.array_equal(got[:, dead], np.zeros_like(got[:, dead]))
            alive = np.setdiff1d(np.arange(L), dead)
            assert np.abs(got[:, alive]).max() > 0
            helpers.assert_close(
                got, ref.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal))


def test_causal_and_mask_together_can_mask_a_row(rng, helpers):
    """Row 0 sees only key 0 under causality; masking key 0 leaves it nothing."""
    q, k, v = helpers.qkv(rng, (3, 66, 8), (3, 66, 8), (3, 66, 8))
    keep = np.ones((66, 66), bool)
    keep[:, 0] = False
    got = sdpa(q, k, v, attn_mask=keep, is_causal=True)
    assert np.array_equal(got[:, 0], np.zeros((3, 8), np.float32))
    helpers.assert_close(got[:, 1], v[:, 1])  # row 1 sees only key 1
    helpers.assert_close(got, ref.scaled_dot_product_attention(q, k, v, attn_mask=keep,
                                                               is_causal=True))


@pytest.mark.parametrize("only", [0, 1, 63, 64, 65, 127, 128, 129, 255, 256])
def test_single_visible_key_gives_its_value(kernel, only, rng, helpers):
    """When one key is visible, the output is exactly that key's value, in
    whichever key tile it lies."""
    q, k, v = helpers.qkv(rng, (70, 8), (257, 8), (257, 12))
    keep = np.zeros(257, bool)
    keep[only] = True
    got = sdpa(q, k, v, attn_mask=keep)
    helpers.assert_close(got, np.broadcast_to(v[only], (70, 12)))


@pytest.mark.parametrize("dtype,E,S", [(np.float64, 1024, 2048), (np.float64, 1024, 2200),
                                       (np.float32, 1024, 4200), (np.float32, 8, 3000)])
def test_long_wide_heads(kernel, dtype, E, S, rng, helpers):
    """Long sequences of wide heads, whose packed keys and values may exceed
    what a kernel keeps packed per thread (it then packs tile by tile); two
    query heads share each key/value head, and the query blocks end with a
    few rows."""
    bm = _attention.block_rows(kernel, np.dtype(dtype).name)
    L = bm + 2
    q, k, v = helpers.qkv(rng, (2, L, E), (1, S, E), (1, S, E), dtype)
    for kwargs in ({}, {"is_causal": True}):
        got = sdpa(q, k, v, **kwargs)
        expected = ref.scaled_dot_product_attention(q, k, v, **kwargs)
        helpers.assert_close(got, expected)
        assert np.array_equal(got, sdpa(q, k, v, num_threads=1, **kwargs))


# --------------------------------------------------------------------------
# Causality
# --------------------------------------------------------------------------

def test_causal_is_top_left_aligned(rng, helpers):
    """Query i sees keys j <= i, whatever L and S are (PyTorch's is_causal)."""
    E = 4
    for L, S in [(2, 5), (5, 2), (70, 3), (3, 70), (130, 130)]:
        q, k, v = helpers.qkv(rng, (L, E), (S, E), (S, 6), np.float64)
        got = sdpa(q, k, v, is_causal=True)
        helpers.assert_close(got[0], v[0])  # row 0 sees key 0 only
        for i in {0, 1, L // 2, L - 1}:
            n = min(i + 1, S)
            helpers.assert_close(got[i], sdpa(q[i:i + 1], k[:n], v[:n])[0])


@pytest.mark.parametrize("L,S", [(1, 200), (200, 1), (65, 130), (130, 65), (129, 64),
                                 (64, 129), (200, 200), (600, 600), (1000, 700), (700, 1000)])
def test_causal_l_ne_s_matches_reference(kernel, L, S, rng, helpers):
    for dtype in DTYPES:
        q, k, v = helpers.qkv(rng, (2, L, 8), (2, S, 8), (2, S, 8), dtype)
        helpers.assert_close(sdpa(q, k, v, is_causal=True),
                             ref.scaled_dot_product_attention(q, k, v, is_causal=True))


# --------------------------------------------------------------------------
# Values: scale, large logits, float64 accuracy, NaN
# --------------------------------------------------------------------------

def test_scale_default_and_explicit(rng, helpers):
    q, k, v = helpers.qkv(rng, (2, 40, 24), (2, 50, 24), (2, 50, 8), np.float64)
    assert np.array_equal(sdpa(q, k, v), sdpa(q, k, v, scale=1 / math.sqrt(24)))
    for scale in (0.5, 2.0, -1.0, np.float32(0.25), 3):
        helpers.assert_close(sdpa(q, k, v, scale=scale),
                             ref.scaled_dot_product_attention(q, k, v, scale=scale))
    helpers.assert_close(sdpa(q, k, v, scale=2.0), sdpa(q * 2 * math.sqrt(24), k, v))


def test_scale_zero_averages_the_visible_values(rng, helpers):
    q, k, v = helpers.qkv(rng, (1, 70, 8), (1, 130, 8), (1, 130, 5), np.float64)
    got = sdpa(q, k, v, scale=0.0)
    helpers.assert_close(got, np.broadcast_to(v.mean(axis=1, keepdims=True), got.shape))
    got = sdpa(q, k, v, scale=0, is_causal=True)
    expected = np.cumsum(v[0], axis=0)[:70] / np.arange(1, 71)[:, None]
    helpers.assert_close(got[0], expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_large_logits_do_not_overflow(kernel, dtype, rng, helpers):
    """Scores of order 1e2 .. 1e5: the softmax must subtract the running max.

    A score of size M carries a rounding error of about M * eps, which moves
    the weights by that much relatively; the tolerance grows accordingly
    (it matters in float32 for rows whose top two scores nearly tie)."""
    q, k, v = helpers.qkv(rng, (2, 130, 64), (2, 129, 64), (2, 129, 16), dtype)
    eps = np.finfo(dtype).eps
    for kwargs in ({"query": q * 100}, {"scale": 1e4}, {"scale": -1e4},
                   {"scale": 1e4, "is_causal": True}):
        kw = dict(kwargs)
        qq = kw.pop("query", q)
        got = sdpa(qq, k, v, **kw)
        assert np.isfinite(got).all()
        scale = kw.get("scale", 1 / 8)
        big = abs(scale) * np.abs(qq.astype(np.float64) @ np.swapaxes(k, -1, -2)).max()
        assert big > 100
        tol = max(helpers.tolerance(dtype)[0], 16 * eps * big)
        helpers.assert_close(got, ref.scaled_dot_product_attention(qq, k, v, **kw),
                             rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_weights_sum_to_one_at_huge_logits(kernel, dtype, rng, helpers):
    """With all values 1 every visible row is 1, however large the scores;
    a naive exp() would give inf/inf = NaN or 0/0."""
    q, k, _ = helpers.qkv(rng, (2, 70, 32), (2, 130, 32), (2, 130, 4), dtype)
    ones = np.ones((2, 130, 4), dtype)
    big = 1e30 if dtype == np.float64 else 1e4
    for scale in (big, -big, 1e4):
        for causal in (False, True):
            got = sdpa(q, k, ones, scale=scale, is_causal=causal)
            helpers.assert_close(got, np.ones_like(got), rtol=1e-5 if dtype == np.float32
                                 else 1e-13)


@pytest.mark.parametrize("offset", [1e4, -1e4])
def test_large_constant_float_mask_leaves_softmax_unchanged(offset, rng, helpers):
    """Adding the same constant to every score changes nothing (float64; the
    scores near 1e4 still differ by O(1), so the softmax is not one-hot)."""
    q, k, v = helpers.qkv(rng, (2, 70, 16), (2, 130, 16), (2, 130, 8), np.float64)
    mask = np.full((1, 1), offset)
    got = sdpa(q, k, v, attn_mask=mask)
    # Near 1e4 one float64 ulp is ~2e-12, so the scores carry that much error.
    helpers.assert_close(got, sdpa(q, k, v), rtol=1e-10, atol=1e-10)
    helpers.assert_close(got, ref.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                         rtol=1e-10, atol=1e-10)


def test_large_offset_near_ties_float32(rng, helpers):
    """Scores all near 1e4 and within O(1) of each other, in float32: only the
    score rounding near 1e4 (ulp ~1e-3) separates pyattn from the reference."""
    E = 64
    base = rng.standard_normal(E)
    base /= np.linalg.norm(base)
    q = np.broadcast_to(base * 100, (40, E)).astype(np.float32)  # |q| = 100
    k = (base * 100 + rng.standard_normal((130, E)) * 0.01).astype(np.float32)
    v = rng.standard_normal((130, 8)).astype(np.float32)
    got = sdpa(q, k, v, scale=1.0)  # scores ~ 1e4 +- O(1)
    expected = ref.scaled_dot_product_attention(q.astype(np.float64), k.astype(np.float64),
                                                v.astype(np.float64), scale=1.0)
    assert np.isfinite(got).all()
    weights = ref.softmax((q[:1].astype(np.float64) @ k.T.astype(np.float64)))
    assert weights.max() < 0.9  # a genuine mixture, not one-hot
    helpers.assert_close(got, expected.astype(np.float32), rtol=1e-2, atol=1e-2)


def test_float64_agrees_to_1e12(kernel, rng, helpers):
    q, k, v = helpers.qkv(rng, (2, 2, 130, 256), (2, 2, 131, 256), (2, 2, 131, 64),
                          np.float64)
    mask = rng.standard_normal((130, 131))
    got = sdpa(q, k, v, attn_mask=mask, is_causal=True)
    assert got.dtype == np.float64
    expected = ref.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
    mag = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 1e-12 * mag


def test_float32_and_float64_results_agree(rng, helpers):
    """Each dtype gives its own dtype back, and the two agree to float32's
    tolerance."""
    q, k, v = helpers.qkv(rng, (2, 64, 64), (2, 200, 64), (2, 200, 64), np.float64)
    got32 = sdpa(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32))
    got64 = sdpa(q, k, v)
    assert got32.dtype == np.float32 and got64.dtype == np.float64
    helpers.assert_close(got32, got64.astype(np.float32))


@pytest.mark.parametrize("causal", [False, True])
def test_nan_in_one_query_row_stays_in_that_row(kernel, causal, rng, helpers):
    q, k, v = helpers.qkv(rng, (2, 130, 16), (2, 129, 16), (2, 129, 8))
    q[1, 70, 3] = np.nan
    got = sdpa(q, k, v, is_causal=causal)
    expected = ref.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert np.isnan(expected[1, 70]).all()
    assert np.isnan(got[1, 70]).all()
    rest = np.ones(got.shape[:2], bool)
    rest[1, 70] = False
    assert np.isfinite(got[rest]).all()
    helpers.assert_close(got, expected)


@pytest.mark.parametrize("where", ["query", "key", "mask_posinf"])
@pytest.mark.parametrize("causal", [False, True])
def test_non_finite_inputs_match_reference(where, causal, rng, helpers):
    """An inf in a query, a key or the mask gives NaN exactly where the
    reference does, and the same values elsewhere."""
    q, k, v = helpers.qkv(rng, (70, 8), (130, 8), (130, 4), np.float64)
    mask = None
    if where == "query":
        q[3, 1] = np.inf
    elif where == "key":
        k[5, 2] = -np.inf
    else:
        mask = np.zeros((70, 130))
        mask[3, 2] = np.inf  # visible to row 3 under causality too
    got = sdpa(q, k, v, attn_mask=mask, is_causal=causal)
    with np.errstate(invalid="ignore"):
        expected = ref.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    assert np.isnan(expected).any() and not np.isnan(expected).all()
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    helpers.assert_close(got, expected)


# --------------------------------------------------------------------------
# Empty sizes
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_no_keys_gives_zeros(dtype, helpers, rng):
    q = helpers.randn(rng, (2, 3, 5, 4), dtype)
    k = np.zeros((2, 3, 0, 4), dtype)
    v = np.zeros((2, 3, 0, 6), dtype)
    for kwargs in ({}, {"is_causal": True}, {"attn_mask": np.zeros((5, 0), bool)},
                   {"attn_mask": np.zeros((5, 0), dtype), "is_causal": True}):
        got = sdpa(q, k, v, **kwargs)
        assert got.shape == (2, 3, 5, 6) and got.dtype == dtype
        assert np.array_equal(got, np.zeros((2, 3, 5, 6), dtype))
    out = np.full((2, 3, 5, 6), np.nan, dtype)
    assert sdpa(q, k, v, out=out) is out
    assert np.array_equal(out, np.zeros_like(out))
    got = sdpa(q[0, 0], k[0, 0], v[0, 0])
    assert got.shape == (5, 6) and not got.any()


def test_reference_no_keys_gives_zeros():
    """The oracle follows the same rule (S = 0 -> zeros), masks and causal too."""
    q = np.ones((2, 5, 4), np.float32)
    k, v = np.zeros((2, 0, 4), np.float32), np.zeros((2, 0, 6), np.float32)
    for kwargs in ({}, {"is_causal": True}, {"attn_mask": np.zeros((5, 0), bool)}):
        got = ref.scaled_dot_product_attention(q, k, v, **kwargs)
        assert got.dtype == np.float32
        assert np.array_equal(got, np.zeros((2, 5, 6), np.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_empty_results(dtype, helpers, rng):
    cases = [
        ((2, 3, 0, 4), (2, 3, 5, 4), (2, 3, 5, 6), (2, 3, 0, 6)),  # L = 0
        ((0, 3, 4, 4), (0, 3, 5, 4), (0, 3, 5, 6), (0, 3, 4, 6)),  # batch 0
        ((0, 3, 4, 4), (1, 3, 5, 4), (1, 3, 5, 6), (0, 3, 4, 6)),  # batch 0 broadcast
        ((3, 4, 4), (3, 5, 4), (3, 5, 0), (3, 4, 0)),              # Ev = 0
        ((0, 4), (5, 4), (5, 6), (0, 6)),                          # 2-D, L = 0
        ((0, 4), (0, 4), (0, 6), (0, 6)),                          # L = S = 0
    ]
    for qs, ks, vs, out_shape in cases:
        q, k, v = helpers.qkv(rng, qs, ks, vs, dtype)
        for kwargs in ({}, {"is_causal": True}):
            got = sdpa(q, k, v, **kwargs)
            assert got.shape == out_shape and got.dtype == dtype
        out = np.empty(out_shape, dtype)
        assert sdpa(q, k, v, out=out) is out


# --------------------------------------------------------------------------
# Memory layouts and array-likes: same result as contiguous copies
# --------------------------------------------------------------------------

def _unaligned(a):
    """A copy of `a` whose data address is not a multiple of its itemsize."""
    buf = np.empty(a.nbytes + a.itemsize, np.uint8)
    u = np.frombuffer(buf.data, dtype=a.dtype, offset=1, count=a.size).reshape(a.shape)
    u[...] = a
    assert a.itemsize == 1 or not u.flags.aligned
    return u


def _readonly(a):
    a = a.copy()
    a.setflags(write=False)
    return a


def _strided(a):
    """The same values as a view with steps on every axis."""
    big = np.zeros(tuple(2 * n + 1 for n in a.shape), a.dtype)
    view = big[tuple(slice(1, None, 2) for _ in a.shape)]
    view[...] = a
    return view


def _negative(a):
    """The same values as a view with negative strides on the last two axes."""
    return np.ascontiguousarray(a[..., ::-1, ::-1])[..., ::-1, ::-1]


def _transposed(a):
    """The same values as a view with the last two axes transposed in memory."""
    return np.ascontiguousarray(np.swapaxes(a, -1, -2)).swapaxes(-1, -2)


def _fortran(a):
    return np.asfortranarray(a)


LAYOUTS = {"strided": _strided, "negative": _negative, "transposed": _transposed,
           "fortran": _fortran, "readonly": _readonly, "unaligned": _unaligned}


@pytest.mark.parametrize("rows", ["few", "block_plus_few"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_layouts_give_the_contiguous_result(kernel, layout, dtype, rows, rng, helpers):
    """Layouts of every input, for a few query rows (the direct path) and for
    a full block plus a few (tiled and direct paths)."""
    bm = _attention.block_rows(kernel, np.dtype(dtype).name)
    L = 2 if rows == "few" else bm + 3
    q, k, v = helpers.qkv(rng, (2, 3, L, 12), (2, 3, 70, 12), (2, 3, 70, 9), dtype)
    fmask = helpers.randn(rng, (3, L, 70), dtype)
    bmask = rng.random((2, 1, L, 70)) < 0.7
    f = LAYOUTS[layout]
    for kwargs in ({}, {"attn_mask": fmask, "is_causal": True}, {"attn_mask": bmask}):
        expected = sdpa(q, k, v, **kwargs)
        laid = {n: f(a) for n, a in kwargs.items() if isinstance(a, np.ndarray)}
        got = sdpa(f(q), f(k), f(v), **{**kwargs, **laid})
        assert np.array_equal(got, expected)
        assert got.flags.c_contiguous
        helpers.assert_close(got, ref.scaled_dot_product_attention(q, k, v, **kwargs))


def test_negative_strides_on_sequence_axes(rng, helpers):
    """x[..., ::-1, :] is the reversed sequence, not the original."""
    q, k, v = helpers.qkv(rng, (2, 70, 8), (2, 90, 8), (2, 90, 8))
    got = sdpa(q[:, ::-1], k[:, ::-1], v[:, ::-1], is_causal=True)
    expected = sdpa(q[:, ::-1].copy(), k[:, ::-1].copy(), v[:, ::-1].copy(), is_causal=True)
    assert np.array_equal(got, expected)
    helpers.assert_close(got, ref.scaled_dot_product_attention(
        q[:, ::-1].copy(), k[:, ::-1].copy(), v[:, ::-1].copy(), is_causal=True))
    # And reversed heads / batch.
    q4, k4, v4 = helpers.qkv(rng, (3, 2, 20, 8), (3, 2, 30, 8), (3, 2, 30, 8))
    got = sdpa(q4[::-1, ::-1], k4[::-1], v4[::-1])
    assert np.array_equal(got, sdpa(q4[::-1, ::-1].copy(), k4[::-1].copy(), v4[::-1].copy()))


def test_broadcast_views(rng, helpers):
    """np.broadcast_to views (zero strides) on batch, heads and rows."""
    q, k, v = helpers.qkv(rng, (1, 1, 40, 8), (1, 2, 50, 8), (1, 2, 50, 8))
    qb = np.broadcast_to(q, (3, 2, 40, 8))
    kb = np.broadcast_to(k, (3, 2, 50, 8))
    got = sdpa(qb, kb, v)
    assert np.array_equal(got, sdpa(qb.copy(), kb.copy(), v))
    # Zero stride along the key rows: every key the same -> plain mean of v.
    k_rows = np.broadcast_to(k[:, :, :1], k.shape)
    got = sdpa(q, k_rows, v)
    assert np.array_equal(got, sdpa(q, k_rows.copy(), v))
    helpers.assert_close(got, np.broadcast_to(v.mean(axis=2, keepdims=True), (1, 2, 40, 8)))
    # Zero stride along E.
    q_cols = np.broadcast_to(q[..., :1], q.shape)
    assert np.array_equal(sdpa(q_cols, k, v), sdpa(q_cols.copy(), k, v))


def test_python_lists_and_tuples(rng, helpers):
    for dtype in DTYPES:
        q, k, v = helpers.qkv(rng, (5, 3), (7, 3), (7, 2), dtype)
        got = sdpa(q.tolist(), tuple(map(tuple, k.tolist())), v.tolist())
        assert got.dtype == np.float64  # Python floats are float64
        helpers.assert_close(got, sdpa(q.astype(np.float64), k.astype(np.float64),
                                       v.astype(np.float64)))


def test_inputs_are_not_modified(rng, helpers):
    q, k, v = helpers.qkv(rng, (2, 70, 8), (2, 80, 8), (2, 80, 8))
    mask = helpers.randn(rng, (70, 80))
    copies = [a.copy() for a in (q, k, v, mask)]
    sdpa(q, k, v, attn_mask=mask, is_causal=True, scale=3.0)
    for a, c in zip((q, k, v, mask), copies):
        assert np.array_equal(a, c)


# --------------------------------------------------------------------------
# out=
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_out_is_filled_and_returned(dtype, rng, helpers):
    q, k, v = helpers.qkv(rng, (2, 3, 67, 8), (2, 3, 70, 8), (2, 3, 70, 5), dtype)
    expected = sdpa(q, k, v, is_causal=True)
    out = np.full(expected.shape, np.nan, dtype)
    got = sdpa(q, k, v, is_causal=True, out=out)
    assert got is out
    assert np.array_equal(out, expected)
    # Non-contiguous out: only the viewed elements are written.
    big = np.full((2, 3, 67, 11), -7.0, dtype)
    view = big[..., 1::2]
    assert sdpa(q, k, v, is_causal=True, out=view) is view
    assert np.array_equal(view, expected)
    assert (big[..., 0::2] == -7.0).all()
    # Negative-stride out.
    rev = np.full(expected.shape, np.nan, dtype)[:, :, ::-1]
    sdpa(q, k, v, is_causal=True, out=rev)
    assert np.array_equal(rev, expected)
    # 2-D.
    out2 = np.empty((67, 5), dtype)
    assert sdpa(q[0, 0], k[0, 0], v[0, 0], is_causal=True, out=out2) is out2
    assert np.array_equal(out2, expected[0, 0])


def test_out_sharing_a_buffer_without_overlap_is_accepted(rng, helpers):
    """out and value in one buffer but disjoint: not an overlap."""
    q, k, _ = helpers.qkv(rng, (20, 8), (30, 8), (30, 8))
    buf = helpers.randn(rng, (2, 30, 8))
    v = buf[0]
    out = buf[1, :20]
    expected = sdpa(q, k, v.copy())
    assert sdpa(q, k, v, out=out) is out
    assert np.array_equal(out, expected)
    # Interleaved columns of one buffer.
    inter = helpers.randn(rng, (30, 16))
    v2, out2 = inter[:, 0::2], inter[:20, 1::2]
    expected = sdpa(q, k, v2.copy())
    sdpa(q, k, v2, out=out2)
    assert np.array_equal(out2, expected)


# --------------------------------------------------------------------------
# Threads: the result does not depend on the number of threads
# --------------------------------------------------------------------------

THREAD_CASES = {
    # L = 258 and 130 leave a block of 2 rows (the direct path) for block sizes
    # 256 / 128 / 64; kv heads broadcast or shared, with strided K and V.
    "mixed_paths_gqa_strided": ((2, 4, 258, 16), (2, 2, 200, 16), (2, 2, 200, 8),
                                {"enable_gqa": True, "strided_kv": True}),
    "mixed_paths_key_broadcast": ((1, 4, 130, 16), (1, 1, 150, 16), (1, 4, 150, 8),
                                  {"is_causal": True}),
    "plain": ((2, 3, 200, 32), (2, 3, 150, 32), (2, 3, 150, 16), {}),
    "causal": ((1, 4, 257, 16), (1, 4, 257, 16), (1, 4, 257, 8), {"is_causal": True}),
    "bool_mask": ((2, 2, 130, 8), (2, 2, 129, 8), (2, 2, 129, 8), {"mask": "bool"}),
    "float_mask_causal": ((2, 2, 130, 8), (2, 2, 140, 8), (2, 2, 140, 8),
                          {"mask": "float", "is_causal": True}),
    "gqa": ((2, 8, 100, 16), (2, 2, 100, 16), (2, 2, 100, 16), {"enable_gqa": True}),
    "single_item": ((1, 1, 10, 8), (1, 1, 300, 8), (1, 1, 300, 8), {}),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("case", list(THREAD_CASES))
def test_thread_count_does_not_change_the_result(kernel, case, dtype, rng, helpers):
    qs, ks, vs, kwargs = THREAD_CASES[case]
    q, k, v = helpers.qkv(rng, qs, ks, vs, dtype)
    kwargs = dict(kwargs)
    kind = kwargs.pop("mask", None)
    if kwargs.pop("strided_kv", False):
        k, v = np.asfortranarray(k), v[..., ::-1, :].copy()[..., ::-1, :]
    if kind is not None:
        scores = qs[:-1] + (ks[-2],)
        kwargs["attn_mask"] = random_mask(rng, kind, scores, dtype)
    results = [sdpa(q, k, v, num_threads=n, **kwargs) for n in (1, 2, 3)]
    assert np.array_equal(results[0], results[1])
    assert np.array_equal(results[0], results[2])
    helpers.assert_close(results[0], ref.scaled_dot_product_attention(q, k, v, **kwargs))


# --------------------------------------------------------------------------
# Properties (Hypothesis)
# --------------------------------------------------------------------------

SEQ = st.one_of(st.integers(1, 9),
                st.sampled_from([31, 47, 48, 49, 63, 64, 65, 127, 128, 129, 255, 256, 257]),
                st.integers(1, 300))


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from(DTYPES))
    batch = draw_batch(draw)
    hkv = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))
    hq = hkv * group
    gqa = group > 1 and hkv > 1 or draw(st.booleans())
    two_d = not batch and hq == 1 and draw(st.booleans())
    L = draw(st.one_of(SEQ, st.integers(0, 3)))
    S = draw(SEQ)
    E = draw(st.one_of(st.integers(1, 20), st.sampled_from([32, 64, 65, 128])))
    Ev = draw(st.one_of(st.integers(1, 20), st.sampled_from([32, 64, 65, 128])))

    def kv_batch():  # broadcast some batch axes of key/value
        return tuple(1 if draw(st.booleans()) else n for n in batch)

    if two_d:
        qs, ks, vs = (L, E), (S, E), (S, Ev)
    else:
        qs = batch + (hq, L, E)
        kb = kv_batch()
        ks, vs = kb + (hkv, S, E), kb + (hkv, S, Ev)
    scores = (batch + (hq, L, S)) if not two_d else (L, S)
    mask_kind = draw(st.sampled_from([None, "bool", "float", "float_neginf"]))
    mask_shape = None
    if mask_kind is not None:
        drop = draw(st.integers(0, len(scores)))
        mask_shape = tuple(1 if draw(st.booleans()) else n for n in scores[drop:])
    return dict(dtype=dtype, qs=qs, ks=ks, vs=vs, mask_kind=mask_kind, mask_shape=mask_shape,
                is_causal=draw(st.booleans()),
                scale=draw(st.one_of(st.none(), st.floats(-4, 4, allow_nan=False))),
                enable_gqa=gqa, seed=draw(st.integers(0, 2**32 - 1)),
                layout=draw(st.sampled_from(["c", "fortran", "reversed"])),
                num_threads=draw(st.sampled_from([None, 1, 3])))


def laid_out(arr, layout):
    """The same values in another memory layout."""
    if layout == "fortran":
        return np.asfortranarray(arr)
    if layout == "reversed":
        return arr[..., ::-1, :].copy()[..., ::-1, :]
    return arr


@given(problems())
def test_property_matches_reference(helpers, p):
    rng = np.random.default_rng(p["seed"])
    q, k, v = helpers.qkv(rng, p["qs"], p["ks"], p["vs"], p["dtype"])
    mask = None if p["mask_kind"] is None else random_mask(rng, p["mask_kind"], p["mask_shape"],
                                                         p["dtype"])
    kwargs = dict(attn_mask=mask, is_causal=p["is_causal"], scale=p["scale"],
                  enable_gqa=p["enable_gqa"])
    got = sdpa(*(laid_out(a, p["layout"]) for a in (q, k, v)), num_threads=p["num_threads"],
               **kwargs)
    expected = ref.scaled_dot_product_attention(q, k, v, **kwargs)
    assert not np.isnan(got).any()
    helpers.assert_close(got, expected, score_bound=helpers.score_bound(q, k, p["scale"]))


@given(problems(), st.booleans())
def test_property_key_permutation_invariance(helpers, p, with_mask):
    """Permuting the keys together with their values (and the mask's key
    axis) does not change the output; causal masks depend on key order, so
    they are left out."""
    rng = np.random.default_rng(p["seed"])
    q, k, v = helpers.qkv(rng, p["qs"], p["ks"], p["vs"], p["dtype"])
    S = k.shape[-2]
    perm = rng.permutation(S)
    kwargs = dict(scale=p["scale"], enable_gqa=p["enable_gqa"])
    mask = pmask = None
    if with_mask and p["mask_kind"] is not None:
        mask = random_mask(rng, p["mask_kind"], p["mask_shape"], p["dtype"])
        pmask = mask[..., perm] if mask.ndim and mask.shape[-1] == S else mask
    got = sdpa(q, k, v, attn_mask=mask, **kwargs)
    permuted = sdpa(q, k[..., perm, :], v[..., perm, :], attn_mask=pmask, **kwargs)
    helpers.assert_close(permuted, got, score_bound=helpers.score_bound(q, k, p["scale"]))


@pytest.mark.parametrize("dtype", [">f4", ">f8"])
def test_big_endian_inputs_match_native(dtype, rng, helpers):
    q, k, v = (rng.standard_normal(s) for s in [(2, 7, 8), (2, 9, 8), (2, 9, 5)])
    native = np.dtype(dtype).newbyteorder("=")
    got = pyattn.scaled_dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype))
    want = pyattn.scaled_dot_product_attention(q.astype(native), k.astype(native),
                                               v.astype(native))
    assert got.dtype == native
    assert np.array_equal(got, want)


def test_gqa_with_key_and_value_broadcasting_heads_differently(rng, helpers):
    """key has 1 head (broadcast), value 2 (grouped): each follows its own heads,
    as PyTorch's per-tensor repeat_interleave does."""
    q = rng.standard_normal((4, 5, 8))
    k = rng.standard_normal((1, 6, 8))
    v = rng.standard_normal((2, 6, 3))
    got = pyattn.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    want = np.stack([
        ref.scaled_dot_product_attention(q[h], k[0], v[h // 2]) for h in range(4)
    ])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ref.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                               want, rtol=1e-12, atol=1e-12)
