"""pyattn.dask on a real two-process LocalCluster on loopback."""

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


@pytest.mark.parametrize("qc,kc", [((1, 2, 16), (1, 2, 16)), ((2, 4, 48), (2, 4, 64)),
                                   ((1, 4, 20), (1, 4, 24))])
@pytest.mark.parametrize("opts", [{}, {"is_causal": True},
                                  {"is_causal": True, "alignment": "lower_right"},
                                  {"window": (8, 3)}, {"is_causal": True, "window": 10},
                                  {"softcap": 5.0}])
def test_agrees_with_in_process(client, qc, kc, opts):
    q, k, v = _qkv()
    expect, expect_lse = pyattn.scaled_dot_product_attention(q, k, v, return_lse=True, **opts)
    out, lse = pdask.scaled_dot_product_attention(*_chunked(q, k, v, qc, kc), return_lse=True,
                                                  **opts)
    out, lse = client.compute([out, lse], sync=True)
    np.testing.assert_allclose(out, expect, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(lse, expect_lse, rtol=2e-5, atol=2e-5)


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
    ((1, 2, 16), (1, 2, 16), {"attn_mask": np.ones((48, 64), bool)}, "attn_mask"),
    ((1, 2, 16), (1, 2, 16), {"alignment": "middle"}, "alignment"),
])
def test_clear_errors(qc, kc, kw, match):
    q, k, v = _qkv()
    qd = da.from_array(q, chunks=qc if len(qc) == 4 else qc + (16,))
    kd, vd = (da.from_array(x, chunks=kc + (16,)) for x in (k, v))
    with pytest.raises(ValueError, match=match):
        pdask.scaled_dot_product_attention(qd, kd, vd, **kw)
