"""Benchmarks: pyattn against its pure-NumPy reference on named shapes.

Run ``python -m pyattn.bench`` (or ``python -m pyattn bench``); ``--help``
lists the options.  The table gives, per case, the median wall time of each
implementation, the speedup of pyattn over the reference, pyattn's attention
throughput in GFLOP/s and its memory traffic in GB/s (q, k, v and out counted
once each), and the thread count.  ``--memory`` instead runs one long sequence
through pyattn in a fresh process and prints its peak RSS.

Structure, kept simple so more implementations can be added as columns:
``CASES`` maps a name to a :class:`Case`, ``IMPLEMENTATIONS`` maps a name to a
callable ``fn(q, k, v, causal, threads) -> output``; pyattn and the reference
are the first two entries, pyattn is the one the throughput columns describe
and the reference the one the speedup and the correctness check are against.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import numpy as np

import pyattn
from pyattn import _attention

__all__ = ["CASES", "IMPLEMENTATIONS", "Case", "main", "run_case", "machine_info"]


# ---------------------------------------------------------------- the cases
@dataclass(frozen=True)
class Case:
    """One attention problem: q (B, H, L, D), k and v (B, H, S, D)."""

    name: str
    B: int
    H: int
    L: int
    S: int
    D: int
    dtype: str = "float32"
    causal: bool = False

    @property
    def shape(self):
        return f"{self.B} {self.H} {self.L} {self.S} {self.D}"

    @property
    def unmasked_pairs(self):
        """(query, key) pairs that take part: L*S, or for is_causal (torch's
        top-left aligned lower triangle) sum over rows i of min(i + 1, S)."""
        L, S = self.L, self.S
        if not self.causal:
            return L * S
        if L <= S:
            return L * (L + 1) // 2
        return S * (S + 1) // 2 + (L - S) * S

    @property
    def flops(self):
        """4*D per (query, key) pair: 2*D for q.k and 2*D for p*v."""
        return 4 * self.B * self.H * self.D * self.unmasked_pairs

    @property
    def nbytes(self):
        """Bytes of q, k, v and out, each read or written once."""
        itemsize = np.dtype(self.dtype).itemsize
        return itemsize * self.B * self.H * self.D * (2 * self.L + 2 * self.S)

    def make_inputs(self, seed=0):
        rng = np.random.default_rng(seed)
        dtype = np.dtype(self.dtype)
        q = rng.standard_normal((self.B, self.H, self.L, self.D), dtype=dtype)
        k = rng.standard_normal((self.B, self.H, self.S, self.D), dtype=dtype)
        v = rng.standard_normal((self.B, self.H, self.S, self.D), dtype=dtype)
        return q, k, v


CASES = {
    c.name: c
    for c in [
        Case("prefill", B=1, H=8, L=2048, S=2048, D=64),
        Case("bert", B=8, H=12, L=128, S=128, D=64),
        Case("causal", B=1, H=8, L=2048, S=2048, D=64, causal=True),
        Case("decode", B=1, H=32, L=1, S=4096, D=128),
        Case("prefill-f64", B=1, H=8, L=1024, S=1024, D=64, dtype="float64"),
    ]
}

# the --memory case: the reference would need B*H*L*S*4 bytes for its scores
MEMORY_CASE = Case("memory", B=1, H=8, L=16384, S=16384, D=64)

# how close pyattn must be to the reference (np.allclose)
TOLERANCE = {"float32": dict(rtol=1e-4, atol=1e-5), "float64": dict(rtol=1e-9, atol=1e-11)}


# ------------------------------------------------------- the implementations
def _pyattn(q, k, v, causal, threads):
    return pyattn.scaled_dot_product_attention(q, k, v, is_causal=causal, num_threads=threads)


def _reference(q, k, v, causal, threads):
    # num_threads is only validated by the reference; NumPy's BLAS decides
    # (main() limits the BLAS pool to --threads when threadpoolctl is present)
    return pyattn.reference.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                         num_threads=threads)


IMPLEMENTATIONS = {"pyattn": _pyattn, "reference": _reference}
SUBJECT, BASELINE = "pyattn", "reference"

REFERENCE_MAX_REPEAT = 5   # the reference is slow: at most this many timed runs
DEFAULT_MAX_REPEAT = 50    # without --repeat: at most this many timed runs ...
DEFAULT_MIN_REPEAT = 3     # ... at least this many ...
TIME_BUDGET_S = 4.0        # ... and otherwise as many as fit in this, per case and implementation


# ------------------------------------------------------------- measurement
def time_calls(fn, repeat):
    """Wall times (s) of `repeat` calls of fn(), and the last result."""
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result


def run_case(case, impls, threads, repeat=None, log=None):
    """Time every implementation on `case`; a dict of the measurements.

    Each implementation is called once untimed (warm-up), then `repeat` times
    (the reference at most REFERENCE_MAX_REPEAT times).  With repeat=None the
    count comes from the warm-up time: as many runs as fit in TIME_BUDGET_S,
    between DEFAULT_MIN_REPEAT and DEFAULT_MAX_REPEAT.
    """
    q, k, v = case.make_inputs()
    record = dict(asdict(case), shape=case.shape, flops=case.flops, bytes=case.nbytes,
                  threads=threads, impls={})
    outputs = {}
    for name, fn in impls.items():
        if log:
            log(f"  {case.name}: {name} ...")
        call = lambda fn=fn: fn(q, k, v, case.causal, threads)  # noqa: E731
        t0 = time.perf_counter()
        outputs[name] = call()  # warm-up
        warmup = time.perf_counter() - t0
        if repeat is None:
            n = int(TIME_BUDGET_S / max(warmup, 1e-9))
            n = max(DEFAULT_MIN_REPEAT, min(DEFAULT_MAX_REPEAT, n))
        else:
            n = repeat
        if name == BASELINE:
            n = min(n, REFERENCE_MAX_REPEAT)
        times, _ = time_calls(call, n)
        med = statistics.median(times)
        record["impls"][name] = {
            "median_ms": med * 1e3,
            "min_ms": min(times) * 1e3,
            "repeat": n,
            "warmup_ms": warmup * 1e3,
            "times_ms": [t * 1e3 for t in times],
            "gflops": case.flops / med / 1e9,
            "gbps": case.nbytes / med / 1e9,
        }
    if SUBJECT in outputs and BASELINE in outputs:
        got, want = outputs[SUBJECT], outputs[BASELINE]
        record["max_abs_err"] = float(np.max(np.abs(got - want)))
        record["matches_reference"] = bool(np.allclose(got, want, **TOLERANCE[case.dtype]))
        record["speedup"] = (record["impls"][BASELINE]["median_ms"]
                             / record["impls"][SUBJECT]["median_ms"])
    return record


# ----------------------------------------------------------------- machine
def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info():
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pyattn": pyattn.config(),
    }


def header(machine, threads):
    cfg = machine["pyattn"]
    omp = "OpenMP" if cfg["openmp"] else "no OpenMP"
    return (f"pyattn {cfg['version']} | CPU: {machine['cpu_model']} "
            f"({machine['usable_cpus']} usable cores) | threads: {threads} | "
            f"kernel: {cfg['kernel']} ({omp}) | numpy {machine['numpy']}")


# ------------------------------------------------------------------- table
def format_table(records, impl_names):
    cols = ["case", "shape (B H L S D)", "dtype"]
    cols += [f"{name} ms" for name in impl_names]
    has_speedup = SUBJECT in impl_names and BASELINE in impl_names
    if has_speedup:
        cols.append("speedup")
    cols += [f"{SUBJECT} GFLOP/s", "GB/s", "threads"]
    rows = []
    for r in records:
        dtype = r["dtype"] + (" causal" if r["causal"] else "")
        row = [r["name"], r["shape"], dtype]
        row += [f"{r['impls'][n]['median_ms']:.2f}" for n in impl_names]
        if has_speedup:
            mark = "" if r["matches_reference"] else " (WRONG)"
            row.append(f"{r['speedup']:.2f}x{mark}")
        subject = r["impls"].get(SUBJECT)
        row += [f"{subject['gflops']:.1f}", f"{subject['gbps']:.2f}"] if subject else ["-", "-"]
        row.append(str(r["threads"]))
        rows.append(row)
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]

    def line(cells):
        out = []
        for i, (cell, w) in enumerate(zip(cells, widths)):
            out.append(cell.ljust(w) if i < 3 else cell.rjust(w))
        return "  ".join(out).rstrip()

    lines = [line(cols), line(["-" * w for w in widths])]
    lines += [line(row) for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------ memory
def _memory_worker():
    """Runs in a fresh process: MEMORY_CASE through pyattn; prints JSON."""
    import resource

    def maxrss_bytes():
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024  # KiB on Linux

    threads = int(sys.argv[1]) if len(sys.argv) > 1 else None
    case = MEMORY_CASE
    after_import = maxrss_bytes()
    q, k, v = case.make_inputs()
    before_call = maxrss_bytes()
    t0 = time.perf_counter()
    out = _pyattn(q, k, v, case.causal, threads)
    seconds = time.perf_counter() - t0
    peak = maxrss_bytes()
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
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(pyattn.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH")) if p)
    code = "import sys; from pyattn.bench import _memory_worker; _memory_worker()"
    proc = subprocess.run([sys.executable, "-c", code, str(threads)], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker failed (exit {proc.returncode}):\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["reference_scores_bytes"] = case.B * case.H * case.L * case.S * np.dtype(case.dtype).itemsize
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
        f"  peak RSS (ru_maxrss)        {mib(m['peak_rss_bytes'])}",
        f"  growth during the call      {mib(extra)} (output + working memory)",
        f"  reference's scores alone    {gib(m['reference_scores_bytes'])}"
        f" (B*H*L*S*4 bytes; not run)",
        f"  output finite               {m['finite']}",
    ])


# -------------------------------------------------------------------- CLI
def _positive_int(text):
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def build_parser(prog=None):
    p = argparse.ArgumentParser(
        prog=prog or "python -m pyattn.bench",
        description="Benchmark pyattn against its pure-NumPy reference.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=("cases:\n" + "\n".join(
            f"  {c.name:<12} B{c.B} H{c.H} L{c.L} S{c.S} D{c.D} {c.dtype}"
            + (" causal" if c.causal else "") for c in CASES.values())),
    )
    p.add_argument("--cases", default=",".join(CASES),
                   help="comma-separated case names (default: all)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="threads for pyattn (default: pyattn's default, "
                        f"{_attention.max_threads()} here); also caps NumPy's BLAS "
                        "pool for the reference when threadpoolctl is installed")
    p.add_argument("--repeat", type=_positive_int, default=None,
                   help="timed runs per case, median reported (the reference does at "
                        f"most {REFERENCE_MAX_REPEAT}); default: as many as fit in "
                        f"{TIME_BUDGET_S:g} s, {DEFAULT_MIN_REPEAT} to {DEFAULT_MAX_REPEAT}")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the pure-NumPy baseline")
    p.add_argument("--json", metavar="PATH",
                   help="write all measurements and the machine description to PATH")
    p.add_argument("--memory", action="store_true",
                   help=f"instead of the table: peak RSS of B{MEMORY_CASE.B} H{MEMORY_CASE.H} "
                        f"L=S={MEMORY_CASE.L} D{MEMORY_CASE.D} {MEMORY_CASE.dtype} through "
                        "pyattn, in a fresh process (the reference is not run)")
    return p


def _limit_blas(threads):
    """Cap NumPy's BLAS pool at `threads` for the reference (None if impossible)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(limits=threads, user_api="blas")


