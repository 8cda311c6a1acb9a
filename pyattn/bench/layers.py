"""Whole-module benchmark: pyattn.MultiHeadAttention against
torch.nn.MultiheadAttention (when importable) on the same weights and input,
self-attention in inference, with and without the attention weights.

    python -m pyattn.bench --layers [--threads N] [--json out.json]

Each implementation runs in a fresh interpreter, one after the other: in one
process, the idle threads that one library leaves spinning after its calls
(torch's OpenMP pool, OpenBLAS's workers) would slow the next library down.
The NumPy baseline is the same module with pyattn.reference attention (the
same BLAS projections), so its gap to pyattn is the attention kernel's.
Every output is compared with the baseline's outside the timing; the
timing is pyattn.bench.timing's.
"""
import json

import numpy as np

import pyattn
from pyattn.bench.cases import TOLERANCE
from pyattn.bench.child import ChildFailed, run_child
from pyattn.bench.timing import summarize, time_calls
from pyattn.layers import MultiHeadAttention

MODULE_CASES = [  # (name, B, L, E, H): BERT-base's attention block
    ("mha-bert-base", 8, 128, 768, 12),
]
# label: (implementation, need_weights, extra environment)
RUNS = {
    "pyattn (no weights)": ("pyattn", False, {}),
    "torch (no weights)": ("torch", False, {}),
    "pyattn (weights)": ("pyattn", True, {}),
    "torch (weights)": ("torch", True, {}),
    "numpy + reference attention": ("reference", False, {}),
    # OpenBLAS's idle workers spin for ~2^28 cycles after each matmul, taking
    # a core from the attention kernel that follows; this makes them sleep.
    "pyattn, OPENBLAS_THREAD_TIMEOUT=4": ("pyattn", False, {"OPENBLAS_THREAD_TIMEOUT": "4"}),
}


def _reference_attention(q, k, v, mask, is_causal, *, out, num_threads, weights, kv_lengths,
                         precision):
    del precision  # the baseline is exact
    if weights is not None:
        raise ValueError("the baseline has no weights path")
    out[...] = pyattn.reference.scaled_dot_product_attention(q, k, v, mask, is_causal,
                                                             kv_lengths=kv_lengths)
    return out, None, None


class _ReferenceMHA(MultiHeadAttention):
    """The same module, attention from pyattn.reference (a NumPy baseline)."""

    _attention = staticmethod(_reference_attention)


def _median_ms(fn):
    """fn's median time in ms and its last result."""
    timed = time_calls({"module": fn})
    return summarize(timed.times["module"])["median_ms"], timed.results["module"]


def _problem(B, L, E, H):
    """The module (nonzero biases, so they are checked too) and its input."""
    module = MultiHeadAttention(E, H, rng=0)
    rng = np.random.default_rng(1)
    module.in_proj_bias[:] = rng.uniform(-0.1, 0.1, 3 * E)
    module.out_proj_bias[:] = rng.uniform(-0.1, 0.1, E)
    return module, rng.standard_normal((B, L, E), dtype=np.float32)


def _worker(impl, need_weights, case_index, threads):
    """In a fresh interpreter: time one implementation, print JSON."""
    B, L, E, H = MODULE_CASES[case_index][1:]
    module, x = _problem(B, L, E, H)
    baseline = _ReferenceMHA(E, H, rng=0)
    baseline.load_state_dict(module.state_dict())
    want = baseline(x, x, x, need_weights=False)[0]
    info = {}
    if impl == "pyattn":
        ms, (out, _) = _median_ms(lambda: module(x, x, x, need_weights=need_weights,
                                                 num_threads=threads))
    elif impl == "reference":
        ms, (out, _) = _median_ms(lambda: baseline(x, x, x, need_weights=False))
    else:
        import torch
        torch.set_num_threads(threads)
        tm = torch.nn.MultiheadAttention(E, H, batch_first=True).eval()
        tm.load_state_dict({k: torch.from_numpy(v) for k, v in module.state_dict().items()})
        xt = torch.from_numpy(x)
        with torch.inference_mode():
            ms, (tout, _) = _median_ms(lambda: tm(xt, xt, xt, need_weights=need_weights))
        out, info = tout.numpy(), {"version": torch.__version__}
    matches = bool(np.allclose(out, want, **TOLERANCE["float32"]))
    print(json.dumps(dict(info, median_ms=ms, matches=matches)))


def _run_worker(impl, need_weights, case_index, threads, env):
    """The worker's JSON, or None when it needs torch and torch is absent."""
    code = (f"from pyattn.bench.layers import _worker; "
            f"_worker({impl!r}, {need_weights!r}, {case_index}, {threads})")
    try:
        return run_child(f"{impl} worker", code, env=env)
    except ChildFailed as exc:
        if impl == "torch" and "No module named 'torch'" in exc.stderr:
            return None
        raise


def run_layers(threads):
    """Time every case; a list of records {name, shape, impls: {label: {...}}}."""
    records = []
    for index, (name, B, L, E, H) in enumerate(MODULE_CASES):
        impls, torch_version = {}, None
        for label, (impl, need_weights, env) in RUNS.items():
            result = _run_worker(impl, need_weights, index, threads, env)
            if result is not None:
                torch_version = result.pop("version", torch_version)
                impls[label] = result
        records.append({"name": name, "shape": f"B{B} L{L} E{E} H{H}", "dtype": "float32",
                        "threads": threads, "torch": torch_version, "impls": impls})
    return records


def format_layers(records):
    lines = []
    for rec in records:
        lines.append(f"{rec['name']}  ({rec['shape']}, {rec['dtype']}, self-attention, "
                     f"{rec['threads']} threads, each in a fresh process; "
                     f"torch: {rec['torch'] or 'absent'})")
        for label, e in rec["impls"].items():
            tag = "weights" if "(weights)" in label else "no weights"
            mine = rec["impls"].get(f"pyattn ({tag})", {}).get("median_ms")
            ratio = f"{e['median_ms'] / mine:6.2f}x" if mine and label != f"pyattn ({tag})" else ""
            check = "" if e["matches"] else "  WRONG"
            lines.append(f"  {label:<34} {e['median_ms']:9.2f} ms {ratio}{check}")
        lines.append("  (Nx: time / pyattn's time for the same need_weights; "
                     "above 1: pyattn is faster)")
    return "\n".join(lines)
