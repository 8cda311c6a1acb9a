"""Benchmarks: pyattn against its pure-NumPy reference and, when they are
importable, against PyTorch and ONNX Runtime, on named shapes.

Run ``python -m pyattn.bench`` (or ``python -m pyattn bench``); ``--help``
lists the options.  The table gives, per case, the median wall time of each
implementation, each other implementation's time over pyattn's (above 1:
pyattn is faster), pyattn's attention throughput in GFLOP/s and its memory
traffic in GB/s (q, k, v and out counted once each), and the thread count.
``--memory`` instead runs one long sequence through pyattn in a fresh process
and prints its peak RSS; ``--layers`` times the whole MultiHeadAttention
module against torch.nn.MultiheadAttention (see pyattn.bench_layers).
``--plot out.png`` draws throughput against sequence length (needs
matplotlib: ``pip install "pyattn[bench]"``).

Structure, kept simple so more implementations can be added as columns:
``CASES`` maps a name to a :class:`Case`, ``SUITES`` names lists of cases,
``IMPLEMENTATIONS`` maps a name to ``prepare(case, q, k, v, threads) -> call``
(the untimed setup, returning the timed call); pyattn and the reference are
its two entries, pyattn is the one the throughput columns describe and the
reference the one every result is checked against.  ``PEERS`` are the
optional other libraries (:class:`Peer`): each is measured only when it
imports, otherwise reported as absent, and each may decline a case it cannot
run (``n/a``).  Every output, a peer's included,
is compared with the reference outside the timing; one that differs is marked
``(WRONG)`` so a misconfigured peer cannot show a fast time.
"""
import argparse
import contextlib
import functools
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
from pyattn._cli import int_range, output_file, plot_file
from pyattn._plotting import import_figure
from pyattn._validation import MAX_THREADS

__all__ = ["CASES", "IMPLEMENTATIONS", "PEERS", "SUITES", "Case", "NotApplicable", "Peer",
           "main", "run_case", "machine_info"]


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
    kv_heads: int = 0      # key/value heads (GQA) when not H
    window: int = 0        # > 0: with causal, each query sees its last window + 1 keys
    cache: bool = False    # pyattn reads k, v from a KVCache through decode_attention

    @property
    def Hkv(self):
        return self.kv_heads or self.H

    @property
    def shape(self):
        heads = f"{self.H}/{self.Hkv}" if self.Hkv != self.H else f"{self.H}"
        return f"{self.B} {heads} {self.L} {self.S} {self.D}"

    @property
    def sdpa_kwargs(self):
        """The case's options as scaled_dot_product_attention keywords; a
        cache case is the same call aligned lower-right, as decode_attention."""
        kw = {"is_causal": self.causal}
        if self.Hkv != self.H:
            kw["enable_gqa"] = True
        if self.window:
            kw["window"] = (self.window, 0)
        if self.cache:
            kw.update(is_causal=True, alignment="lower_right")
        return kw

    @property
    def unmasked_pairs(self):
        """(query, key) pairs that take part: L*S; for is_causal (torch's
        top-left aligned lower triangle) the sum over rows i of min(i + 1, S),
        and with a window of min(i + 1, S, window + 1); a cache case sees S."""
        L, S = self.L, self.S
        if self.cache:
            return L * S - L * (L - 1) // 2
        if not self.causal:
            return L * S
        reach = S if not self.window else min(S, self.window + 1)
        full_rows = max(0, L - reach)  # rows that see `reach` keys (when L <= S)
        if L <= S:
            ramp = min(L, reach)
            return ramp * (ramp + 1) // 2 + full_rows * reach
        return S * (S + 1) // 2 + (L - S) * S

    @property
    def flops(self):
        """4*D per (query, key) pair: 2*D for q.k and 2*D for p*v."""
        return 4 * self.B * self.H * self.D * self.unmasked_pairs

    @property
    def np_dtype(self):
        if self.dtype == "bfloat16":
            from ml_dtypes import bfloat16
            return np.dtype(bfloat16)
        return np.dtype(self.dtype)

    @property
    def nbytes(self):
        """Bytes of q, k, v and out, each read or written once."""
        itemsize = self.np_dtype.itemsize
        return itemsize * self.B * self.D * (2 * self.H * self.L + 2 * self.Hkv * self.S)

    def make_inputs(self, seed=0):
        rng = np.random.default_rng(seed)
        q = rng.standard_normal((self.B, self.H, self.L, self.D), dtype=np.float32)
        k = rng.standard_normal((self.B, self.Hkv, self.S, self.D), dtype=np.float32)
        v = rng.standard_normal((self.B, self.Hkv, self.S, self.D), dtype=np.float32)
        dtype = self.np_dtype
        if dtype == np.float64:
            q, k, v = (rng.standard_normal(x.shape) for x in (q, k, v))
        return tuple(x.astype(dtype, copy=False) for x in (q, k, v))