def main(argv=None, prog=None):
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown or not names:
        parser.error(f"unknown case(s) {', '.join(unknown) or '(none given)'}; "
                     f"choose from {', '.join(CASES)}")
    threads = args.threads if args.threads is not None else _attention.max_threads()
    machine = machine_info()
    print(header(machine, threads), flush=True)

    report = {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {"threads": threads, "repeat": args.repeat,
                     "reference_max_repeat": REFERENCE_MAX_REPEAT,
                     "time_budget_s": TIME_BUDGET_S, "timer": "time.perf_counter"},
    }

    status = 0
    if args.memory:
        report["memory"] = run_memory(threads)
        print(format_memory(report["memory"]))
    else:
        impls = dict(IMPLEMENTATIONS)
        if args.no_reference:
            impls.pop(BASELINE)
        blas_limit = _limit_blas(threads) if (args.threads is not None and BASELINE in impls) else None
        report["settings"]["reference_blas_threads"] = threads if blas_limit else "numpy default"
        records = []
        try:
            for name in names:
                records.append(run_case(CASES[name], impls, threads, args.repeat))
        finally:
            if blas_limit is not None:
                blas_limit.restore_original_limits()
        report["results"] = records
        print(format_table(records, list(impls)))
        wrong = [r["name"] for r in records if not r.get("matches_reference", True)]
        if wrong:
            print(f"WARNING: pyattn does not match the reference on: {', '.join(wrong)} "
                  "(see max_abs_err with --json)", file=sys.stderr)
            status = 1

    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
