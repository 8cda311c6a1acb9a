"""Score modifiers: alignment, sliding windows, ALiBi,
soft-capping, attention sinks, q/kv lengths, return_lse and merge_attention.

Three kinds of checks:
  * pyattn against pyattn.reference with the same keywords, on every kernel
    this machine can run, at shapes that cross tile and block boundaries and
    take each code path (direct decode, tiled, split keys);
  * semantics written out here, without the reference (explicit masks,
    explicit softmaxes, slicing), so a bug shared by kernel and reference
    shows up;
  * PyTorch's lower-right causal bias, when torch is installed.
"""
import functools
import warnings
import zlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import FULL as DTYPES
from support import USABLE_KERNELS, draw_batch, ids, random_mask, using_kernel

import pyattn
from pyattn import _attention, _plan, functional
from pyattn import reference as ref

sdpa = pyattn.scaled_dot_product_attention
LSE_RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def assert_lse_close(got, want, dtype):
    """Same shape and dtype, -inf in the same places, finite values close."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == np.dtype(dtype), (got.dtype, dtype)
    assert np.array_equal(np.isneginf(got), np.isneginf(want)), "-inf pattern differs"
    assert not np.isnan(got).any()
    finite = np.isfinite(want)
    rtol = LSE_RTOL[np.dtype(dtype)]
    mag = float(np.max(np.abs(want[finite]), initial=1.0))
    np.testing.assert_allclose(got[finite], want[finite], rtol=rtol, atol=rtol * max(1.0, mag))


def explicit(q, k, v, *, scale=None, softcap=None, bias=None, visible=None, sink=None):
    """Attention written out in float64, independent of pyattn.reference.

    q (..., L, E), k (..., S, E), v (..., S, Ev) with matching leading axes
    (GQA already expanded); bias adds to the (capped) scores; visible (bool)
    keeps keys; sink (broadcastable to (..., L)) is one more logit in the
    denominator.  Returns (output, lse); a row with nothing is zeros / -inf."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ np.swapaxes(k, -1, -2) * scale
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    if visible is not None:
        s = np.where(visible, s, -np.inf)
    cols = s
    if sink is not None:
        sink_col = np.broadcast_to(np.asarray(sink, np.float64), s.shape[:-1])[..., None]
        cols = np.concatenate([s, sink_col], axis=-1)
    top = cols.max(axis=-1, keepdims=True)
    top = np.where(np.isneginf(top), 0.0, top)
    e = np.exp(cols - top)
    total = e.sum(axis=-1, keepdims=True)
    w = np.divide(e, total, out=np.zeros_like(e), where=total > 0)
    with np.errstate(divide="ignore"):
        lse = (top + np.log(total))[..., 0]
    return w[..., :s.shape[-1]] @ v, lse


def offsets(L, S, diag=0):
    """offset[i, j] = j - (i + diag): key j's distance from row i's diagonal."""
    return np.arange(S)[None, :] - np.arange(L)[:, None] - diag


# ==========================================================================
# 1. pyattn against the reference, every kernel, every path
# ==========================================================================

# (L, S): none a multiple of a tile; L < 8 takes the direct (decode) path on
# AVX-512 (fewer than MR rows), L >= 8 the tiled one; S = 2500 with few work
# items is split into key chunks (_plan.split_keys); L = 300 and 1100
# span several query blocks.
SHAPES = [(1, 3), (3, 129), (7, 300), (64, 7), (129, 64), (300, 1100), (1100, 129),
          (1, 2500), (129, 2500)]

ALIBI = np.array([0.5, 0.25, 0.125, 0.0625])


def make_mask(rng, kind, shape, dtype):
    """random_mask with this file's mix: "float" masks are 0.5 * normal
    with 15% -inf; bool masks keep 75%."""
    kind = "float_neginf" if kind == "float" else kind
    return random_mask(rng, kind, shape, dtype, keep=0.75, scale=0.5, neginf=0.15,
                       both_values=False)


def lengths(rng, n, hi, with_zero=False):
    """Per-sequence lengths in [0, hi]: one full, one random (or 0)."""
    other = 0 if with_zero else int(rng.integers(0, hi + 1))
    return np.array([hi, other][:n] if n > 1 else [other])