CASES = {
    c.name: c
    for c in [
        # the quick suite (the default run), in the order it is printed
        Case("prefill", B=1, H=8, L=2048, S=2048, D=64),
        Case("bert", B=8, H=12, L=128, S=128, D=64),
        Case("causal", B=1, H=8, L=2048, S=2048, D=64, causal=True),
        Case("decode", B=1, H=32, L=1, S=4096, D=128),
        Case("prefill-f64", B=1, H=8, L=1024, S=1024, D=64, dtype="float64"),
        # the rest of the full suite: the prefill sweep over L = S and D, and ViT-B/16
        Case("prefill-512-d64", B=1, H=8, L=512, S=512, D=64),
        Case("prefill-1k-d64", B=1, H=8, L=1024, S=1024, D=64),
        Case("prefill-4k-d64", B=1, H=8, L=4096, S=4096, D=64),
        Case("prefill-1k-d128", B=1, H=8, L=1024, S=1024, D=128),
        Case("prefill-2k-d128", B=1, H=8, L=2048, S=2048, D=128),
        Case("prefill-4k-d128", B=1, H=8, L=4096, S=4096, D=128),
        Case("vit", B=4, H=12, L=197, S=197, D=64),
        # the inference suite: decoding from a KVCache, GQA, half storage, windows
        Case("decode-cache", B=1, H=32, L=1, S=4096, D=128, cache=True),
        Case("decode-cache-f16", B=1, H=32, L=1, S=4096, D=128, cache=True, dtype="float16"),
        Case("decode-cache-bf16", B=1, H=32, L=1, S=4096, D=128, cache=True, dtype="bfloat16"),
        Case("decode-gqa-8k", B=1, H=32, kv_heads=8, L=1, S=8192, D=128, cache=True),
        Case("decode-mha8-8k", B=1, H=8, L=1, S=8192, D=128, cache=True),
        Case("causal-16k", B=1, H=8, L=16384, S=16384, D=64, causal=True),
        Case("window256-16k", B=1, H=8, L=16384, S=16384, D=64, causal=True, window=256),
    ]
}

SUITES = {
    "quick": ("prefill", "bert", "causal", "decode", "prefill-f64"),
    "full": ("prefill-512-d64", "prefill-1k-d64", "prefill", "prefill-4k-d64",
             "prefill-1k-d128", "prefill-2k-d128", "prefill-4k-d128",
             "causal", "bert", "vit", "decode", "prefill-f64"),
    "inference": ("decode-cache", "decode-cache-f16", "decode-cache-bf16", "decode-gqa-8k",
                  "decode-mha8-8k", "causal-16k", "window256-16k"),
}
DEFAULT_SUITE = "quick"

# --plot: throughput against L = S for these (B1 H8 D64 float32, not causal)
PLOT_SWEEP = ("prefill-512-d64", "prefill-1k-d64", "prefill", "prefill-4k-d64")

# the --memory case: the reference would need B*H*L*S*4 bytes for its scores
MEMORY_CASE = Case("memory", B=1, H=8, L=16384, S=16384, D=64)

# how close pyattn must be to the reference (np.allclose)
TOLERANCE = {"float32": dict(rtol=1e-4, atol=1e-5), "float64": dict(rtol=1e-9, atol=1e-11),
             # one rounding of the output apart (both compute in float32)
             "float16": dict(rtol=2e-3, atol=2e-3), "bfloat16": dict(rtol=1.6e-2, atol=1.6e-2)}


