"""``--suite dask``: pyattn.dask on local clusters against in-process pyattn
(docs/scale-out.md).

Prefill B1 H8 L = S = 8192 D64 float32, unmasked: in-process pyattn on N
threads timed interleaved with pyattn.dask on N workers x 1 thread, then
pyattn.dask on 1 worker x 1 thread.  The inputs are placed on the workers
first (each head chunk's q, k and v on one worker, as data already resident
on a cluster), so the timed call is the computation and the gathering of the output to the client.
Heads are split into N chunks, one per worker, in both cluster runs: the
same graph, so that 1 worker against N shows the scheduling alone.

Decode over S = 65536 H8 D128 float32, one query: pyattn.decode_attention
against a KVCache in process on N threads against a ShardedKVCache with one
shard per worker on N workers x 1 thread, timed interleaved; its overhead
per step is the difference.  The cost of one empty task (submit and result)
on the cluster is timed with them: the per-task overhead of the model in
docs/scale-out.md.

Every cluster is a distributed.LocalCluster of processes on loopback.
"""
import numpy as np

import pyattn
from pyattn.bench.cases import TOLERANCE, Case
from pyattn.bench.timing import summarize, time_calls

PREFILL = Case("dask-prefill", B=1, H=8, L=8192, S=8192, D=64)
DECODE = Case("dask-decode", B=1, H=8, L=1, S=65536, D=128, cache=True)


def _noop():
    return None


def _cluster(n_workers):
    from distributed import Client, LocalCluster
    cluster = LocalCluster(processes=True, n_workers=n_workers, threads_per_worker=1,
                           host="127.0.0.1", dashboard_address=None, silence_logs=40)
    return cluster, Client(cluster)


def _on_workers(client, arrays, n_chunks):
    """Dask arrays of `arrays` (B, H, L, D) split into n_chunks head chunks,
    chunk h of every array scattered to worker h mod n_workers."""
    import dask.array as da
    workers = sorted(client.scheduler_info()["workers"])
    H = arrays[0].shape[1]
    step = H // n_chunks
    result = []
    for x in arrays:
        parts = []
        for c in range(n_chunks):
            block = np.ascontiguousarray(x[:, c * step:(c + 1) * step])
            future = client.scatter(block, workers=[workers[c % len(workers)]], hash=False)
            parts.append(da.from_delayed(future, block.shape, dtype=block.dtype))
        result.append(da.concatenate(parts, axis=1))
    return result


def _entry(timed, name, case):
    entry = summarize(timed.times[name])
    entry["gflops"] = case.flops / (entry["median_ms"] / 1e3) / 1e9
    return entry


def _check(got, want, case):
    return bool(np.allclose(got, want, **TOLERANCE[case.dtype]))


def run_prefill(workers, repeat=None, log=print):
    """The prefill: in process on `workers` threads timed interleaved with
    a `workers` x 1 cluster (the machine's noise hits both alike), then a
    1 x 1 cluster; {label: timing entry}."""
    import pyattn.dask as pdask
    case = PREFILL
    q, k, v = case.make_inputs()
    inside = f"in process, {workers} threads"
    results, want = {}, None
    for n in (workers, 1):
        label = f"{n} worker{'s' if n > 1 else ''} x 1 thread"
        log(f"  {case.name}: {label}" + (f", interleaved with {inside}" if n > 1 else "") + " ...")
        cluster, client = _cluster(n)
        with cluster, client:
            qd, kd, vd = _on_workers(client, (q, k, v), workers)
            out = pdask.scaled_dot_product_attention(qd, kd, vd)
            calls = {label: lambda c=client, o=out: c.compute(o, sync=True)}
            if n > 1:
                calls = {inside: lambda: pyattn.scaled_dot_product_attention(
                    q, k, v, num_threads=workers), **calls}
            timed = time_calls(calls, repeat)
        if want is None:
            want = timed.results[inside]
        for name in calls:
            results[name] = dict(_entry(timed, name, case),
                                 matches=_check(timed.results[name], want, case))
    return results


def run_decode(workers, repeat=None, log=print):
    """The decode step in process on `workers` threads, against a
    ShardedKVCache of one shard per worker, and one empty task's round
    trip, all timed interleaved; {label: timing entry}."""
    import pyattn.dask as pdask
    case = DECODE
    q, k, v = case.make_inputs()
    cache = pyattn.KVCache(case.B, case.Hkv, case.D, max_len=case.S)
    cache.append(k, v)
    inside, label = f"in process, {workers} threads", f"sharded, {workers} workers x 1 thread"
    log(f"  {case.name}: {inside}, ShardedKVCache on {workers} workers x 1 thread, "
        "an empty task, interleaved ...")
    cluster, client = _cluster(workers)
    with cluster, client:
        sharded = pdask.ShardedKVCache(client, case.B, case.Hkv, case.D,
                                       shard_size=-(-case.S // workers))
        sharded.append(k, v)
        timed = time_calls({inside: lambda: pyattn.decode_attention(q, cache,
                                                                    num_threads=workers),
                            label: lambda: sharded.decode(q),
                            "one empty task": lambda: client.submit(_noop, pure=False).result()},
                           repeat)
    want = timed.results[inside]
    return {inside: dict(_entry(timed, inside, case), matches=True),
            label: dict(_entry(timed, label, case),
                        matches=_check(timed.results[label], want, case)),
            "one empty task": dict(summarize(timed.times["one empty task"]), matches=True)}


def run_dask_suite(workers=2, repeat=None, log=print):
    """Both parts; a dict for the JSON report."""
    return {"workers": workers, "prefill": dict(case=PREFILL.shape, dtype=PREFILL.dtype,
                                                results=run_prefill(workers, repeat, log)),
            "decode": dict(case=DECODE.shape, dtype=DECODE.dtype,
                           results=run_decode(workers, repeat, log))}


def format_dask(report):
    """The two tables: median ms, p10-p90, GFLOP/s, and the ratios the
    issue's targets are stated in."""
    lines = []
    for part, title in (("prefill", "prefill B1 H8 L=S=8192 D64 float32"),
                        ("decode", "decode step B1 H8 L1 S=65536 D128 float32")):
        results = report[part]["results"]
        base = next(iter(results.values()))["median_ms"]
        lines += [f"{title}:", f"  {'':<34} {'median ms':>10} {'p10-p90 ms':>18} "
                               f"{'GFLOP/s':>8} {'/ in-process':>12}"]
        for label, e in results.items():
            flops = f"{e['gflops']:.1f}" if "gflops" in e else ""
            wrong = "" if e["matches"] else "  (WRONG)"
            lines.append(f"  {label:<34} {e['median_ms']:>10.2f} "
                         f"{e['p10_ms']:>8.2f}-{e['p90_ms']:<9.2f} {flops:>8} "
                         f"{e['median_ms'] / base:>12.3f}{wrong}")
        lines.append("")
    w = report["workers"]
    pre = report["prefill"]["results"]
    t_in, t_n, t_1 = (pre[k]["median_ms"] for k in list(pre))
    dec = report["decode"]["results"]
    d_in, d_sh = (dec[k]["median_ms"] for k in list(dec)[:2])
    lines += [f"prefill: {w} workers / in process {t_n / t_in:.3f} (target <= 1.2), "
              f"speed-up over 1 worker {t_1 / t_n:.2f}x (target >= 1.7)",
              f"decode: sharded - in process {d_sh - d_in:+.2f} ms per step (target <= +5)"]
    return "\n".join(lines)
