"""pyattn.dask under failure and memory pressure, on its own two-process
LocalCluster: a worker killed mid-computation, and keys and values larger
than a worker's memory limit."""

import os

import numpy as np
import pytest

import pyattn

distributed = pytest.importorskip("distributed", reason="dask[distributed] is not installed")
dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array", reason="dask is not installed")
pdask = pytest.importorskip("pyattn.dask")

# a worker idles at ~85 MiB with pyattn and dask imported; a pair task below
# holds ~40 MiB (its 16 MiB key and value chunks, the query, the result)
MEMORY_LIMIT = 256 * 2**20


@pytest.fixture(scope="module")
def client():
    # no spilling: a worker past its limit is paused, then killed by its
    # nanny, instead of keeping its data on disk; so the memory test fails
    # if any task holds more than its chunks
    with dask.config.set({"distributed.worker.memory.target": False,
                          "distributed.worker.memory.spill": False}), \
            distributed.LocalCluster(processes=True, n_workers=2, threads_per_worker=1,
                                     memory_limit=MEMORY_LIMIT, host="127.0.0.1",
                                     dashboard_address=None) as cluster, \
            distributed.Client(cluster) as c:
        yield c


def _workers(client):
    client.wait_for_workers(2, timeout=30)
    return set(client.scheduler_info()["workers"])


def test_killed_worker_rescheduled_bitwise(client, tmp_path):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 4, 64, 32)).astype(np.float32) for _ in range(3))
    flag = str(tmp_path / "kill")

    def maybe_kill(block, block_id=None):
        # the last key chunk's first run kills its worker: by then earlier
        # pairs have finished on it, and their results are lost with it
        if block_id[2] == 3 and os.path.exists(flag):
            os.remove(flag)
            os._exit(1)
        return block

    qd = da.from_array(q, chunks=(1, 2, 16, 32))
    kd = da.from_array(k, chunks=(1, 2, 16, 32))
    vd = da.from_array(v, chunks=(1, 2, 16, 32)).map_blocks(maybe_kill, dtype=v.dtype)
    out = pdask.scaled_dot_product_attention(qd, kd, vd, is_causal=True, alignment="lower_right")
    undisturbed = out.compute()
    before = _workers(client)
    open(flag, "w").close()
    disturbed = client.compute(out).result(timeout=60)
    assert not os.path.exists(flag)  # the kill happened ...
    assert _workers(client) != before  # ... and the nanny started a new worker
    assert np.array_equal(disturbed, undisturbed)
    np.testing.assert_allclose(undisturbed, pyattn.scaled_dot_product_attention(
        q, k, v, is_causal=True, alignment="lower_right"), rtol=2e-5, atol=2e-6)


def test_keys_larger_than_worker_memory(client):
    # 2**20 keys of 64 float32 channels: 256 MiB of keys and 256 MiB of values,
    # twice a worker's limit, made on the workers in 16 MiB chunks
    S, E, chunk = 2**20, 64, 2**16
    gen = da.random.default_rng(1)
    k = gen.standard_normal((1, 1, S, E), dtype=np.float32, chunks=(1, 1, chunk, E))
    v = gen.standard_normal((1, 1, S, E), dtype=np.float32, chunks=(1, 1, chunk, E))
    assert k.nbytes + v.nbytes > 2 * MEMORY_LIMIT - 1
    q = np.random.default_rng(2).standard_normal((1, 1, 8, E)).astype(np.float32)
    out, lse = pdask.scaled_dot_product_attention(q, k, v, return_lse=True)
    before = _workers(client)
    out, lse = (f.result(timeout=60) for f in client.compute([out, lse]))
    assert _workers(client) == before  # no worker went past its limit and was killed
    kn, vn = dask.compute(k, v, scheduler="threads")  # the same chunks, here
    expect, expect_lse = pyattn.scaled_dot_product_attention(q, kn, vn, return_lse=True)
    np.testing.assert_allclose(out, expect, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(lse, expect_lse, rtol=1e-5, atol=1e-5)