# how close a peer must be to the reference: looser than for pyattn (other
# summation orders), still far below what a wrong layout, scale or mask gives
PEER_TOLERANCE = {"float32": dict(rtol=1e-3, atol=1e-4), "float64": dict(rtol=1e-7, atol=1e-9),
                  "float16": dict(rtol=4e-3, atol=4e-3), "bfloat16": dict(rtol=3.2e-2, atol=3.2e-2)}
REFERENCE_MAX_SCORES = 1 << 31  # bytes: the reference declines cases whose scores need more


# ------------------------------------------------------- the implementations
def _pyattn(case, q, k, v, threads):
    """A call of pyattn on the case; a cache case fills a KVCache first."""
    if case.cache:
        cache = pyattn.KVCache(case.B, case.Hkv, case.D, dtype=q.dtype)
        cache.append(k, v)
        return lambda: pyattn.decode_attention(q, cache, num_threads=threads)
    kwargs = case.sdpa_kwargs
    return lambda: pyattn.scaled_dot_product_attention(q, k, v, num_threads=threads, **kwargs)


def _reference(case, q, k, v, threads):
    scores = case.B * case.H * case.L * case.S * (8 if case.dtype == "float64" else 4)
    if scores > REFERENCE_MAX_SCORES:
        raise NotApplicable(f"its score matrix would need {scores / 2**30:.0f} GiB")
    # num_threads is only validated by the reference; NumPy's BLAS decides
    # (main() limits the BLAS pool to --threads when threadpoolctl is present)
    kwargs = case.sdpa_kwargs
    return lambda: pyattn.reference.scaled_dot_product_attention(q, k, v, num_threads=threads,
                                                                 **kwargs)


IMPLEMENTATIONS = {"pyattn": _pyattn, "reference": _reference}
SUBJECT, BASELINE = "pyattn", "reference"

REFERENCE_MAX_REPEAT = 5   # the reference is slow: at most this many timed runs
DEFAULT_MAX_REPEAT = 50    # without --repeat: at most this many timed runs ...
DEFAULT_MIN_REPEAT = 3     # ... at least this many ...
TIME_BUDGET_S = 4.0        # ... and otherwise as many as fit in this, per case and implementation


# ------------------------------------------------------------------- peers
class NotApplicable(Exception):
    """Raised by Peer.prepared when the peer cannot run a case; the message says why."""


class Peer:
    """An optional other library, measured when it imports.

    ``probe()`` imports it and returns a description (version, API used);
    an ImportError means absent.  ``prepared(case, q, k, v, threads)`` is a
    context manager that does all the per-case work outside the timing
    (conversions, sessions, thread settings; undone on exit) and yields
    ``(call, to_bhld)``: ``call()`` runs the attention once, ``to_bhld(out)``
    turns its result into a (B, H, L, D) NumPy array for the check.
    """

    name = ""    # key in the results and the JSON
    label = ""   # short column label

    def probe(self):
        raise NotImplementedError

    def prepared(self, case, q, k, v, threads):
        raise NotImplementedError


class TorchPeer(Peer):
    """torch.nn.functional.scaled_dot_product_attention on torch.from_numpy views."""

    name, label = "torch", "torch"

    def probe(self):
        import torch
        self.torch = torch
        return {"version": torch.__version__,
                "api": "torch.nn.functional.scaled_dot_product_attention",
                "default_threads": torch.get_num_threads(),
                "threads": "torch.set_num_threads(threads) for the run"}

    @contextlib.contextmanager
    def prepared(self, case, q, k, v, threads):
        torch = self.torch
        if case.window:
            raise NotApplicable("no sliding window in torch's SDPA (only a materialised mask)")
        if case.dtype == "bfloat16":  # NumPy's bfloat16 (ml_dtypes) reaches torch by its bits
            tq, tk, tv = (torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
                          for x in (q, k, v))
        else:
            tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))  # views, no copy
        sdpa = torch.nn.functional.scaled_dot_product_attention
        kwargs = {"is_causal": case.causal, "enable_gqa": case.Hkv != case.H}
        if case.cache and case.L > 1:
            from torch.nn.attention.bias import causal_lower_right
            kwargs.update(is_causal=False, attn_mask=causal_lower_right(case.L, case.S))
        elif case.cache:  # one query at the end sees every key
            kwargs["is_causal"] = False
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                yield (lambda: sdpa(tq, tk, tv, **kwargs)), (lambda out: out.float().numpy())
        finally:
            torch.set_num_threads(before)


