"""The command line of pyattn.bench: ``python -m pyattn.bench`` and
``python -m pyattn bench`` (the argparse validators are pyattn._cli's)."""
import argparse
import sys
from datetime import datetime, timezone

from pyattn import _attention
from pyattn._cli import int_range, output_file, plot_file, same_file
from pyattn._validation import MAX_THREADS
from pyattn.bench.cases import (
    CASES,
    DEFAULT_SUITE,
    LATENCY_CASES,
    MEMORY_CASE,
    PEER_TOLERANCE,
    PLOT_SWEEP,
    SUITES,
    TOLERANCE,
)
from pyattn.bench.measure import LATENCY_BLOCK, THROUGHPUT_BLOCK, run_case
from pyattn.bench.memory import format_memory, run_memory
from pyattn.bench.peers import (
    BASELINE,
    F32,
    IMPLEMENTATIONS,
    PEERS,
    REFERENCE_MAX_REPEAT,
    probe_peers,
)
from pyattn.bench.report import (
    format_latency,
    format_table,
    header,
    machine_info,
    plot_sweep,
    write_json,
)
from pyattn.bench.timing import MAX_REPEAT, MIN_REPEAT, TIME_BUDGET_S

# the peers measured when --peers is not given: torch and ONNX Runtime, and
# for the bfloat16 suite torch and OpenVINO (ONNX Runtime runs float32 exactly
# only; OpenVINO's CPU plugin is the bfloat16 peer to beat, and takes seconds
# per call on some of the other suites' long or cached cases)
DEFAULT_PEERS = ("torch", "onnxruntime")
SUITE_PEERS = {"bf16": ("torch", "openvino")}


def _case_line(c):
    suites = [s for s, names in SUITES.items() if c.name in names]
    tags = ", ".join(suites) + (", --plot" if c.name in PLOT_SWEEP else "")
    options = [c.dtype] + ([f"precision={c.precision}"] if c.precision else [])
    options += [c.mask] if c.mask else []
    return (f"  {c.name:<24} B{c.B} H{c.H} L{c.L} S{c.S} D{c.D} {' '.join(options)}"
            ).ljust(80) + f" ({tags})"


def build_parser(prog=None):
    p = argparse.ArgumentParser(
        prog=prog or "python -m pyattn.bench",
        description="Benchmark pyattn against its pure-NumPy reference and, when they are "
                    "importable, PyTorch, ONNX Runtime and OpenVINO.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=("cases (suites they belong to):\n"
                + "\n".join(_case_line(c) for c in CASES.values())
                + "\n\npeers:\n"
                  "  torch        torch.nn.functional.scaled_dot_product_attention\n"
                  "  onnxruntime  com.microsoft MultiHeadAttention, CPUExecutionProvider "
                  "(float32; needs onnx too)\n"
                  "  openvino     opset13 ScaledDotProductAttention, CPU plugin "
                  "(INFERENCE_PRECISION_HINT bf16 for bfloat16 products, else f32)\n"
                  "  a peer that does not import is reported as absent; one that cannot run "
                  "a case shows n/a"),
    )
    p.add_argument("--suite", choices=sorted(SUITES) + [DASK_SUITE, MODEL_SUITE], default=None,
                   help=f"named set of cases (default: {DEFAULT_SUITE}; "
                        f"quick = {', '.join(SUITES['quick'])}; full = quick's, the prefill "
                        "sweep and vit; latency = per-token calls, timed interleaved with the "
                        "peers, in µs with their spread; bf16 = bfloat16 products (bfloat16 "
                        "inputs, and float32 with precision=bf16) against pyattn's float32 and "
                        "the peers' bfloat16, timed interleaved; dask = pyattn.dask on local "
                        "clusters: prefill L=S=8192 and a sharded decode step, N workers x 1 "
                        "thread against 1 process x N threads (N = --threads, default 2) and "
                        "1 worker (needs dask[distributed]); hf = HuggingFace models' forwards and "
                        "generate() with attn_implementation pyattn against sdpa, interleaved "
                        "(needs torch and transformers); the list is below)")
    p.add_argument("--cases", default=None,
                   help="comma-separated case names (overrides --suite)")
    # pyattn refuses more than MAX_THREADS, but only when the first case runs
    p.add_argument("--threads", type=int_range(1, MAX_THREADS), default=None,
                   help=f"threads for pyattn and the peers, 1 to {MAX_THREADS} (default: "
                        f"pyattn's default, {_attention.max_threads()} here); also caps "
                        "NumPy's BLAS pool for the reference when threadpoolctl is installed")
    p.add_argument("--repeat", type=int_range(1), default=None,
                   help="timed runs per case, median reported (the reference does at "
                        f"most {REFERENCE_MAX_REPEAT}); default: as many as fit in "
                        f"{TIME_BUDGET_S:g} s, {MIN_REPEAT} to {MAX_REPEAT}")
    p.add_argument("--no-reference", action="store_true",
                   help="do not run the pure-NumPy baseline (results are then checked "
                        "against pyattn's)")
    peers = p.add_mutually_exclusive_group()
    peers.add_argument("--peers", default=None, metavar="NAMES",
                       help="comma-separated peers to measure when importable, or 'none' "
                            f"(default: {','.join(DEFAULT_PEERS)}; for --suite bf16: "
                            f"{','.join(SUITE_PEERS['bf16'])})")
    peers.add_argument("--no-peers", action="store_true", help="same as --peers none")
    p.add_argument("--json", metavar="PATH", type=output_file,
                   help="write all measurements, the machine and the peers' versions to PATH")
    p.add_argument("--plot", metavar="PATH", type=plot_file,
                   help="also measure the prefill sweep (" + ", ".join(PLOT_SWEEP) + ") and "
                        "save a PNG of GFLOP/s against L = S for every implementation "
                        "(needs matplotlib: pip install \"pyattn[bench]\")")
    modes = p.add_mutually_exclusive_group()
    modes.add_argument("--memory", action="store_true",
                       help=f"instead of the table: peak RSS of B{MEMORY_CASE.B} "
                            f"H{MEMORY_CASE.H} L=S={MEMORY_CASE.L} D{MEMORY_CASE.D} "
                            f"{MEMORY_CASE.dtype} through pyattn, in a fresh process (the "
                            "reference and peers are not run)")
    modes.add_argument("--layers", action="store_true",
                       help="instead of the table: the whole MultiHeadAttention module "
                            "(BERT-base block, B8 L128 E768 H12) against "
                            "torch.nn.MultiheadAttention and a NumPy module with reference "
                            "attention")
    return p


