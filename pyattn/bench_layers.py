"""Whole-module benchmark: pyattn.MultiHeadAttention against
torch.nn.MultiheadAttention (when importable) on the same weights and input,
self-attention in inference, with and without the attention weights.

    python -m pyattn.bench --layers [--threads N] [--json out.json]

The NumPy baseline is the same module with pyattn.reference attention (the
projections are the same BLAS calls), so its gap to pyattn is the kernel's.
"""
import statistics
import time

import numpy as np

import pyattn
from pyattn.layers import MultiHeadAttention

MODULE_CASES = [  # (name, B, L, E, H): BERT-base's attention block
    ("mha-bert-base", 8, 128, 768, 12),
]
TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def _reference_attention(q, k, v, mask, is_causal, *, out, num_threads, weights):
    if weights is not None:
        raise ValueError("the baseline has no weights path")
    out[...] = pyattn.reference.scaled_dot_product_attention(q, k, v, mask, is_causal)
    return out, None, None


class _ReferenceMHA(MultiHeadAttention):
    """The same module, attention from pyattn.reference (a NumPy baseline)."""

    _attention = staticmethod(_reference_attention)


def _median_ms(fn, budget_s=3.0, max_repeat=60):
    t0 = time.perf_counter()
    result = fn()  # warm-up
    n = max(5, min(max_repeat, int(budget_s / max(time.perf_counter() - t0, 1e-9))))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, result


def _torch_module(module, threads):
    try:
        import torch
    except ImportError:
        return None, None
    torch.set_num_threads(threads)
    tm = torch.nn.MultiheadAttention(module.embed_dim, module.num_heads, batch_first=True).eval()
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in module.state_dict().items()})
    return torch, tm


def run_layers(threads):
    """Time every case; a list of records {name, shape, impls: {label: {...}}}."""
    records = []
    for name, B, L, E, H in MODULE_CASES:
        module = MultiHeadAttention(E, H, rng=0)
        baseline = _ReferenceMHA(E, H, rng=0)
        rng = np.random.default_rng(1)
        module.in_proj_bias[:] = rng.uniform(-0.1, 0.1, 3 * E)  # nonzero, to check them
        module.out_proj_bias[:] = rng.uniform(-0.1, 0.1, E)
        baseline.load_state_dict(module.state_dict())
        x = rng.standard_normal((B, L, E), dtype=np.float32)
        torch, tm = _torch_module(module, threads)
        impls = {}
        want, _ = baseline(x, x, x, need_weights=False)
        for weights in (False, True):
            tag = "weights" if weights else "no weights"
            ms, (out, w) = _median_ms(lambda: module(x, x, x, need_weights=weights, num_threads=threads))
            impls[f"pyattn ({tag})"] = {"median_ms": ms, "matches": bool(np.allclose(out, want, **TOLERANCE))}
            if tm is not None:
                xt = torch.from_numpy(x)
                with torch.inference_mode():
                    ms, (tout, _) = _median_ms(lambda: tm(xt, xt, xt, need_weights=weights))
                impls[f"torch ({tag})"] = {"median_ms": ms,
                                           "matches": bool(np.allclose(tout.numpy(), want, **TOLERANCE))}
        ms, _ = _median_ms(lambda: baseline(x, x, x, need_weights=False))
        impls["numpy + reference attention"] = {"median_ms": ms, "matches": True}
        records.append({"name": name, "shape": f"B{B} L{L} E{E} H{H}", "dtype": "float32",
                        "threads": threads, "torch": None if torch is None else torch.__version__,
                        "impls": impls})
    return records


def format_layers(records):
    lines = []
    for rec in records:
        lines.append(f"{rec['name']}  ({rec['shape']}, {rec['dtype']}, self-attention, "
                     f"{rec['threads']} threads; torch: {rec['torch'] or 'absent'})")
        for label, e in rec["impls"].items():
            tag = "weights" if "(weights)" in label else "no weights"
            mine = rec["impls"].get(f"pyattn ({tag})", {}).get("median_ms")
            ratio = f"{e['median_ms'] / mine:6.2f}x" if mine and not label.startswith("pyattn") else ""
            check = "" if e["matches"] else "  WRONG"
            lines.append(f"  {label:<30} {e['median_ms']:9.2f} ms {ratio}{check}")
        lines.append("  (Nx: time / pyattn's time for the same need_weights; above 1: pyattn is faster)")
    return "\n".join(lines)