class OnnxRuntimePeer(Peer):
    """ONNX Runtime's com.microsoft MultiHeadAttention contrib op, CPU provider.

    The model is one MultiHeadAttention node (num_heads=H) with inputs
    query (B, L, H*D), key and value (B, S, H*D) and output (B, L, H*D), all
    float32; causal uses its ``unidirectional`` attribute.  The (B, H, L, D)
    inputs are transposed to (B, L, H*D) once per case, outside the timing.
    """

    name, label = "onnxruntime", "ort"
    OPSET = 17

    def probe(self):
        import onnx
        import onnxruntime
        if "CPUExecutionProvider" not in onnxruntime.get_available_providers():
            raise ImportError("onnxruntime has no CPUExecutionProvider")
        self.onnx, self.ort = onnx, onnxruntime
        return {"version": onnxruntime.__version__, "onnx": onnx.__version__,
                "api": "com.microsoft MultiHeadAttention (one-node ONNX model), "
                       "CPUExecutionProvider",
                "threads": "SessionOptions.intra_op_num_threads = threads, inter_op 1"}

    def model(self, case):
        """The serialized one-node model for `case` (float32, fixed shapes)."""
        helper, TensorProto = self.onnx.helper, self.onnx.TensorProto
        B, H, L, S, D = case.B, case.H, case.L, case.S, case.D
        attrs = {"num_heads": H}
        if case.causal and not case.cache:
            attrs["unidirectional"] = 1
        node = helper.make_node("MultiHeadAttention", ["query", "key", "value"], ["output"],
                                domain="com.microsoft", **attrs)
        value = lambda name, n: helper.make_tensor_value_info(  # noqa: E731
            name, TensorProto.FLOAT, [B, n, H * D])
        graph = helper.make_graph([node], "mha", [value("query", L), value("key", S),
                                                  value("value", S)], [value("output", L)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.OPSET),
                                                        helper.make_opsetid("com.microsoft", 1)])
        return model.SerializeToString()

    @contextlib.contextmanager
    def prepared(self, case, q, k, v, threads):
        if case.dtype != "float32":
            raise NotApplicable(f"{case.dtype}: MultiHeadAttention's CPU kernel takes float32 only")
        if case.Hkv != case.H or case.window:
            raise NotApplicable("GQA and windows are GroupQueryAttention's, "
                                "not MultiHeadAttention's")
        if case.cache and case.L > 1:
            raise NotApplicable("several new queries against a cache need a lower-right mask")
        if case.causal and case.L != case.S:
            # unidirectional masks bottom-right aligned when L < S; is_causal is top-left
            raise NotApplicable("causal with L != S: unidirectional is aligned differently")
        ort = self.ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(self.model(case), options,
                                       providers=["CPUExecutionProvider"])

        def to_blhd(x):  # (B, H, N, D) -> (B, N, H*D), contiguous
            return np.ascontiguousarray(x.transpose(0, 2, 1, 3)).reshape(x.shape[0], x.shape[2], -1)

        feeds = {"query": to_blhd(q), "key": to_blhd(k), "value": to_blhd(v)}
        B, H, L, D = case.B, case.H, case.L, case.D
        try:
            yield ((lambda: session.run(["output"], feeds)[0]),
                   (lambda out: out.reshape(B, L, H, D).transpose(0, 2, 1, 3)))
        finally:
            session = None  # its thread pool goes now, not at the next collection


PEERS = {p.name: p for p in [TorchPeer(), OnnxRuntimePeer()]}