def _limit_blas(threads):
    """Cap NumPy's BLAS pool at `threads` for the reference (None if impossible)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(limits=threads, user_api="blas")


def _split(text):
    return [n.strip() for n in text.split(",") if n.strip()]


DASK_SUITE = "dask"
# --suite dask: the options it takes besides --threads, --repeat and --json
DASK_REFUSED = ("cases", "no_reference", "peers", "no_peers", "plot")
# --suite hf: whole models instead of the table (pyattn.bench.hf); it takes
# --threads and --json
MODEL_SUITE = "hf"
MODEL_REFUSED = (*DASK_REFUSED, "repeat")

# options of the table only: --memory and --layers would ignore them
TABLE_OPTIONS = ("suite", "cases", "repeat", "no_reference", "peers", "no_peers", "plot")


def _check_args(parser, args):
    """The checks argparse cannot make alone; (case names, peer names).
    Every failure is a usage error (exit 2) before anything runs."""
    mode = "--memory" if args.memory else "--layers" if args.layers else None
    for dest in TABLE_OPTIONS if mode else ():
        if getattr(args, dest) not in (None, False):
            parser.error(f"argument --{dest.replace('_', '-')}: not allowed with argument "
                         f"{mode} (it applies to the table only)")
    if args.suite == MODEL_SUITE:
        for dest in MODEL_REFUSED:
            if getattr(args, dest) not in (None, False):
                parser.error(f"argument --{dest.replace('_', '-')}: not allowed with "
                             "--suite hf")
        return [], []
    if args.suite == DASK_SUITE:
        for dest in DASK_REFUSED:
            if getattr(args, dest) not in (None, False):
                parser.error(f"argument --{dest.replace('_', '-')}: not allowed with "
                             "--suite dask")
        if args.threads not in (None, 2, 4, 8):
            parser.error("argument --threads: --suite dask splits 8 heads over the workers: "
                         "2, 4 or 8")
        try:
            import distributed  # noqa: F401
        except ImportError:
            parser.error("argument --suite: dask needs dask[distributed], which is not "
                         "installed: pip install \"pyattn[dask]\"")
        return [], []
    if args.cases is not None:
        names = _split(args.cases)
        unknown = [n for n in names if n not in CASES]
        if unknown or not names:
            parser.error(f"argument --cases: unknown case(s) "
                         f"{', '.join(unknown) or '(none given)'}; choose from {', '.join(CASES)}")
    else:
        names = list(SUITES[args.suite or DEFAULT_SUITE])
    if args.peers is None:
        default = SUITE_PEERS.get(args.suite, DEFAULT_PEERS) if args.cases is None else PEERS
        peer_names = [] if args.no_peers else list(default)
    else:
        peer_names = _split(args.peers)
        unknown = [n for n in peer_names if n not in PEERS]
        if peer_names == ["none"]:
            peer_names = []
        elif unknown or not peer_names:
            parser.error(f"argument --peers: unknown peer(s) "
                         f"{', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(PEERS)}, or none alone")
    # both would be written, the second over the first
    if args.json and args.plot and same_file(args.json, args.plot):
        parser.error("argument --json: the same file as --plot")
    return names, peer_names


def main(argv=None, prog=None):
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    names, peer_names = _check_args(parser, args)
    if args.plot:
        names += [n for n in PLOT_SWEEP if n not in names]

    if args.suite == DASK_SUITE:
        threads = args.threads or 2
    else:
        threads = args.threads if args.threads is not None else _attention.max_threads()
    machine = machine_info()
    table = not (args.memory or args.layers or args.suite in (DASK_SUITE, MODEL_SUITE))
    peers = probe_peers(peer_names) if table else {}
    bf16 = table and any(CASES[n].bf16_products for n in names)
    print(header(machine, threads, peers if table else None, bf16_products=bf16), flush=True)

    report = {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {"threads": threads, "repeat": args.repeat,
                     "reference_max_repeat": REFERENCE_MAX_REPEAT,
                     "time_budget_s": TIME_BUDGET_S, "min_repeat": MIN_REPEAT,
                     "max_repeat": MAX_REPEAT, "timer": "time.perf_counter"},
    }

    status = 0
    if args.memory:
        report["memory"] = run_memory(threads)
        print(format_memory(report["memory"]))
    elif args.suite == DASK_SUITE:
        from pyattn.bench.cluster import format_dask, run_dask_suite
        report["dask"] = run_dask_suite(threads, args.repeat,
                                        log=lambda m: print(m, file=sys.stderr, flush=True))
        print(format_dask(report["dask"]))
        bad = [label for part in ("prefill", "decode")
               for label, e in report["dask"][part]["results"].items() if not e["matches"]]
        if bad:
            print(f"WARNING: results differ from in-process pyattn's: {', '.join(bad)}",
                  file=sys.stderr)
        status = int(bool(bad))
    elif args.layers:
        from pyattn.bench.layers import format_layers, run_layers
        report["layers"] = run_layers(threads)
        print(format_layers(report["layers"]))
        status = int(not all(e["matches"] for r in report["layers"] for e in r["impls"].values()))
    elif args.suite == MODEL_SUITE:
        from pyattn.bench.hf import format_hf, run_hf
        report["hf"] = run_hf(threads)
        print(format_hf(report["hf"]))
        # no torch or transformers: a message, not a failure
        status = int(not isinstance(report["hf"], str)
                     and not all(r["matches"] for r in report["hf"]))
    else:
        status = _run_tables(args, names, peers, threads, machine, report)

    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")
    return status


def _run_tables(args, names, peers, threads, machine, report):
    """The cases: the throughput table, then the latency table, as named;
    into `report`; the exit status (1: pyattn differs from the reference)."""
    impls = dict(IMPLEMENTATIONS)
    if args.no_reference:
        impls.pop(BASELINE)
    present = [info["peer"] for info in peers.values() if info["available"]]
    suite = None if args.cases else (args.suite or DEFAULT_SUITE)
    report["settings"].update(cases=names, suite=suite, latency_block=LATENCY_BLOCK,
                              throughput_block=THROUGHPUT_BLOCK,
                              tolerance=TOLERANCE, peer_tolerance=PEER_TOLERANCE)
    report["peers"] = {name: {k: v for k, v in info.items() if k != "peer"}
                       for name, info in peers.items()}
    limit_reference_blas = args.threads is not None and BASELINE in impls
    blas_limit = _limit_blas(threads) if limit_reference_blas else None
    report["settings"]["reference_blas_threads"] = threads if blas_limit else "numpy default"
    records = []
    try:
        for name in names:
            records.append(run_case(CASES[name], impls, threads, args.repeat, peers=present))
    finally:
        if blas_limit is not None:
            blas_limit.restore_original_limits()
    report["results"] = records
    alongside = [F32] if any(CASES[n].with_f32 for n in names) else []
    impl_names = list(impls) + alongside + [p.name for p in present]
    throughput = [r for r in records if r["name"] not in LATENCY_CASES]
    latency = [r for r in records if r["name"] in LATENCY_CASES]
    tables = []
    if throughput:
        tables.append(format_table(throughput, impl_names))
    if latency:  # the reference only checks these: no column
        tables.append(format_latency(latency, [n for n in impl_names if n != BASELINE]))
    print("\n\n".join(tables))
    status = 0
    wrong = [r["name"] for r in records if not r.get("matches_reference", True)]
    if wrong:
        print(f"WARNING: pyattn does not match the reference on: {', '.join(wrong)} "
              "(see max_abs_err with --json)", file=sys.stderr)
        status = 1
    for p in present:
        bad = [r["name"] for r in records if r["impls"][p.name].get("status") == "wrong"]
        if bad:
            print(f"WARNING: {p.name}'s output differs from the "
                  f"{records[0]['checked_against']} on: {', '.join(bad)}; "
                  "its times there are not comparable", file=sys.stderr)
    if args.plot:
        plot_sweep(records, impl_names, args.plot, machine, threads)
        report["plot"] = args.plot
        print(f"wrote {args.plot}")
    return status