# name: builder(rng, batch, Hq, L, S, dtype) -> kwargs (mask drawn separately)
CONFIGS = {
    "plain": lambda r, B, H, L, S, dt: {},
    "causal_top_left": lambda r, B, H, L, S, dt: dict(is_causal=True),
    "causal_lower_right": lambda r, B, H, L, S, dt: dict(is_causal=True, alignment="lower_right"),
    "window_int": lambda r, B, H, L, S, dt: dict(window=9),
    "window_pair_lower_right": lambda r, B, H, L, S, dt: dict(window=(33, 5),
                                                              alignment="lower_right"),
    "window_right_open": lambda r, B, H, L, S, dt: dict(window=(150, None)),
    "window_left_open": lambda r, B, H, L, S, dt: dict(window=(None, 3), alignment="lower_right"),
    "window_causal_lower_right": lambda r, B, H, L, S, dt: dict(
        window=(40, 7), is_causal=True, alignment="lower_right"),
    "alibi": lambda r, B, H, L, S, dt: dict(alibi_slopes=ALIBI[:H]),
    "alibi_causal_lower_right": lambda r, B, H, L, S, dt: dict(
        alibi_slopes=ALIBI[:H] / 8, is_causal=True, alignment="lower_right"),
    "softcap": lambda r, B, H, L, S, dt: dict(softcap=1.5),
    "alibi_softcap_mask": lambda r, B, H, L, S, dt: dict(
        alibi_slopes=ALIBI[:H], softcap=2.0, _mask="bool"),
    "alibi_softcap_float_mask": lambda r, B, H, L, S, dt: dict(
        alibi_slopes=ALIBI[:H][::-1], softcap=3.0, _mask="float"),
    "sinks": lambda r, B, H, L, S, dt: dict(sinks=np.array([1.5, -2.0, 0.3, -np.inf])[:H]),
    "sinks_lengths": lambda r, B, H, L, S, dt: dict(
        sinks=r.standard_normal(H) * 2, q_lengths=lengths(r, B, L),
        kv_lengths=lengths(r, B, S)[::-1].copy()),
    "lengths_zero_causal_lower_right": lambda r, B, H, L, S, dt: dict(
        q_lengths=lengths(r, B, L), kv_lengths=lengths(r, B, S, with_zero=True),
        is_causal=True, alignment="lower_right"),
    "kv_lengths_softcap": lambda r, B, H, L, S, dt: dict(
        kv_lengths=lengths(r, B, S, with_zero=True), softcap=1.0),
    "kv_lengths_window": lambda r, B, H, L, S, dt: dict(
        kv_lengths=lengths(r, B, S)[::-1].copy(), window=(20, 20), alignment="lower_right"),
    "everything_bool": lambda r, B, H, L, S, dt: dict(
        is_causal=True, alignment="lower_right", window=(64, None), alibi_slopes=ALIBI[:H] / 4,
        softcap=2.5, sinks=r.standard_normal(H), q_lengths=lengths(r, B, L),
        kv_lengths=lengths(r, B, S)[::-1].copy(), _mask="bool"),
    "everything_float_top_left": lambda r, B, H, L, S, dt: dict(
        window=(30, 10), alibi_slopes=ALIBI[:H], softcap=4.0,
        sinks=np.r_[-np.inf, r.standard_normal(H - 1)], q_lengths=lengths(r, B, L),
        kv_lengths=lengths(r, B, S), _mask="float"),
}


# The largest shapes run the combinations only: the reference's cost is L * S.
BIG_CONFIGS = ["causal_lower_right", "window_pair_lower_right", "window_causal_lower_right",
               "alibi", "softcap", "sinks", "alibi_softcap_mask",
               "sinks_lengths", "kv_lengths_window", "everything_bool",
               "everything_float_top_left"]
CASES = [(config, L, S) for config in CONFIGS for L, S in SHAPES
         if L * S <= 50_000 or config in BIG_CONFIGS]