def probe_peers(names):
    """{name: description} for the requested peers: available ones carry the
    Peer under "peer" (dropped from the JSON), absent ones the reason."""
    found = {}
    for name in names:
        peer = PEERS[name]
        try:
            info = peer.probe()
        except Exception as exc:  # ImportError, or a broken install: absent either way
            found[name] = {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
        else:
            found[name] = dict(available=True, peer=peer, **info)
    return found


# ------------------------------------------------------------- measurement
def time_calls(fn, repeat):
    """Wall times (s) of `repeat` calls of fn(), and the last result."""
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result


@contextlib.contextmanager
def _plain(prepare, case, q, k, v, threads):
    """IMPLEMENTATIONS entries as Peer.prepared."""
    yield prepare(case, q, k, v, threads), None


def _compare(got, want, tolerance):
    """(max |got - want|, allclose) for a result against the reference."""
    if got.shape != want.shape:
        return float("inf"), False
    got, want = got.astype(np.float64), want.astype(np.float64)  # also bfloat16
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    return err, bool(np.allclose(got, want, **tolerance))


def run_case(case, impls, threads, repeat=None, log=None, peers=()):
    """Time every implementation, then every peer, on `case`; a dict of the measurements.

    Each is called once untimed (warm-up), then `repeat` times (the reference
    at most REFERENCE_MAX_REPEAT times).  With repeat=None the count comes
    from the warm-up time: as many runs as fit in TIME_BUDGET_S, between
    DEFAULT_MIN_REPEAT and DEFAULT_MAX_REPEAT.  The last timed result of each
    is compared, untimed, with the reference's (with pyattn's when the
    reference is not run).  A peer that declines the case is recorded as
    "n/a", one that raises as "error"; their cells carry no time.
    """
    q, k, v = case.make_inputs()
    record = dict(asdict(case), shape=case.shape, flops=case.flops, bytes=case.nbytes,
                  threads=threads, impls={})
    runners = [(name, functools.partial(_plain, fn), False) for name, fn in impls.items()]
    runners += [(peer.name, peer.prepared, True) for peer in peers]
    outputs = {}
    for name, prepared, is_peer in runners:
        if log:
            log(f"  {case.name}: {name} ...")
        entry = record["impls"][name] = {}
        try:
            with prepared(case, q, k, v, threads) as (call, to_bhld):
                t0 = time.perf_counter()
                call()  # warm-up
                warmup = time.perf_counter() - t0
                if repeat is None:
                    n = int(TIME_BUDGET_S / max(warmup, 1e-9))
                    n = max(DEFAULT_MIN_REPEAT, min(DEFAULT_MAX_REPEAT, n))
                else:
                    n = repeat
                if name == BASELINE:
                    n = min(n, REFERENCE_MAX_REPEAT)
                times, out = time_calls(call, n)
                outputs[name] = np.asarray(to_bhld(out) if to_bhld else out)
        except NotApplicable as exc:
            entry.update(status="n/a", reason=str(exc))
            continue
        except Exception as exc:
            if not is_peer:
                raise
            entry.update(status="error", reason=f"{type(exc).__name__}: {exc}")
            print(f"WARNING: {name} failed on {case.name}: {entry['reason']}", file=sys.stderr)
            continue
        med = statistics.median(times)
        entry.update({
            "status": "ok",
            "median_ms": med * 1e3,
            "min_ms": min(times) * 1e3,
            "repeat": n,
            "warmup_ms": warmup * 1e3,
            "times_ms": [t * 1e3 for t in times],
            "gflops": case.flops / med / 1e9,
            "gbps": case.nbytes / med / 1e9,
        })

    checked_against = BASELINE if BASELINE in outputs else SUBJECT
    want = outputs.get(checked_against)
    record["checked_against"] = checked_against if want is not None else None
    for name, got in outputs.items():
        if name == checked_against or want is None:
            continue
        is_peer = name not in impls
        tolerance = (PEER_TOLERANCE if is_peer else TOLERANCE)[case.dtype]
        err, ok = _compare(got, want, tolerance)
        entry = record["impls"][name]
        entry.update(max_abs_err=err, matches=ok)
        if not ok:
            entry["status"] = "wrong"
    if SUBJECT in outputs and BASELINE in outputs:
        record["max_abs_err"] = record["impls"][SUBJECT]["max_abs_err"]
        record["matches_reference"] = record["impls"][SUBJECT]["matches"]
        record["speedup"] = (record["impls"][BASELINE]["median_ms"]
                             / record["impls"][SUBJECT]["median_ms"])
    # other / pyattn, for each result that is right (above 1: pyattn is faster)
    subject = record["impls"].get(SUBJECT, {})
    record["ratios"] = {
        name: (e["median_ms"] / subject["median_ms"]
               if e.get("status") == "ok" and "median_ms" in subject else None)
        for name, e in record["impls"].items() if name != SUBJECT
    }
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


def header(machine, threads, peers=None):
    """The machine line, then (when peers were asked for) one line on the peers."""
    cfg = machine["pyattn"]
    omp = "OpenMP" if cfg["openmp"] else "no OpenMP"
    line = (f"pyattn {cfg['version']} | CPU: {machine['cpu_model']} "
            f"({machine['usable_cpus']} usable cores) | threads: {threads} | "
            f"kernel: {cfg['kernel']} ({omp}) | numpy {machine['numpy']}")
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


# ------------------------------------------------------------------- table
LABELS = {SUBJECT: SUBJECT, BASELINE: "ref", **{p.name: p.label for p in PEERS.values()}}


def _ms_cell(entry):
    status = entry.get("status")
    if status in ("ok", "wrong"):
        ms = entry["median_ms"]
        text = f"{ms:.1f}" if ms >= 1000 else f"{ms:.2f}"
        return text + (" (WRONG)" if status == "wrong" else "")
    return status or "-"


def _ratio_cell(ratio, entry):
    if ratio is not None:
        return f"{ratio:.2f}x"
    return {"n/a": "n/a", "error": "error", "wrong": "-"}.get(entry.get("status"), "-")


def format_table(records, impl_names):
    """The table: one ms column per implementation, the others' time over
    pyattn's, pyattn's GFLOP/s and GB/s, threads; then a legend."""
    others = [n for n in impl_names if n != SUBJECT]
    cols = ["case", "B H L S D", "dtype"]
    cols += [f"{LABELS.get(n, n)} ms" for n in impl_names]
    if SUBJECT in impl_names:
        cols += [f"vs {LABELS.get(n, n)}" for n in others]
    cols += ["GFLOP/s", "GB/s", "threads"]
    rows = []
    reasons = {}
    for r in records:
        dtype = r["dtype"] + (" causal" if r["causal"] else "")
        row = [r["name"], r["shape"], dtype]
        row += [_ms_cell(r["impls"].get(n, {})) for n in impl_names]
        if SUBJECT in impl_names:
            row += [_ratio_cell(r["ratios"].get(n), r["impls"].get(n, {})) for n in others]
        subject = r["impls"].get(SUBJECT, {})
        if "gflops" in subject:
            row += [f"{subject['gflops']:.1f}", f"{subject['gbps']:.2f}"]
        else:
            row += ["-", "-"]
        row.append(str(r["threads"]))
        rows.append(row)
        for n in impl_names:
            e = r["impls"].get(n, {})
            if e.get("status") in ("n/a", "error"):
                reasons.setdefault((n, e["status"], e["reason"]), []).append(r["name"])
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]

    def line(cells):
        out = []
        for i, (cell, w) in enumerate(zip(cells, widths)):
            out.append(cell.ljust(w) if i < 3 else cell.rjust(w))
        return "  ".join(out).rstrip()

    lines = [line(cols), line(["-" * w for w in widths])]
    lines += [line(row) for row in rows]
    legend = "ms: median wall time per call"
    if SUBJECT in impl_names and others:
        legend += "; vs X: X's time / pyattn's (above 1: pyattn is faster)"
    legend += "; GFLOP/s, GB/s: pyattn's"
    lines.append(legend)
    names = ", ".join(f"{LABELS.get(n, n)} = {n}" for n in impl_names if LABELS.get(n, n) != n)
    if names:
        lines.append(names)
    checked = {r.get("checked_against") for r in records} - {None}
    if checked:
        lines.append("every result is checked against " + " / ".join(sorted(checked))
                     + " outside the timing; (WRONG): it differs")
    for (n, status, reason), cases in reasons.items():
        lines.append(f"{status}: {n} on {', '.join(cases)}: {reason}")
    return "\n".join(lines)


