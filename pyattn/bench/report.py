"""What the benchmarks print and write: the machine line, the table of the
throughput suites, the latency suite's table, the --plot figure and the JSON."""
import json
import os
import platform

import numpy as np

import pyattn
from pyattn._plotting import import_figure
from pyattn.bench.cases import PLOT_SWEEP
from pyattn.bench.measure import LATENCY_BLOCK
from pyattn.bench.peers import BASELINE, F32, PEERS, SUBJECT

# the CPU's flags the bfloat16 products depend on, named in the machine line
# of a run with such cases (a VM's model name may say little)
BF16_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16")


def _cpuinfo_field(name):
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model():
    model = _cpuinfo_field("model name")
    return model or platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags():
    """Those of BF16_FLAGS the CPU has (/proc/cpuinfo; none known elsewhere)."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return [f for f in BF16_FLAGS if f in flags]


def machine_info():
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pyattn": pyattn.config(),
    }


def header(machine, threads, peers=None, bf16_products=False):
    """The machine line, then (when peers were asked for) one line on the peers.
    `bf16_products`: the run has cases that ask for them; the line says
    whether this CPU and kernel run them, and the CPU flags they rest on."""
    cfg = machine["pyattn"]
    omp = "OpenMP" if cfg["openmp"] else "no OpenMP"
    line = (f"pyattn {cfg['version']} | CPU: {machine['cpu_model']} "
            f"({machine['usable_cpus']} usable cores) | threads: {threads} | "
            f"kernel: {cfg['kernel']} ({omp}) | numpy {machine['numpy']}")
    if bf16_products:
        flags = ", ".join(machine.get("cpu_flags") or ["none of " + " ".join(BF16_FLAGS)])
        line += (f" | bf16 products: {'yes' if cfg.get('bf16_products') else 'no'} "
                 f"(CPU flags: {flags})")
    if peers is None:
        return line
    return line + "\npeers: " + _peers_text(peers)


def _peers_text(peers):
    if not peers:
        return "none requested"
    parts = []
    for name, info in peers.items():
        if info["available"]:
            extra = f", onnx {info['onnx']}" if "onnx" in info else ""
            parts.append(f"{name} {info['version']}{extra}")
        else:
            parts.append(f"{name} absent ({info['reason']})")
    return " | ".join(parts)


LABELS = {SUBJECT: SUBJECT, BASELINE: "ref", F32: "f32",
          **{p.name: p.label for p in PEERS.values()}}


def _label(name):
    return LABELS.get(name, name)


def _options(record):
    precision = record.get("precision")
    return " ".join(filter(None, [record["dtype"], precision and f"precision={precision}",
                                  record["mask"]]))


def _time_cell(entry, text):
    """text(entry) for a measured entry (marked when its result is wrong), else its status."""
    status = entry.get("status")
    if status in ("ok", "wrong"):
        return text(entry) + (" (WRONG)" if status == "wrong" else "")
    return status or "-"


def _ms(entry):
    ms = entry["median_ms"]
    return f"{ms:.1f}" if ms >= 1000 else f"{ms:.2f}"


def _us(ms):
    us = ms * 1e3
    return f"{us:.0f}" if us >= 1000 else f"{us:.1f}"


def _median_us(entry):
    return _us(entry["median_ms"])


def _ratio_cell(ratio, entry):
    if ratio is not None:
        return f"{ratio:.2f}x"
    return {"n/a": "n/a", "error": "error", "wrong": "-"}.get(entry.get("status"), "-")


def _layout(cols, rows, left):
    """Header, rule and rows, the first `left` columns aligned left, the rest right."""
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]

    def line(cells):
        return "  ".join(cell.ljust(w) if i < left else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(cols), line(["-" * w for w in widths])] + [line(row) for row in rows]


def _notes(records, impl_names):
    """The lines under a table: short labels, what results were checked
    against, and why an implementation did not run a case."""
    lines = []
    names = ", ".join(f"{_label(n)} = {n}" for n in impl_names if _label(n) != n)
    if names:
        lines.append(names)
    if F32 in impl_names:
        lines.append(f"{F32}: pyattn on the same inputs as float32 (bfloat16 ones widened), "
                     "precision=\"exact\"; vs f32 above 1: the bfloat16 products are faster")
    checked = {r.get("checked_against") for r in records} - {None}
    if checked:
        lines.append("every result is checked against " + " / ".join(sorted(checked))
                     + " outside the timing; (WRONG): it differs")
    reasons = {}
    for r in records:
        for n in impl_names:
            e = r["impls"].get(n, {})
            if e.get("status") in ("n/a", "error"):
                reasons.setdefault((n, e["status"], e["reason"]), []).append(r["name"])
    for (n, status, reason), cases in reasons.items():
        lines.append(f"{status}: {n} on {', '.join(cases)}: {reason}")
    return lines


def format_table(records, impl_names):
    """The table: one ms column per implementation, the others' time over
    pyattn's, pyattn's GFLOP/s and GB/s, threads; then a legend.  The
    reference gets no columns when it only checked (every case interleaved)."""
    if records and all(r["impls"].get(BASELINE, {}).get("status") == "check only"
                       for r in records):
        impl_names = [n for n in impl_names if n != BASELINE]
    others = [n for n in impl_names if n != SUBJECT]
    cols = ["case", "B H L S D", "dtype"]
    cols += [f"{_label(n)} ms" for n in impl_names]
    if SUBJECT in impl_names:
        cols += [f"vs {_label(n)}" for n in others]
    cols += ["GFLOP/s", "GB/s", "threads"]
    rows = []
    for r in records:
        row = [r["name"], r["shape"], _options(r)]
        row += [_time_cell(r["impls"].get(n, {}), _ms) for n in impl_names]
        if SUBJECT in impl_names:
            row += [_ratio_cell(r["ratios"].get(n), r["impls"].get(n, {})) for n in others]
        subject = r["impls"].get(SUBJECT, {})
        if "gflops" in subject:
            row += [f"{subject['gflops']:.1f}", f"{subject['gbps']:.2f}"]
        else:
            row += ["-", "-"]
        row.append(str(r["threads"]))
        rows.append(row)
    legend = "ms: median wall time per call"
    if SUBJECT in impl_names and others:
        legend += "; vs X: X's time / pyattn's (above 1: pyattn is faster)"
    legend += "; GFLOP/s, GB/s: pyattn's"
    interleaved = [r["name"] for r in records if r.get("timing") == "interleaved"]
    if interleaved:  # (the bf16 suite's; the latency suite has its own table)
        which = "" if len(interleaved) == len(records) else f" ({', '.join(interleaved)})"
        legend += (f"\ntimed interleaved{which}: every implementation prepared at once and "
                   "called in turn, the order reversed each round; the reference only checks")
    return "\n".join(_layout(cols, rows, left=3) + [legend] + _notes(records, impl_names))


def format_latency(records, impl_names):
    """The latency suite's table: per implementation the median and the
    p10-p90 range of its calls in µs, then pyattn's median over each other's."""
    others = [n for n in impl_names if n != SUBJECT]
    cols = ["case", "B H L S D", "options"]
    for n in impl_names:
        cols += [f"{_label(n)} µs", "p10-p90"]
    if SUBJECT in impl_names:
        cols += [f"pyattn/{_label(n)}" for n in others]
    cols += ["calls", "threads"]
    rows = []
    for r in records:
        row = [r["name"], r["shape"], _options(r)]
        for n in impl_names:
            e = r["impls"].get(n, {})
            row.append(_time_cell(e, _median_us))
            row.append(f"{_us(e['p10_ms'])}-{_us(e['p90_ms'])}" if "p10_ms" in e else "-")
        if SUBJECT in impl_names:
            ratios = [r["ratios"].get(n) for n in others]
            row += [_ratio_cell(1 / x if x else None, r["impls"].get(n, {}))
                    for n, x in zip(others, ratios)]
        row += [str(r["impls"].get(SUBJECT, {}).get("repeat", "-")), str(r["threads"])]
        rows.append(row)
    legend = (f"µs: median wall time per call; p10-p90: the 10th to 90th percentile; calls: "
              f"timed calls of each, interleaved in blocks of {LATENCY_BLOCK}")
    if SUBJECT in impl_names and others:
        legend += "; pyattn/X: pyattn's median / X's (below 1: pyattn is faster)"
    return "\n".join(_layout(cols, rows, left=3) + [legend] + _notes(records, impl_names))


def plot_sweep(records, impl_names, path, machine, threads):
    """GFLOP/s against L = S over the PLOT_SWEEP cases, one line per implementation."""
    Figure = import_figure()
    by_name = {r["name"]: r for r in records}
    sweep = [by_name[n] for n in PLOT_SWEEP if n in by_name]
    if not sweep:
        raise ValueError("no sweep case was measured")
    fig = Figure(figsize=(8, 5), dpi=120)
    ax = fig.add_subplot()
    styles = {SUBJECT: dict(marker="o", linewidth=2.5), BASELINE: dict(marker="s", linestyle="--"),
              "torch": dict(marker="^"), "onnxruntime": dict(marker="D"),
              "openvino": dict(marker="P"), F32: dict(marker="x")}
    for name in impl_names:
        points = [(r["L"], r["impls"][name]["gflops"]) for r in sweep
                  if r["impls"].get(name, {}).get("status") == "ok"]
        if not points:
            continue
        xs, ys = zip(*points)
        label = name if name != BASELINE else "reference (NumPy)"
        ax.plot(xs, ys, label=label, **styles.get(name, dict(marker="v")))
    lengths = [r["L"] for r in sweep]
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels([str(n) for n in lengths])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    c = sweep[0]
    ax.set_xlabel("sequence length L = S")
    ax.set_ylabel("GFLOP/s  (4·B·H·L·S·D / median time)")
    cfg = machine["pyattn"]
    ax.set_title(f"Attention throughput, B{c['B']} H{c['H']} D{c['D']} {c['dtype']}, not causal\n"
                 f"{machine['cpu_model']} ({machine['usable_cpus']} usable cores), "
                 f"{threads} thread{'s' if threads != 1 else ''}, "
                 f"pyattn {cfg['version']} ({cfg['kernel']})", fontsize=11)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def write_json(path, report):
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