@functools.lru_cache(maxsize=None)
def reference_case(config, L, S, dtype):
    """Inputs, keywords and the reference's (output, lse) for one case: built
    once and shared by every kernel's run (the reference dominates the cost).
    Two sequences, GQA 4 on 2; one sequence for S > 2048, so that every
    kernel has few enough work items to split the keys."""
    rng = np.random.default_rng(zlib.crc32(f"{config}-{L}-{S}-{dtype}".encode()))
    batch, hq, hkv = ((1,), 4, 2) if S > 2048 else ((2,), 4, 2)
    E, Ev = 19, 13
    q, k, v = (rng.standard_normal(batch + s).astype(dtype)
               for s in [(hq, L, E), (hkv, S, E), (hkv, S, Ev)])
    kwargs = CONFIGS[config](rng, batch[0], hq, L, S, dtype)
    mask_kind = kwargs.pop("_mask", None)
    mask_shape = (hq, L, S) if L * S < 50_000 else (L, S)
    kwargs["attn_mask"] = make_mask(rng, mask_kind, mask_shape, dtype)
    kwargs["enable_gqa"] = True
    want = ref.scaled_dot_product_attention(q, k, v, return_lse=True, **kwargs)
    for a in (q, k, v, *want):
        a.flags.writeable = False
    return (q, k, v), kwargs, want


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("config, L, S", CASES, ids=[f"{c}-L{L}-S{S}" for c, L, S in CASES])
def test_matches_reference(kernel, config, L, S, dtype, helpers):
    (q, k, v), kwargs, (want, want_lse) = reference_case(config, L, S, dtype)
    if S > 2048:  # this case must take the split-KV path
        n_items = q.shape[0] * q.shape[1] * -(-L // _attention.block_rows(kernel, q.dtype.name))
        assert _plan.split_keys(n_items, S) > 0
    got, lse = sdpa(q, k, v, return_lse=True, **kwargs)
    assert not np.isnan(got).any()
    helpers.assert_close(got, want, score_bound=helpers.score_bound(q, k))
    assert_lse_close(lse, want_lse, dtype)


@functools.lru_cache(maxsize=None)
def split_case(L, S, mask_kind, dtype):
    """One sequence, GQA 4 on 2, every modifier, for kv_len = S, 1500 (inside
    the first key chunk) and 2050 (just past it): [(inputs, kwargs, want)]."""
    rng = np.random.default_rng(zlib.crc32(f"split-{L}-{S}-{mask_kind}-{dtype}".encode()))
    q, k, v = (rng.standard_normal(s).astype(dtype)
               for s in [(1, 4, L, 16), (1, 2, S, 16), (1, 2, S, 9)])
    cases = []
    for kv_len in (S, 1500, 2050):
        kwargs = dict(is_causal=True, alignment="lower_right", window=(700, None),
                      alibi_slopes=ALIBI / 64, softcap=5.0, sinks=np.array([0.5, -1, 2, -np.inf]),
                      q_lengths=L - 1, kv_lengths=[kv_len], enable_gqa=True,
                      attn_mask=make_mask(rng, mask_kind, (L, S), dtype))
        want = ref.scaled_dot_product_attention(q, k, v, return_lse=True, **kwargs)
        cases.append(((q, k, v), kwargs, want))
    return cases


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("L, S", [(2, 2500), (5, 2200), (40, 4100)])
def test_split_keys_with_every_modifier(kernel, L, S, mask_kind, dtype, helpers):
    """Keys cut into chunks: the sink is counted once, kv_lengths may end inside
    the first chunk, windows span a chunk boundary."""
    n_items = 4 * -(-L // _attention.block_rows(kernel, np.dtype(dtype).name))
    assert _plan.split_keys(n_items, S) > 0
    for (q, k, v), kwargs, (want, want_lse) in split_case(L, S, mask_kind, dtype):
        got, lse = sdpa(q, k, v, return_lse=True, **kwargs)
        helpers.assert_close(got, want, score_bound=helpers.score_bound(q, k))
        assert_lse_close(lse, want_lse, dtype)


@pytest.mark.parametrize("L, S", [(3, 2500), (300, 1100)])
def test_thread_count_does_not_change_the_result(kernel, L, S, rng):
    q, k, v = (rng.standard_normal(s) for s in [(1, 4, L, 16), (1, 2, S, 16), (1, 2, S, 8)])
    kwargs = dict(enable_gqa=True, is_causal=True, alignment="lower_right", window=(500, None),
                  alibi_slopes=ALIBI / 16, softcap=3.0, sinks=[0.5, -1, 2, -np.inf],
                  q_lengths=[L - 1], kv_lengths=[S - 7], attn_mask=rng.random((L, S)) < 0.8,
                  return_lse=True)
    (o1, l1), (o2, l2), (o3, l3) = (sdpa(q, k, v, num_threads=n, **kwargs) for n in (1, 2, 3))
    assert np.array_equal(o1, o2) and np.array_equal(o1, o3)
    assert np.array_equal(l1, l2) and np.array_equal(l1, l3)


def test_return_lse_does_not_change_the_output(rng):
    q, k, v = (rng.standard_normal(s) for s in [(2, 3, 40, 8), (2, 3, 70, 8), (2, 3, 70, 5)])
    kwargs = dict(is_causal=True, alignment="lower_right", window=5, alibi_slopes=[1, 2, 3],
                  softcap=2.0, sinks=[0, 1, 2], kv_lengths=[50, 70], q_lengths=[40, 11])
    out, lse = sdpa(q, k, v, return_lse=True, **kwargs)
    assert np.array_equal(out, sdpa(q, k, v, **kwargs))
    assert lse.shape == (2, 3, 40) and lse.dtype == np.float64
    # 2-d inputs: lse is (L,)
    out2, lse2 = sdpa(q[0, 0], k[0, 0], v[0, 0], return_lse=True)
    assert out2.shape == (40, 5) and lse2.shape == (40,)


# ==========================================================================
# 2. Property: random combinations of every modifier
# ==========================================================================

SEQ = st.one_of(st.integers(1, 9), st.sampled_from([31, 63, 64, 65, 127, 129, 200]))
SIDE = st.one_of(st.none(), st.integers(0, 40))


@st.composite
def modifier_problems(draw):
    dtype = draw(st.sampled_from(DTYPES))
    batch = draw_batch(draw)
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.integers(1, 3))
    L, S = draw(SEQ), draw(SEQ)
    E, Ev = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    window = draw(st.one_of(st.none(), st.integers(0, 40), st.tuples(SIDE, SIDE)))

    def per_batch_lengths(hi):
        if not draw(st.booleans()):
            return None
        shape = tuple(1 if draw(st.booleans()) else n for n in batch)
        return np.array(draw(st.lists(st.integers(0, hi), min_size=int(np.prod(shape)),
                                      max_size=int(np.prod(shape))))).reshape(shape)

    head_values = st.lists(st.floats(0, 2, allow_nan=False), min_size=hq, max_size=hq)
    sink_values = st.lists(st.one_of(st.floats(-4, 4), st.just(-np.inf)),
                           min_size=hq, max_size=hq)
    return dict(
        dtype=dtype, qs=batch + (hq, L, E), ks=batch + (hkv, S, E), vs=batch + (hkv, S, Ev),
        mask_kind=draw(st.sampled_from([None, "bool", "float"])),
        kwargs=dict(
            is_causal=draw(st.booleans()),
            alignment=draw(st.sampled_from(["top_left", "lower_right"])),
            window=window,
            alibi_slopes=draw(st.none() | head_values),
            softcap=draw(st.none() | st.floats(0.25, 50)),
            sinks=draw(st.none() | sink_values),
            q_lengths=per_batch_lengths(L),
            kv_lengths=per_batch_lengths(S),
            scale=draw(st.none() | st.floats(-2, 2)),
            enable_gqa=True,
        ),
        kernel=draw(st.sampled_from(USABLE_KERNELS)),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@given(modifier_problems())
def test_property_modifiers_match_reference(helpers, p):
    rng = np.random.default_rng(p["seed"])
    q, k, v = helpers.qkv(rng, p["qs"], p["ks"], p["vs"], p["dtype"])
    kwargs = dict(p["kwargs"])
    kwargs["attn_mask"] = make_mask(rng, p["mask_kind"], (q.shape[-2], k.shape[-2]), p["dtype"])
    with using_kernel(p["kernel"]):
        got, lse = sdpa(q, k, v, return_lse=True, **kwargs)
    want, want_lse = ref.scaled_dot_product_attention(q, k, v, return_lse=True, **kwargs)
    assert not np.isnan(got).any()
    helpers.assert_close(got, want, score_bound=helpers.score_bound(q, k, kwargs["scale"]))
    assert_lse_close(lse, want_lse, p["dtype"])


# ==========================================================================
# 3. Semantics, without the reference
# ==========================================================================

@pytest.mark.parametrize("L, S", [(5, 9), (9, 5), (70, 200), (200, 70), (1, 300), (130, 130)])
def test_lower_right_causal_is_the_shifted_tril(kernel, L, S, rng, helpers):
    q, k, v = helpers.qkv(rng, (2, L, 16), (2, S, 16), (2, S, 7), np.float64)
    tril = np.tril(np.ones((L, S), bool), k=S - L)
    got = sdpa(q, k, v, is_causal=True, alignment="lower_right")
    helpers.assert_close(got, sdpa(q, k, v, attn_mask=tril))
    helpers.assert_close(got, explicit(q, k, v, visible=tril)[0])
    # top-left is the unshifted tril; with L == S the two agree
    helpers.assert_close(sdpa(q, k, v, is_causal=True),
                         explicit(q, k, v, visible=np.tril(np.ones((L, S), bool)))[0])
    if L > S:  # rows before the first key's diagonal see nothing: zeros
        assert not got[:, :L - S].any()


@pytest.mark.parametrize("alignment", ["top_left", "lower_right"])
@pytest.mark.parametrize("window", [0, 3, (0, 5), (7, 0), (2, None), (None, 4), (50, 1),
                                    (200, 200)])
@pytest.mark.parametrize("L, S", [(37, 150), (150, 37), (260, 260)])
def test_window_is_a_band_mask(kernel, L, S, window, alignment, rng, helpers):
    q, k, v = helpers.qkv(rng, (2, L, 8), (2, S, 8), (2, S, 5), np.float64)
    left, right = (window, window) if isinstance(window, int) else window
    off = offsets(L, S, S - L if alignment == "lower_right" else 0)
    band = np.ones((L, S), bool)
    if left is not None:
        band &= off >= -left
    if right is not None:
        band &= off <= right
    got = sdpa(q, k, v, window=window, alignment=alignment)
    helpers.assert_close(got, sdpa(q, k, v, attn_mask=band))
    helpers.assert_close(got, explicit(q, k, v, visible=band)[0])
    # with is_causal the right side is 0
    causal_band = band & (off <= 0)
    helpers.assert_close(sdpa(q, k, v, window=window, alignment=alignment, is_causal=True),
                         explicit(q, k, v, visible=causal_band)[0])


@pytest.mark.parametrize("alignment", ["top_left", "lower_right"])
@pytest.mark.parametrize("L, S", [(6, 90), (70, 300), (1, 2500)])
def test_kv_lengths_equal_sliced_keys(kernel, L, S, alignment, rng, helpers):
    B = 4
    q, k, v = helpers.qkv(rng, (B, 2, L, 16), (B, 2, S, 16), (B, 2, S, 8), np.float64)
    kv_len = np.array([S, 0, 1, S // 2 + 3])
    kw = dict(is_causal=True, alignment=alignment, alibi_slopes=[0.3, 0.1], window=(60, None))
    got, lse = sdpa(q, k, v, kv_lengths=kv_len, return_lse=True, **kw)
    for b, n in enumerate(kv_len):
        if n == 0:
            assert not got[b].any() and np.isneginf(lse[b]).all()
            continue
        want, want_lse = sdpa(q[b], k[b, :, :n], v[b, :, :n], return_lse=True, **kw)
        helpers.assert_close(got[b], want)
        np.testing.assert_array_equal(np.isneginf(lse[b]), np.isneginf(want_lse))
        np.testing.assert_allclose(lse[b][np.isfinite(want_lse)], want_lse[np.isfinite(want_lse)],
                                   rtol=1e-12)


@pytest.mark.parametrize("alignment", ["top_left", "lower_right"])
@pytest.mark.parametrize("L, S", [(7, 20), (100, 300), (300, 100)])
def test_q_lengths_pad_rows_with_zeros(kernel, L, S, alignment, rng, helpers):
    """Valid rows equal a call on the sliced queries (lower-right: the last
    valid query sits on the last key); padded rows are zeros, lse -inf."""
    B = 3
    q, k, v = helpers.qkv(rng, (B, 2, L, 16), (B, 2, S, 16), (B, 2, S, 8), np.float64)
    q_len = np.array([L, 0, L // 2 + 1])
    kw = dict(is_causal=True, alignment=alignment, alibi_slopes=[0.2, 0.05], sinks=[0.5, -1.0])
    got, lse = sdpa(q, k, v, q_lengths=q_len, return_lse=True, **kw)
    for b, n in enumerate(q_len):
        assert not got[b, :, n:].any()
        assert np.isneginf(lse[b, :, n:]).all()
        if n:
            want, want_lse = sdpa(q[b, :, :n], k[b], v[b], return_lse=True, **kw)
            helpers.assert_close(got[b, :, :n], want)
            np.testing.assert_allclose(lse[b, :, :n], want_lse, rtol=1e-12)
    # both lengths at once, broadcast from shape (B, 1) over two batch axes
    q2 = np.stack([q, q[::-1]], axis=1)  # (B, 2, H, L, E)
    k2, v2 = np.stack([k, k], axis=1), np.stack([v, v], axis=1)
    ql, kl = q_len.reshape(B, 1), np.array([S, S - 3, 1]).reshape(B, 1)
    got2 = sdpa(q2, k2, v2, q_lengths=ql, kv_lengths=kl, **kw)
    for b in range(B):
        for c in range(2):
            n, m = ql[b, 0], kl[b, 0]
            assert not got2[b, c, :, n:].any()
            if n:
                helpers.assert_close(got2[b, c, :, :n], sdpa(q2[b, c, :, :n], k2[b, c, :, :m],
                                                             v2[b, c, :, :m], **kw))


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("L, S", [(1, 5), (3, 2500), (50, 130)])
def test_sinks_are_a_softmax_column_that_is_dropped(kernel, L, S, dtype, rng, helpers):
    H = 4
    q, k, v = helpers.qkv(rng, (H, L, 8), (H, S, 8), (H, S, 6), dtype)
    sinks = np.array([3.0, 0.0, -5.0, -np.inf])
    got, lse = sdpa(q, k, v, sinks=sinks, return_lse=True)
    want, want_lse = explicit(q, k, v, sink=sinks[:, None])
    helpers.assert_close(got, want.astype(dtype))
    assert_lse_close(lse, want_lse.astype(dtype), dtype)
    # sink -inf is no sink at all
    helpers.assert_close(got[3], sdpa(q[3], k[3], v[3]))
    # with all-ones values the output is the weight the keys get: below 1
    ones = np.ones((H, S, 3), dtype)
    o1, l1 = sdpa(q, k, ones, sinks=sinks, return_lse=True)
    assert (o1[:3] < 1).all() and (o1[:3] > 0).all()
    helpers.assert_close(o1[3], np.ones_like(o1[3]))
    # ... and that weight is 1 - exp(sink - lse)
    helpers.assert_close(o1[..., 0], (1 - np.exp(sinks[:, None] - l1.astype(np.float64)))
                         .astype(dtype), rtol=1e-4 if dtype == np.float32 else None)


@pytest.mark.parametrize("L", [3, 70])
def test_attention_weights_share_the_softmax_with_the_sink(kernel, L, rng):
    """The weights are the probabilities the output used: the sink is in
    their denominator, so they sum to 1 - exp(sink - lse)."""
    q, k, v = (rng.standard_normal((3, n, 8)) for n in (L, 40, 40))
    sinks = np.array([2.0, -1.0, -np.inf])
    out, weights, lse = functional.attention(q, k, v, weights="heads", sinks=sinks,
                                             return_lse=True)
    np.testing.assert_allclose(weights @ v, out, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(weights.sum(-1), 1 - np.exp(sinks[:, None] - lse), rtol=1e-12)


def test_sink_with_no_visible_key(kernel):
    """A row that sees no key still has its sink: output zeros, lse = sink."""
    q, k, v = np.ones((2, 3, 4)), np.ones((2, 5, 4)), np.ones((2, 5, 2))
    mask = np.zeros((3, 5), bool)
    out, lse = sdpa(q, k, v, attn_mask=mask, sinks=[1.25, -np.inf], return_lse=True)
    assert not out.any()
    np.testing.assert_array_equal(lse, [[1.25] * 3, [-np.inf] * 3])
    out, lse = sdpa(q, k[:, :0], v[:, :0], sinks=[1.25, -np.inf], return_lse=True)  # S = 0
    assert not out.any()
    np.testing.assert_array_equal(lse, [[1.25] * 3, [-np.inf] * 3])


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_softcap_is_tanh_before_the_mask(kernel, dtype, rng, helpers):
    q, k, v = helpers.qkv(rng, (2, 70, 16), (2, 150, 16), (2, 150, 8), dtype)
    q = q * 3  # scores of a few units, so a small cap matters
    causal = np.tril(np.ones((70, 150), bool))
    for cap in (0.5, 2.0, 10.0, 50.0):
        got = sdpa(q, k, v, softcap=cap, is_causal=True)
        want = explicit(q, k, v, softcap=cap, visible=causal)[0]
        helpers.assert_close(got, want.astype(dtype), score_bound=cap)
    # capped before the mask: an additive mask is not capped
    bias = rng.standard_normal((70, 150)) * 4
    got = sdpa(q, k, v, softcap=0.5, attn_mask=bias.astype(dtype))
    helpers.assert_close(got, explicit(q, k, v, softcap=0.5, bias=bias)[0].astype(dtype),
                         score_bound=np.abs(bias).max() + 0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_softcap_huge_cap_is_no_cap(kernel, dtype, rng, helpers):
    """c tanh(s / c) -> s as c grows: with |s| < 20 the two differ by
    s^3 / 3c^2, below 3e-9 for c = 1e6 (float32) and 3e-15 for c = 1e9
    (float64), far below the tolerances.  (Catches a tanh computed as
    (1 - e) / (1 + e) for small arguments, where 1 - e cancels: errors of
    c * eps.)"""
    q, k, v = helpers.qkv(rng, (2, 70, 16), (2, 150, 16), (2, 150, 8), dtype)
    q = q * 3
    cap = 1e6 if np.dtype(dtype) == np.float32 else 1e9
    helpers.assert_close(sdpa(q, k, v, softcap=cap), sdpa(q, k, v),
                         score_bound=helpers.score_bound(q, k))


@pytest.mark.parametrize("alignment", ["top_left", "lower_right"])
@pytest.mark.parametrize("L, S", [(3, 200), (90, 140), (140, 90)])
def test_alibi_is_an_additive_distance_bias(kernel, L, S, alignment, rng, helpers):
    H = 3
    q, k, v = helpers.qkv(rng, (2, H, L, 16), (2, H, S, 16), (2, H, S, 8), np.float64)
    slopes = np.array([1.0, 0.25, 1 / 64])
    diag = S - L if alignment == "lower_right" else 0
    bias = -slopes[:, None, None] * np.abs(offsets(L, S, diag))
    got = sdpa(q, k, v, alibi_slopes=slopes, alignment=alignment)
    helpers.assert_close(got, sdpa(q, k, v, attn_mask=bias))
    helpers.assert_close(got, explicit(q, k, v, bias=bias)[0])
    # soft-capping comes first: the bias is not capped
    helpers.assert_close(sdpa(q, k, v, alibi_slopes=slopes, alignment=alignment, softcap=0.7),
                         explicit(q, k, v, softcap=0.7, bias=bias)[0])
    # with causality and a bool mask on top
    keep = rng.random((L, S)) < 0.6
    vis = keep & (offsets(L, S, diag) <= 0)
    helpers.assert_close(
        sdpa(q, k, v, alibi_slopes=slopes, alignment=alignment, is_causal=True, attn_mask=keep),
        explicit(q, k, v, bias=bias, visible=vis)[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("L, S", [(1, 9), (40, 300), (5, 2500)])
def test_return_lse_is_the_logsumexp_of_the_scores(kernel, L, S, dtype, rng, helpers):
    q, k, v = helpers.qkv(rng, (2, L, 16), (2, S, 16), (2, S, 4), dtype)
    mask = rng.random((L, S)) < 0.5
    mask[0] = False  # a row with no key: lse -inf
    _, lse = sdpa(q, k, v, attn_mask=mask, return_lse=True, scale=0.7)
    scores = np.where(mask, (q.astype(np.float64) @ k.astype(np.float64).swapaxes(-1, -2)) * 0.7,
                      -np.inf)
    with np.errstate(divide="ignore"):
        want = np.log(np.exp(scores).sum(-1))
    assert_lse_close(lse, want.astype(dtype), dtype)


def split_points(rng, S, n):
    return sorted(rng.choice(np.arange(1, S), size=min(n, S - 1), replace=False).tolist())


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("L, S, n_cuts", [(1, 50, 1), (9, 300, 3), (70, 131, 5), (4, 3000, 2)])
def test_merge_attention_of_random_key_splits(kernel, L, S, n_cuts, dtype, rng, helpers):
    """Each part: pyattn over a slice of the keys with return_lse; merged, they
    give the full call.  Sinks go to the first part only (counted once)."""
    q, k, v = helpers.qkv(rng, (2, 3, L, 16), (2, 3, S, 16), (2, 3, S, 8), dtype)
    mask = rng.random((L, S)) < 0.7
    mask[:, S // 2:] &= rng.random(L)[:, None] < 0.5  # some rows see no key in later parts
    sinks = np.array([0.7, -np.inf, -1.5])
    slopes = np.array([0.1, 0.2, 0.0])
    bias = (-slopes[:, None, None] * np.abs(offsets(L, S))).astype(dtype)
    cuts = split_points(rng, S, n_cuts)
    for use_sinks in (False, True):
        outs, lses = [], []
        for part, (lo, hi) in enumerate(zip([0] + cuts, cuts + [S])):
            o, lse = sdpa(q, k[..., lo:hi, :], v[..., lo:hi, :],
                          attn_mask=np.where(mask[:, lo:hi], bias[..., lo:hi], -np.inf),
                          sinks=sinks if use_sinks and part == 0 else None, return_lse=True)
            outs.append(o)
            lses.append(lse)
        merged, merged_lse = pyattn.merge_attention(outs, lses)
        full, full_lse = sdpa(q, k, v, attn_mask=mask, alibi_slopes=slopes,
                              sinks=sinks if use_sinks else None, return_lse=True)
        tol = 5e-5 if dtype == np.float32 else 1e-12
        helpers.assert_close(merged, full, rtol=tol, atol=tol)
        assert_lse_close(merged_lse, full_lse, dtype)
        # order does not matter, and out= is filled
        buf = np.empty_like(full)
        m2, l2 = pyattn.merge_attention(np.stack(outs[::-1]), np.stack(lses[::-1]), out=buf)
        assert m2 is buf
        helpers.assert_close(m2, full, rtol=tol, atol=tol)
        assert_lse_close(l2, full_lse, dtype)


def test_merge_attention_single_part_and_empty_rows():
    rng = np.random.default_rng(5)
    o = rng.standard_normal((2, 4, 3))
    lse = rng.standard_normal((2, 4))
    m, m_lse = pyattn.merge_attention([o], [lse])
    np.testing.assert_allclose(m, o, rtol=1e-15)
    np.testing.assert_allclose(m_lse, lse, rtol=1e-15)
    lse2 = np.full_like(lse, -np.inf)
    m, m_lse = pyattn.merge_attention([np.zeros_like(o), np.zeros_like(o)], [lse2, lse2])
    assert not m.any() and np.isneginf(m_lse).all()


@pytest.mark.parametrize("outputs, lses, exc, match", [
    ([np.zeros((2, 4, 3))], [np.zeros((2, 5))], ValueError, "lses"),
    ([np.zeros((2, 4, 3)), np.zeros((2, 5, 3))], [np.zeros((2, 4))] * 2, ValueError,
     r"outputs must be parts of one shape; got shapes \[\(2, 4, 3\), \(2, 5, 3\)\]"),
    ([np.zeros((2, 4, 3))], [np.zeros((2, 4), np.float32)], TypeError, "dtype"),
    ([np.zeros((2, 4, 3), np.float32)], [np.zeros((2, 4))], TypeError, "dtype"),
    ([], [], ValueError, "at least one"),
    (np.zeros((0, 2, 4, 3)), np.zeros((0, 2, 4)), ValueError, "at least one"),
    ([np.zeros((2, 4, 3), np.int64)], [np.zeros((2, 4), np.int64)], TypeError, "outputs"),
    (np.zeros((4, 3)), np.zeros((4,)), ValueError, "outputs"),
], ids=["lse_shape", "ragged_outputs", "dtype_lse", "dtype_out", "no_parts_list",
        "no_parts_array", "int_dtype", "too_few_dims"])
def test_merge_attention_errors(outputs, lses, exc, match):
    with pytest.raises(exc, match=match):
        pyattn.merge_attention(outputs, lses)


def test_merge_attention_bad_out():
    o, lse = np.zeros((2, 2, 4, 3)), np.zeros((2, 2, 4))
    with pytest.raises(ValueError, match="out"):
        pyattn.merge_attention(o, lse, out=np.empty((2, 4, 4)))
    with pytest.raises(TypeError, match="out"):
        pyattn.merge_attention(o, lse, out=np.empty((2, 4, 3), np.float32))


# ==========================================================================
# 4. PyTorch's lower-right causal bias
# ==========================================================================

@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("L, S", [(1, 40), (7, 300), (100, 257), (257, 100), (9, 3), (64, 64)])
def test_lower_right_causal_matches_torch(L, S, dtype, rng, helpers):
    torch = pytest.importorskip("torch")
    from torch.nn.attention.bias import causal_lower_right

    q, k, v = helpers.qkv(rng, (2, 4, L, 16), (2, 2, S, 16), (2, 2, S, 8), dtype)
    got, lse = sdpa(q, k, v, is_causal=True, alignment="lower_right", enable_gqa=True,
                    return_lse=True)
    with warnings.catch_warnings():  # "will produce NaNs" when L > S
        warnings.simplefilter("ignore", UserWarning)
        bias = causal_lower_right(L, S)
    tq, tk, tv = (torch.from_numpy(np.repeat(a, 2, axis=1) if a is not q else a)
                  for a in (q, k, v))
    want = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=bias).numpy()
    empty = np.arange(L) < L - S  # rows with no visible key
    assert not got[:, :, empty].any() and np.isneginf(lse[:, :, empty]).all()
    rows = ~empty & np.isfinite(want).all(axis=(0, 1, 3))
    assert rows[~empty].all()  # torch gives numbers for every row that sees a key
    helpers.assert_close(got[:, :, rows], want[:, :, rows], rtol=1e-4 if dtype == np.float32
                         else 1e-10)


@pytest.mark.parametrize("L, S", [(5, 40), (40, 5)])
def test_top_left_causal_matches_torch(L, S, rng, helpers):
    torch = pytest.importorskip("torch")
    q, k, v = helpers.qkv(rng, (2, L, 16), (2, S, 16), (2, S, 8), np.float64)
    want = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(a) for a in (q, k, v)), is_causal=True).numpy()
    helpers.assert_close(sdpa(q, k, v, is_causal=True), want, rtol=1e-10)


# ==========================================================================
# 5. Cost: tiles outside the window are skipped.  Not testable without
#    timing; the benchmarks measure it.
# ==========================================================================

# ==========================================================================
# 6. Errors name the argument
# ==========================================================================

ERRORS = {
    "alignment_bad": (dict(alignment="bottom_right"), ValueError, "alignment"),
    "alignment_none": (dict(alignment=None), ValueError, "alignment"),
    "window_negative": (dict(window=-1), ValueError, "window"),
    "window_left_negative": (dict(window=(-2, 3)), ValueError, "window"),
    "window_right_negative": (dict(window=(2, -3)), ValueError, "window"),
    "window_three": (dict(window=(1, 2, 3)), ValueError, "window"),
    "window_one": (dict(window=(1,)), ValueError, "window"),
    "window_float": (dict(window=2.5), (ValueError, TypeError), "window"),
    "window_str": (dict(window="4"), (ValueError, TypeError), "window"),
    "window_bool": (dict(window=True), (ValueError, TypeError), "window"),
    "alibi_shape": (dict(alibi_slopes=[1.0, 2.0]), ValueError, "alibi_slopes"),
    "alibi_2d": (dict(alibi_slopes=np.ones((3, 1))), ValueError, "alibi_slopes"),
    "alibi_nan": (dict(alibi_slopes=[1.0, np.nan, 2.0]), ValueError, "alibi_slopes"),
    "alibi_inf": (dict(alibi_slopes=[1.0, np.inf, 2.0]), ValueError, "alibi_slopes"),
    "alibi_str": (dict(alibi_slopes=["a", "b", "c"]), TypeError, "alibi_slopes"),
    "sinks_shape": (dict(sinks=np.zeros(4)), ValueError, "sinks"),
    "sinks_scalar": (dict(sinks=1.0), ValueError, "sinks"),
    "sinks_nan": (dict(sinks=[0.0, np.nan, 0.0]), ValueError, "sinks"),
    "sinks_posinf": (dict(sinks=[0.0, np.inf, 0.0]), ValueError, "sinks"),
    "softcap_zero": (dict(softcap=0.0), ValueError, "softcap"),
    "softcap_negative": (dict(softcap=-1.0), ValueError, "softcap"),
    "softcap_inf": (dict(softcap=np.inf), ValueError, "softcap"),
    "softcap_nan": (dict(softcap=np.nan), ValueError, "softcap"),
    "softcap_str": (dict(softcap="1"), TypeError, "softcap"),
    "softcap_list": (dict(softcap=[1.0]), TypeError, "softcap"),
    "softcap_bool": (dict(softcap=True), TypeError, "softcap"),
    "q_lengths_negative": (dict(q_lengths=[-1, 2]), ValueError, "q_lengths"),
    "q_lengths_too_long": (dict(q_lengths=[6, 2]), ValueError, "q_lengths"),
    "kv_lengths_too_long": (dict(kv_lengths=[8, 2]), ValueError, "kv_lengths"),
    "kv_lengths_negative": (dict(kv_lengths=-1), ValueError, "kv_lengths"),
    "q_lengths_float": (dict(q_lengths=[1.0, 2.0]), TypeError, "q_lengths"),
    "kv_lengths_bool": (dict(kv_lengths=[True, False]), TypeError, "kv_lengths"),
    "kv_lengths_str": (dict(kv_lengths=["1", "2"]), TypeError, "kv_lengths"),
    "q_lengths_shape": (dict(q_lengths=[1, 2, 3]), ValueError, "q_lengths"),
    "kv_lengths_shape": (dict(kv_lengths=np.ones((2, 2), int)), ValueError, "kv_lengths"),
    "return_lse_not_bool": (dict(return_lse=1), TypeError, "return_lse"),
    # ragged nested lists: NumPy's own message names no argument
    "alibi_ragged": (dict(alibi_slopes=[[1.0], [1.0, 2.0], 3.0]), ValueError, "alibi_slopes"),
    "sinks_ragged": (dict(sinks=[[0.0], [0.0, 1.0], 0.0]), ValueError, "sinks"),
    "q_lengths_ragged": (dict(q_lengths=[[1], [1, 2]]), ValueError, "q_lengths"),
    "kv_lengths_ragged": (dict(kv_lengths=[[1], [1, 2]]), ValueError, "kv_lengths"),
}


@pytest.mark.parametrize("impl", ["pyattn", "reference"])
@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_modifier_arguments(case, impl):
    kwargs, exc, name = ERRORS[case]
    fn = sdpa if impl == "pyattn" else ref.scaled_dot_product_attention
    q, k, v = np.ones((2, 3, 5, 4)), np.ones((2, 3, 7, 4)), np.ones((2, 3, 7, 4))
    with pytest.raises(exc, match=rf"(?i){name}"):
        fn(q, k, v, **kwargs)


def test_window_sides_beyond_any_key_are_unbounded(rng):
    """Huge window sizes (up to 2**63 - 1) mean "no bound", without int64
    overflow in the kernel's row ranges, on the direct and tiled paths."""
    for L in (4, 40):
        q, k, v = (rng.standard_normal(s) for s in [(2, L, 8), (2, 60, 8), (2, 60, 8)])
        for window in [(None, 2**63 - 1), (2**63 - 1, None), (2**63 - 1, 2**63 - 1)]:
            np.testing.assert_allclose(sdpa(q, k, v, window=window), sdpa(q, k, v), rtol=1e-12)


def test_lse_and_weights_without_value_columns(rng):
    """Ev = 0: the output is empty, but the logsumexp and the weights do not
    depend on the values and are still computed."""
    q, k = rng.standard_normal((1, 2, 3, 4)), rng.standard_normal((1, 2, 5, 4))
    v0 = np.zeros((1, 2, 5, 0))
    out, lse = sdpa(q, k, v0, return_lse=True)
    want = ref.scaled_dot_product_attention(q, k, np.ones((1, 2, 5, 1)), return_lse=True)[1]
    assert out.shape == (1, 2, 3, 0)
    np.testing.assert_allclose(lse, want, rtol=1e-12)
    _, weights, _ = functional.attention(q, k, v0, weights="heads")
    np.testing.assert_allclose(weights.sum(-1), 1, rtol=1e-12)


def test_reference_softmax_on_any_axis(rng):
    x = rng.standard_normal((2, 3, 5))
    for axis in (0, 1, -1):
        got = ref.softmax(x, axis=axis)
        assert got.shape == x.shape
        np.testing.assert_allclose(got, np.exp(x) / np.exp(x).sum(axis, keepdims=True))
