"""``--memory``: MEMORY_CASE through pyattn in a fresh interpreter, whose
peak resident set size is then the call's own (inputs, output, working memory)."""
import json
import sys
import time
from dataclasses import asdict

import numpy as np

from pyattn.bench.cases import MEMORY_CASE
from pyattn.bench.child import run_child
from pyattn.bench.peers import IMPLEMENTATIONS, SUBJECT


def peak_rss_bytes():
    """This process image's peak resident set size: VmHWM on Linux.  Not
    ru_maxrss there, which keeps the high-water mark of the image before exec
    (the parent that forked this process)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024  # KiB elsewhere


def _memory_worker():
    """Runs in a fresh process: MEMORY_CASE through pyattn; prints JSON."""
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else None
    case = MEMORY_CASE
    after_import = peak_rss_bytes()
    q, k, v = case.make_inputs()
    before_call = peak_rss_bytes()
    t0 = time.perf_counter()
    out = IMPLEMENTATIONS[SUBJECT](case, q, k, v, threads)()
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()  # before the checks below allocate
    print(json.dumps({
        "case": asdict(case),
        "threads": threads,
        "seconds": seconds,
        "gflops": case.flops / seconds / 1e9,
        "peak_rss_bytes": peak,
        "rss_after_import_bytes": after_import,
        "rss_before_call_bytes": before_call,
        "inputs_bytes": q.nbytes + k.nbytes + v.nbytes,
        "output_bytes": out.nbytes,
        "finite": bool(np.isfinite(out).all()),
    }))


def run_memory(threads):
    """MEMORY_CASE in a fresh interpreter (so the peak RSS is its own)."""
    case = MEMORY_CASE
    result = run_child("memory worker", "from pyattn.bench.memory import _memory_worker; "
                       "_memory_worker()", threads)
    itemsize = np.dtype(case.dtype).itemsize
    result["reference_scores_bytes"] = case.B * case.H * case.L * case.S * itemsize
    return result


def format_memory(m):
    c = m["case"]
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    gib = lambda b: f"{b / 2**30:,.2f} GiB"  # noqa: E731
    extra = m["peak_rss_bytes"] - m["rss_before_call_bytes"]
    return "\n".join([
        f"peak memory: B{c['B']} H{c['H']} L{c['L']} S{c['S']} D{c['D']} {c['dtype']}"
        f"{' causal' if c['causal'] else ''} through pyattn, {m['threads']} threads,"
        f" fresh process",
        f"  time                        {m['seconds']:.2f} s ({m['gflops']:.1f} GFLOP/s)",
        f"  inputs q, k, v              {mib(m['inputs_bytes'])}",
        f"  output                      {mib(m['output_bytes'])}",
        f"  RSS after import            {mib(m['rss_after_import_bytes'])}",
        f"  RSS before the call         {mib(m['rss_before_call_bytes'])}",
        f"  peak RSS (VmHWM)            {mib(m['peak_rss_bytes'])}",
        f"  growth during the call      {mib(extra)} (output + working memory)",
        f"  reference's scores alone    {gib(m['reference_scores_bytes'])}"
        f" (B*H*L*S*4 bytes; not run)",
        f"  output finite               {m['finite']}",
    ])