# -------------------------------------------------------------------- plot


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
              "torch": dict(marker="^"), "onnxruntime": dict(marker="D")}
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


# ------------------------------------------------------------------ memory
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
    maxrss_bytes = peak_rss_bytes
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else None
    case = MEMORY_CASE
    after_import = maxrss_bytes()
    q, k, v = case.make_inputs()
    before_call = maxrss_bytes()
    t0 = time.perf_counter()
    out = _pyattn(case, q, k, v, threads)()
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


# -------------------------------------------------------------------- CLI
def _case_line(c):
    suites = [s for s, names in SUITES.items() if c.name in names]
    tags = ", ".join(suites) + (", --plot" if c.name in PLOT_SWEEP else "")
    return (f"  {c.name:<16} B{c.B} H{c.H} L{c.L} S{c.S} D{c.D} {c.dtype}"
            + (" causal" if c.causal else "")).ljust(58) + f"({tags})"


def build_parser(prog=None):
    p = argparse.ArgumentParser(
        prog=prog or "python -m pyattn.bench",
        description="Benchmark pyattn against its pure-NumPy reference and, when they are "
                    "importable, PyTorch and ONNX Runtime.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=("cases (suites they belong to):\n"
                + "\n".join(_case_line(c) for c in CASES.values())
                + "\n\npeers:\n"
                  "  torch        torch.nn.functional.scaled_dot_product_attention\n"
                  "  onnxruntime  com.microsoft MultiHeadAttention, CPUExecutionProvider "
                  "(float32; needs onnx too)\n"
                  "  a peer that does not import is reported as absent; one that cannot run "
                  "a case shows n/a"),
    )
    p.add_argument("--suite", choices=sorted(SUITES), default=None,
                   help=f"named set of cases (default: {DEFAULT_SUITE}; "
                        f"quick = {', '.join(SUITES['quick'])}; full = all)")
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
                        f"{TIME_BUDGET_S:g} s, {DEFAULT_MIN_REPEAT} to {DEFAULT_MAX_REPEAT}")
    p.add_argument("--no-reference", action="store_true",
                   help="do not run the pure-NumPy baseline (results are then checked "
                        "against pyattn's)")
    peers = p.add_mutually_exclusive_group()
    peers.add_argument("--peers", default=None, metavar="NAMES",
                       help="comma-separated peers to measure when importable, or 'none' "
                            f"(default: {','.join(PEERS)})")
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
    if args.cases is not None:
        names = _split(args.cases)
        unknown = [n for n in names if n not in CASES]
        if unknown or not names:
            parser.error(f"argument --cases: unknown case(s) "
                         f"{', '.join(unknown) or '(none given)'}; choose from {', '.join(CASES)}")
    else:
        names = list(SUITES[args.suite or DEFAULT_SUITE])
    if args.peers is None:
        peer_names = [] if args.no_peers else list(PEERS)
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
    if args.json and args.plot and os.path.realpath(args.json) == os.path.realpath(args.plot):
        parser.error("argument --json: the same file as --plot")
    return names, peer_names


def main(argv=None, prog=None):
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    names, peer_names = _check_args(parser, args)
    if args.plot:
        names += [n for n in PLOT_SWEEP if n not in names]

    threads = args.threads if args.threads is not None else _attention.max_threads()
    machine = machine_info()
    table = not (args.memory or args.layers)
    peers = probe_peers(peer_names) if table else {}
    print(header(machine, threads, peers if table else None), flush=True)

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
    elif args.layers:
        from pyattn.bench_layers import format_layers, run_layers
        report["layers"] = run_layers(threads)
        print(format_layers(report["layers"]))
        status = int(not all(e["matches"] for r in report["layers"] for e in r["impls"].values()))
    else:
        impls = dict(IMPLEMENTATIONS)
        if args.no_reference:
            impls.pop(BASELINE)
        present = [info["peer"] for info in peers.values() if info["available"]]
        suite = None if args.cases else (args.suite or DEFAULT_SUITE)
        report["settings"].update(cases=names, suite=suite,
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
        impl_names = list(impls) + [p.name for p in present]
        print(format_table(records, impl_names))
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

    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        print(f"wrote {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
