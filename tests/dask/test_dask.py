"""pyattn.dask on a real two-process LocalCluster on loopback."""

import functools
import re
import subprocess
import sys

import numpy as np
import pytest

import pyattn

distributed = pytest.importorskip("distributed", reason="dask[distributed] is not installed")
da = pytest.importorskip("dask.array", reason="dask is not installed")
pdask = pytest.importorskip("pyattn.dask")


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(processes=True, n_workers=2, threads_per_worker=1,
                                  host="127.0.0.1", dashboard_address=None) as cluster, \
            distributed.Client(cluster) as c:
        yield c


def _qkv(B=2, Hq=4, Hkv=4, L=48, S=64, E=16, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, Hq, L, E)).astype(dtype),
            rng.standard_normal((B, Hkv, S, E)).astype(dtype),
            rng.standard_normal((B, Hkv, S, E)).astype(dtype))


def _chunked(q, k, v, qc, kc):
    return (da.from_array(q, chunks=qc + (q.shape[3],)),
            da.from_array(k, chunks=kc + (k.shape[3],)),
            da.from_array(v, chunks=kc + (v.shape[3],)))


def test_import_pyattn_does_not_import_dask():
    code = "import sys, pyattn; assert 'dask' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def _assert_chunked_agrees(client, qc, kc, opts):
    """The dask call on (qc, kc) chunks against the in-process call, output and lse."""
    q, k, v = _qkv()
    expect, expect_lse = pyattn.scaled_dot_product_attention(q, k, v, return_lse=True, **opts)
    out, lse = pdask.scaled_dot_product_attention(*_chunked(q, k, v, qc, kc), return_lse=True,
                                                  **opts)
    out, lse = client.compute([out, lse], sync=True)
    np.testing.assert_allclose(out, expect, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(lse, expect_lse, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("qc,kc", [((1, 2, 16), (1, 2, 16)), ((2, 4, 48), (2, 4, 64)),
                                   ((1, 4, 20), (1, 4, 24))])
@pytest.mark.parametrize("opts", [{}, {"is_causal": True},
                                  {"is_causal": True, "alignment": "lower_right"},
                                  {"window": (8, 3)}, {"is_causal": True, "window": 10},
                                  {"softcap": 5.0}])
def test_agrees_with_in_process(client, qc, kc, opts):
    _assert_chunked_agrees(client, qc, kc, opts)


def test_gqa_and_sinks(client):
    q, k, v = _qkv(Hq=8, Hkv=2)
    sinks = np.linspace(-1, 1, 8).astype(np.float32)
    expect = pyattn.scaled_dot_product_attention(q, k, v, enable_gqa=True, sinks=sinks,
                                                 is_causal=True)
    got = pdask.scaled_dot_product_attention(*_chunked(q, k, v, (1, 4, 16), (1, 2, 16)),
                                             enable_gqa=True, sinks=sinks, is_causal=True)
    np.testing.assert_allclose(got.compute(), expect, rtol=2e-5, atol=2e-6)


def test_fully_masked_pairs_not_scheduled():
    q, k, v = _qkv(B=1, Hq=1, Hkv=1, L=64, S=64)
    full = pdask.scaled_dot_product_attention(*_chunked(q, k, v, (1, 1, 16), (1, 1, 16)))
    causal = pdask.scaled_dot_product_attention(*_chunked(q, k, v, (1, 1, 16), (1, 1, 16)),
                                                is_causal=True)
    count = lambda x: sum(1 for key in x.__dask_graph__() if "_pair" in str(key))  # noqa: E731
    assert count(full) == 16 and count(causal) == 10


def test_bitwise_reproducible(client):
    q, k, v = _qkv(S=256)
    args = _chunked(q, k, v, (1, 2, 16), (1, 2, 32))
    runs = [pdask.scaled_dot_product_attention(*args, is_causal=True).compute()
            for _ in range(3)]
    assert all(np.array_equal(runs[0], r) for r in runs[1:])


def test_numpy_inputs_wrapped(client):
    q, k, v = _qkv()
    got = pdask.scaled_dot_product_attention(q, k, v)
    assert isinstance(got, da.Array)
    np.testing.assert_allclose(got.compute(), pyattn.scaled_dot_product_attention(q, k, v),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("qc,kc,kw,match", [
    ((1, 2, 16), (2, 2, 16), {}, "batch"),
    ((1, 2, 16), (1, 4, 16), {}, "heads"),
    ((1, 2, 16, 8), (1, 2, 16), {}, "channel"),
    ((1, 2, 16), (1, 2, 16), {"attn_mask": np.ones((48, 63), bool)}, "attn_mask"),
    ((1, 2, 16), (1, 2, 16), {"kv_lengths": [65, 3]}, "kv_lengths"),
    ((1, 2, 16), (1, 2, 16), {"q_lengths": [1, 2, 3]}, "q_lengths"),
    ((1, 2, 16), (1, 2, 16), {"alibi_slopes": [1.0]}, "alibi_slopes"),
    ((1, 2, 16), (1, 2, 16), {"alignment": "middle"}, "alignment"),
])
def test_clear_errors(qc, kc, kw, match):
    q, k, v = _qkv()
    qd = da.from_array(q, chunks=qc if len(qc) == 4 else qc + (16,))
    kd, vd = (da.from_array(x, chunks=kc + (16,)) for x in (k, v))
    with pytest.raises(ValueError, match=match):
        pdask.scaled_dot_product_attention(qd, kd, vd, **kw)


@pytest.mark.parametrize("kw,match", [({"attn_mask": np.ones((48, 64), np.int8)}, "attn_mask"),
                                      ({"kv_lengths": [1.5, 2.0]}, "kv_lengths"),
                                      ({"query": [[1.0]]}, "query"),
                                      ({"is_causal": "yes"}, "is_causal"),
                                      ({"enable_gqa": 1}, "enable_gqa")])
def test_type_errors(kw, match):
    q, k, v = _qkv()
    q = kw.pop("query", q)
    with pytest.raises(TypeError, match=match):
        pdask.scaled_dot_product_attention(q, k, v, **kw)


# chunkings that split each axis in turn, then all of them at once
AXES = [((1, 4, 48), (1, 4, 64)), ((2, 2, 48), (2, 2, 64)), ((2, 4, 16), (2, 4, 64)),
        ((2, 4, 48), (2, 4, 24)), ((1, 2, 20), (1, 2, 16))]


def _masks(B=2, H=4, L=48, S=64, seed=1):
    rng = np.random.default_rng(seed)
    boolean = rng.random((B, 1, L, S)) > 0.3
    additive = np.where(rng.random((B, H, L, S)) > 0.2, rng.standard_normal((B, H, L, S)),
                        -np.inf).astype(np.float32)
    return {"bool (L, S)": boolean[0, 0], "bool (B, 1, L, S)": boolean,
            "float (B, H, L, S)": additive}


# each mask kind on one single-axis chunking, and every kind with all axes split
MASK_CHUNKINGS = [(*AXES[n], kind) for n, kind in enumerate(_masks())] + [
    (*AXES[-1], kind) for kind in _masks()]


@pytest.mark.parametrize("qc,kc,kind", MASK_CHUNKINGS)
@pytest.mark.parametrize("opts", [{}, {"is_causal": True, "alignment": "lower_right"}])
def test_attn_mask_agrees(client, qc, kc, kind, opts):
    q, k, v = _qkv()
    mask = _masks()[kind]
    expect, expect_lse = pyattn.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                             return_lse=True, **opts)
    qd, kd, vd = _chunked(q, k, v, qc, kc)
    want = tuple((1,) if n == 1 else c for n, c in
                 zip((1,) * (4 - mask.ndim) + mask.shape, qd.chunks[:3] + (kd.chunks[2],)))
    md = da.from_array(mask, chunks=want[4 - mask.ndim:])  # chunked to match: no warning
    out, lse = pdask.scaled_dot_product_attention(qd, kd, vd, attn_mask=md, return_lse=True,
                                                  **opts)
    out, lse = client.compute([out, lse], sync=True)
    np.testing.assert_allclose(out, expect, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(lse, expect_lse, rtol=2e-5, atol=2e-5)


def test_attn_mask_rechunked_with_warning(client):
    q, k, v = _qkv()
    mask = _masks()["float (B, H, L, S)"]
    args = _chunked(q, k, v, (1, 2, 16), (1, 2, 32))
    with pytest.warns(da.PerformanceWarning, match="attn_mask is rechunked"):
        got = pdask.scaled_dot_product_attention(*args, attn_mask=da.from_array(mask),
                                                 is_causal=True)
    expect = pyattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
    np.testing.assert_allclose(got.compute(), expect, rtol=2e-5, atol=2e-6)


def test_numpy_mask_cut_without_warning(client, recwarn):
    q, k, v = _qkv()
    mask = _masks()["bool (B, 1, L, S)"]
    got = pdask.scaled_dot_product_attention(*_chunked(q, k, v, (1, 2, 16), (1, 2, 32)),
                                             attn_mask=mask)
    assert not [w for w in recwarn if issubclass(w.category, da.PerformanceWarning)]
    expect = pyattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    np.testing.assert_allclose(got.compute(), expect, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("qc,kc", AXES)
@pytest.mark.parametrize("opts", [{"alibi_slopes": np.geomspace(0.5, 0.01, 4)},
                                  {"alibi_slopes": np.geomspace(0.5, 0.01, 4), "is_causal": True,
                                   "alignment": "lower_right", "window": (20, 0)},
                                  {"kv_lengths": [64, 23], "q_lengths": [31, 48]},
                                  {"kv_lengths": [40, 0], "q_lengths": [17, 48],
                                   "is_causal": True, "alignment": "lower_right",
                                   "alibi_slopes": np.geomspace(0.5, 0.01, 4)},
                                  {"kv_lengths": [7, 64], "is_causal": True, "window": 5,
                                   "sinks": np.linspace(-1, 1, 4)}])
def test_alibi_and_lengths_agree(client, qc, kc, opts):
    _assert_chunked_agrees(client, qc, kc, opts)


def test_lengths_skip_pairs():
    q, k, v = _qkv(B=2, Hq=1, Hkv=1, L=64, S=64)
    got = pdask.scaled_dot_product_attention(*_chunked(q, k, v, (1, 1, 16), (1, 1, 16)),
                                             kv_lengths=[16, 40], q_lengths=[64, 20])
    count = sum(1 for key in got.__dask_graph__() if "_pair" in str(key))
    # sequence 0: 4 query chunks x 1 key chunk; sequence 1: 2 x 3, and its
    # last 2 query chunks (all padding) one pair each, for their zeros
    assert count == 4 + 2 * 3 + 2


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_dtypes(client, dtype):
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    q, k, v = _qkv(dtype=dtype)
    opts = {"is_causal": True, "alibi_slopes": np.geomspace(0.5, 0.01, 4)}
    expect, expect_lse = pyattn.scaled_dot_product_attention(q, k, v, return_lse=True, **opts)
    out, lse = pdask.scaled_dot_product_attention(*_chunked(q, k, v, (1, 2, 16), (1, 2, 24)),
                                                  return_lse=True, **opts)
    out, lse = client.compute([out, lse], sync=True)
    assert out.dtype == expect.dtype and lse.dtype == np.float32
    # partials are rounded to the storage dtype before each merge: a few ulps
    tol = 4e-3 if np.dtype(dtype) == np.float16 else 3e-2
    np.testing.assert_allclose(out.astype(np.float32), expect.astype(np.float32),
                               rtol=tol, atol=tol)
    np.testing.assert_allclose(lse, expect_lse, rtol=1e-5, atol=1e-5)


def _caches(client, shard_size, Hkv=2, D=16, chunks=(5, 30, 1, 1, 17), dtype=np.float32):
    """A KVCache and a ShardedKVCache fed the same appends."""
    rng = np.random.default_rng(3)
    local = pyattn.KVCache(2, Hkv, D, dtype=dtype)
    sharded = pdask.ShardedKVCache(client, 2, Hkv, D, shard_size, dtype=dtype)
    for n in chunks:
        k, v = (rng.standard_normal((2, Hkv, n, D)).astype(  # quantized caches take float32
            np.float32 if isinstance(dtype, str) else dtype) for _ in range(2))
        local.append(k, v)
        sharded.append(k, v)
    return local, sharded


def test_sharded_cache_placement(client):
    _, sharded = _caches(client, shard_size=16)
    workers = sorted(client.scheduler_info()["workers"])
    # 54 positions: shards of 16, 16, 16 and 6, alternating between the two workers
    assert sharded.length == 54
    assert sharded.shards == [(workers[0], 0, 16), (workers[1], 16, 32), (workers[0], 32, 48),
                              (workers[1], 48, 54)]
    held = client.run(lambda dask_worker: sorted(
        a.cache.lengths.tolist() for a in dask_worker.state.actors.values()))
    assert held == {workers[0]: [[16, 16], [16, 16]], workers[1]: [[6, 6], [16, 16]]}


@pytest.mark.parametrize("L,opts", [(1, {}), (1, {"sinks": np.linspace(-1, 1, 8)}),
                                    (3, {"alibi_slopes": np.geomspace(0.5, 0.01, 8)}),
                                    (7, {"window": (20, 0), "softcap": 4.0})])
def test_sharded_decode_agrees(client, L, opts):
    local, sharded = _caches(client, shard_size=16)
    q = np.random.default_rng(4).standard_normal((2, 8, L, 16)).astype(np.float32)
    expect, expect_lse = pyattn.decode_attention(q, local, return_lse=True, **opts)
    out, lse = sharded.decode(q, return_lse=True, **opts)
    np.testing.assert_allclose(out, expect, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(lse, expect_lse, rtol=2e-5, atol=2e-5)
    assert np.array_equal(sharded.decode(q, **opts), out)  # fixed merge order


def test_sharded_decode_after_more_appends(client):
    local, sharded = _caches(client, shard_size=16, chunks=(20,))
    q = np.random.default_rng(5).standard_normal((2, 4, 1, 16)).astype(np.float32)
    first = sharded.decode(q)
    rng = np.random.default_rng(6)
    for _ in range(13):  # token by token, into the second shard and a third
        k, v = (rng.standard_normal((2, 2, 1, 16)).astype(np.float32) for _ in range(2))
        local.append(k, v)
        sharded.append(k, v)
    assert [s[1:] for s in sharded.shards] == [(0, 16), (16, 32), (32, 33)]
    np.testing.assert_allclose(sharded.decode(q), pyattn.decode_attention(q, local),
                               rtol=2e-5, atol=2e-6)
    assert not np.allclose(first, sharded.decode(q))


@pytest.mark.parametrize("dtype, bad", [(np.float32, 1e39),  # refused on the client
                                        ("int8", np.nan)])  # by a shard, after another took part
def test_a_failed_append_changes_nothing(client, dtype, bad):
    """As KVCache: an append that fails leaves the cache as it was, also when
    it crosses a shard boundary and a later shard refuses its part."""
    local, sharded = _caches(client, shard_size=4, chunks=(2,), dtype=dtype)
    before = sharded.shards
    k = np.random.default_rng(8).standard_normal((2, 2, 6, 16))
    k[1, 0, 5, 3] = bad  # position 5: in the second shard this append opens
    with pytest.raises(ValueError, match="k_new"):
        sharded.append(k, k)
    with pytest.raises(ValueError, match="k_new"):
        local.append(k, k)
    assert sharded.length == 2 and sharded.shards == before
    good = np.random.default_rng(9).standard_normal((2, 2, 5, 16)).astype(np.float32)
    local.append(good, good)
    sharded.append(good, good)
    q = np.random.default_rng(5).standard_normal((2, 4, 1, 16)).astype(np.float32)
    np.testing.assert_allclose(sharded.decode(q), pyattn.decode_attention(q, local),
                               rtol=2e-5, atol=2e-6)


def test_unknown_chunk_sizes_are_refused():
    """Boolean indexing leaves chunk sizes unknown: the pairs' positions
    would be wrong, so they are refused with the way out."""
    q, k, v = _qkv()
    kd = da.from_array(k, chunks=(1, 2, 16, 16))
    keep = da.from_array(np.arange(64) % 3 > 0, chunks=16)
    with pytest.raises(ValueError, match=r"key has unknown chunk sizes .*compute_chunk_sizes"):
        pdask.scaled_dot_product_attention(q, kd[:, :, keep], kd[:, :, keep])


def test_zero_head_dim_refused_as_in_process():
    q, k, v = (x[..., :0] for x in _qkv())
    with pytest.raises(ValueError) as in_process:
        pyattn.scaled_dot_product_attention(q, k, v)
    with pytest.raises(ValueError) as on_dask:
        pdask.scaled_dot_product_attention(q, k, v)
    assert str(on_dask.value) == str(in_process.value)


@pytest.mark.parametrize("call,match", [
    (lambda c: pdask.ShardedKVCache(c, 2, 2, 16, 0), "shard_size"),
    (lambda c: pdask.ShardedKVCache(c, 2, 2, 16, 8).decode(np.zeros((2, 2, 1, 16))), "empty"),
    (lambda c: pdask.ShardedKVCache(c, 2, 2, 16, 8).append(np.zeros((2, 2, 3, 16)),
                                                           np.zeros((2, 2, 3, 8))), "v_new"),
    (lambda c: _caches(c, 16)[1].decode(np.zeros((2, 2, 1, 8))), "query"),
])
def test_sharded_cache_errors(client, call, match):
    with pytest.raises(ValueError, match=match):
        call(client)


# options the in-process call refuses: dask refuses them with the same error,
# before any task runs (a bad window or ALiBi slope used to give NaN or zeros)
BAD_OPTIONS = [{"window": -1}, {"window": (-2, 3)}, {"window": 2.5}, {"window": True},
               {"alibi_slopes": [np.nan, 0.1, 0.1, 0.1]}, {"alibi_slopes": [np.inf, 0, 0, 0]},
               {"alibi_slopes": [1e38, 0, 0, 0]}, {"scale": 1e300}, {"precision": "x"},
               {"softcap": -1.0}, {"sinks": [np.nan, 1.0, 1.0, 1.0]}]


@pytest.mark.parametrize("opts", BAD_OPTIONS, ids=str)
def test_options_refused_as_in_process(opts):
    q, k, v = _qkv()
    with pytest.raises((ValueError, TypeError)) as in_process:
        pyattn.scaled_dot_product_attention(q, k, v, **opts)
    with pytest.raises(in_process.type) as on_dask:
        pdask.scaled_dot_product_attention(*_chunked(q, k, v, (1, 2, 16), (1, 2, 16)), **opts)
    assert str(on_dask.value) == str(in_process.value)


@pytest.mark.parametrize("opts", BAD_OPTIONS, ids=str)
def test_sharded_decode_refuses_as_in_process(client, opts):
    local, sharded = _caches(client, shard_size=16, Hkv=4)
    q = np.zeros((2, 4, 1, 16), np.float32)
    with pytest.raises((ValueError, TypeError)) as in_process:
        pyattn.decode_attention(q, local, **opts)
    with pytest.raises(in_process.type) as sharded_error:
        sharded.decode(q, **opts)
    assert str(sharded_error.value) == str(in_process.value)


BAD_MASKS = [np.ones((48, 63), bool), np.ones((1, 1, 1, 1, 48, 64), bool),
             np.ones((48, 64), np.int8), np.full((48, 64), -1e300)]  # the last: narrowing


@pytest.mark.parametrize("mask", BAD_MASKS, ids=lambda m: f"{m.dtype}{m.shape}")
@pytest.mark.parametrize("as_dask", [False, True])
def test_masks_refused_as_in_process(client, mask, as_dask):
    q, k, v = _qkv()
    with pytest.raises((ValueError, TypeError)) as in_process:
        pyattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    given = da.from_array(mask, chunks=16) if as_dask else mask
    with pytest.raises(in_process.type) as on_dask:
        # a dask mask's values are seen when its pairs run
        out = pdask.scaled_dot_product_attention(*_chunked(q, k, v, (1, 2, 16), (1, 2, 16)),
                                                 attn_mask=given)
        client.compute(out, sync=True)
    # the count of narrowed values is a dask mask's failing chunk's (256, not 3072)
    count = functools.partial(re.sub, r"holds \d+ finite", "holds N finite")
    assert count(str(on_dask.value)) == count(str(in_process.value))


def test_list_window_and_bfloat16_mask_as_in_process(client):
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes is not installed")
    q, k, v = _qkv()
    mask = np.random.default_rng(7).standard_normal((48, 64)).astype(ml_dtypes.bfloat16)
    for opts in ({"window": [5, 2]}, {"attn_mask": mask}):
        expect = pyattn.scaled_dot_product_attention(q, k, v, **opts)
        out = pdask.scaled_dot_product_attention(*_chunked(q, k, v, (1, 2, 16), (1, 2, 16)),
                                                 **opts)
        np.testing.assert_allclose(client.compute(out, sync=True), expect, rtol=2e-5, atol=2e-6)


def test_finite_mask_on_every_key_across_chunks(client):
    q, k, v = _qkv()
    mask = np.zeros((48, 64), np.float32)
    mask[5] = np.finfo(np.float32).min  # HF-style padding on every key of row 5
    expect, expect_lse = pyattn.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                             return_lse=True)
    # the scores are finite and equal: the row is the mean of the values
    np.testing.assert_allclose(expect[..., 5, :], v.mean(axis=-2), rtol=1e-5, atol=1e-6)
    out, lse = pdask.scaled_dot_product_attention(*_chunked(q, k, v, (1, 2, 16), (1, 2, 24)),
                                                  attn_mask=mask, return_lse=True)
    out, lse = client.compute((out, lse), sync=True)
    np.testing.assert_allclose(out, expect, rtol=2e-5, atol=2e-6)
    np.testing.assert_array_equal(lse[..., 5], expect_lse[..., 5])
    np.testing.assert_allclose(lse, expect_lse, rtol=2e-5, atol=2e-6)
