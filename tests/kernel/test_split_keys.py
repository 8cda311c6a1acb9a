"""Split-KV: few work items and many keys -> key chunks merged exactly."""
import numpy as np
import pytest

import pyattn
from pyattn import _plan
from pyattn import reference as ref


@pytest.mark.parametrize("n_items, S, expect_split", [
    (1, 4096, True), (4, 100_000, True), (15, 2048, True),
    (16, 100_000, False), (1, 2047, False), (1, 100, False),
])
def test_split_rule_depends_on_shape_only(n_items, S, expect_split):
    chunk = _plan.split_keys(n_items, S)
    assert (chunk > 0) == expect_split
    if chunk:
        assert chunk % _plan.SPLIT_MIN_KEYS == 0
        assert 2 <= -(-S // chunk) <= _plan.SPLIT_TARGET_ITEMS


@pytest.mark.parametrize("dtype, tol", [(np.float32, 2e-6), (np.float64, 1e-13)])
@pytest.mark.parametrize("L, S", [(1, 4096), (3, 5000), (70, 2500), (1, 2048)])
@pytest.mark.parametrize("masking", ["none", "causal", "bool", "prefix"])
def test_split_path_matches_reference(dtype, tol, L, S, masking, rng):
    assert _plan.split_keys(1, S) > 0  # these shapes do take the split path
    q = rng.standard_normal((1, 1, L, 32)).astype(dtype)
    k = rng.standard_normal((1, 1, S, 32)).astype(dtype)
    v = rng.standard_normal((1, 1, S, 24)).astype(dtype)
    kwargs = {
        "none": {},
        "causal": {"is_causal": True},  # later chunks see no key for early rows
        "bool": {"attn_mask": rng.random((L, S)) > 0.5},
        "prefix": {"attn_mask": np.arange(S) < 700},  # whole chunks fully masked
    }[masking]
    got = pyattn.scaled_dot_product_attention(q, k, v, **kwargs)
    want = ref.scaled_dot_product_attention(q, k, v, **kwargs)
    np.testing.assert_allclose(got, want, rtol=10 * tol, atol=tol)
    for n in (1, 2, 3):  # chunking never depends on the thread count
        assert np.array_equal(
            pyattn.scaled_dot_product_attention(q, k, v, num_threads=n, **kwargs), got)


def test_split_path_fully_masked_rows_are_zero(rng):
    q, k, v = (rng.standard_normal((1, 2, s, 16)) for s in (2, 4096, 4096))
    mask = np.ones((2, 4096), bool)
    mask[1] = False
    got = pyattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert np.array_equal(got[:, :, 1], np.zeros_like(got[:, :, 1]))
    assert np.isfinite(got).all()


@pytest.mark.parametrize("cuts", [[1], [5, 6], [1, 2, 3, 50], [30, 31]])
def test_merge_attention_of_arbitrary_key_splits_is_exact(cuts, rng):
    """Attention over key slices, merged by their logsumexps, is attention over
    all keys; a slice with every key masked carries lse = -inf."""
    L, S = 7, 64
    q, k, v = (rng.standard_normal(s) for s in [(2, L, 8), (2, S, 8), (2, S, 5)])
    mask = rng.random((L, S)) > 0.3
    mask[:, 40:] = False
    outs, lses = [], []
    for lo, hi in zip([0] + cuts, cuts + [S]):
        o, lse = ref.scaled_dot_product_attention(q, k[:, lo:hi], v[:, lo:hi],
                                                  attn_mask=mask[:, lo:hi], return_lse=True)
        outs.append(o)
        lses.append(lse)
    merged, merged_lse = pyattn.merge_attention(outs, lses)
    want, want_lse = ref.scaled_dot_product_attention(q, k, v, attn_mask=mask, return_lse=True)
    np.testing.assert_allclose(merged, want, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(merged_lse, want_lse, rtol=1e-12)
    # the lse itself, written out: log sum_j exp(score_j) over the keys taking part
    scores = np.where(mask, q @ k.swapaxes(-1, -2) / np.sqrt(8), -np.inf)
    np.testing.assert_allclose(want_lse, np.log(np.exp(scores).sum(-1)), rtol=1e-12)


def test_driver_refuses_key_chunks_off_the_tile_grid():
    """Key chunks must start on the kernels' tiles (multiples of KEY_CHUNK)."""
    q = np.zeros((1, 1, 1, 4), np.float32)
    assert pyattn._attention.KEY_CHUNK == _plan.SPLIT_MIN_KEYS == 1024
    with pytest.raises(ValueError, match="multiple of 1024"):
        pyattn._attention.attend(
            pyattn._dispatch.KERNEL, "float32", pointers=(q.ctypes.data,) * 3 + (0, q.ctypes.data),
            batch_offsets=np.zeros((5, 1), np.int64), head_strides=(0,) * 5, num_heads=1,
            kv_group=1, sizes=(1, 1, 4, 4), inner_strides=(4, 1) * 5, mask_kind=0,
            window=(-1, -1), scale=0.5, num_threads=1, key_chunk=100)


@pytest.mark.parametrize("shape", [
    dict(L=3, S=64, Hq=2, Hkv=2),     # one launch, no split
    dict(L=1, S=4096, Hq=2, Hkv=2),   # split-KV chunks, merged into the state
    dict(L=1, S=64, Hq=4, Hkv=1),     # GQA heads run as rows
    dict(L=3, S=0, Hq=2, Hkv=2),      # no key: (sink, 1), or (-inf, 0)
])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_split_state_is_the_lse_in_two_parts(shape, with_sinks, rng):
    """The private split_state: (max, sum) whose lse is return_lse's, and
    which merges key ranges scored finfo.min by their key count."""
    from pyattn.functional import attention
    L, S, Hq, Hkv = shape["L"], shape["S"], shape["Hq"], shape["Hkv"]
    q = rng.standard_normal((2, Hq, L, 16)).astype(np.float32)
    k, v = (rng.standard_normal((2, Hkv, S, 16)).astype(np.float32) for _ in "kv")
    kw = dict(enable_gqa=True, sinks=rng.standard_normal(Hq) if with_sinks else None)
    out, lse = pyattn.scaled_dot_product_attention(q, k, v, return_lse=True, **kw)
    got, _, (row_max, row_sum) = attention(q, k, v, return_lse=True, split_state=True, **kw)
    np.testing.assert_array_equal(got, out)
    np.testing.assert_allclose(_plan.lse_of_state(row_max, row_sum), lse, rtol=1e-6)
    assert ((row_sum == 0) == np.isneginf(lse)).all()


def test_split_states_of_finfo_min_rows_merge_by_key_count(rng):
    """Two key ranges of 10 and 30 keys, every score finfo.min: each key
    weighs alike, which their float32 lses (both finfo.min) cannot tell."""
    from pyattn.functional import attention
    q = rng.standard_normal((1, 1, 16)).astype(np.float32)
    k, v = (rng.standard_normal((1, 40, 16)).astype(np.float32) for _ in "kv")
    mask = np.full((1, 40), np.finfo(np.float32).min, np.float32)
    parts = [attention(q, k[:, s], v[:, s], mask[:, s], return_lse=True, split_state=True)
             for s in (slice(0, 10), slice(10, 40))]
    outs = np.stack([p[0] for p in parts])
    maxes, sums = (np.stack([p[2][i] for p in parts]) for i in (0, 1))
    merged, _ = _plan.merge_partials(outs, maxes, sums=sums)
    np.testing.assert_allclose(merged[0, 0], v[0].mean(axis=0), rtol=1e-5, atol=1e-6)
