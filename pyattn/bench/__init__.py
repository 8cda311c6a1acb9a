"""Benchmarks: pyattn against its pure-NumPy reference and, when they are
importable, against PyTorch, ONNX Runtime and OpenVINO, on named shapes.

Run ``python -m pyattn.bench`` (or ``python -m pyattn bench``); ``--help``
lists the options.  The table gives, per case, the median wall time of each
implementation, each other implementation's time over pyattn's (above 1:
pyattn is faster), pyattn's attention throughput in GFLOP/s and its memory
traffic in GB/s (q, k, v and out counted once each), and the thread count.
``--memory`` instead runs one long sequence through pyattn in a fresh process
and prints its peak RSS; ``--layers`` times the whole MultiHeadAttention
module against torch.nn.MultiheadAttention (see pyattn.bench.layers).
``--plot out.png`` draws throughput against sequence length (needs
matplotlib: ``pip install "pyattn[bench]"``).

``--suite latency`` measures the per-token calls inference pipelines make
(decoding one token, with and without GQA and batches, a speculative verify
step, a chunked prefill aligned lower-right, short prompts and a MiniLM-sized
encoder; float32 NumPy arrays).  There the fixed cost of a call counts as
much as its arithmetic, so pyattn and the peers (torch's SDPA at the same
thread count, torch.set_num_threads) are prepared together and called
interleaved, hundreds of times, in alternating blocks, so that the machine's
noise hits them alike.  Its table gives each one's median and p10-p90 in µs
and pyattn's median over each peer's (below 1: pyattn is faster); the
reference is not timed there, only checked against.  ``--cases`` can name
these cases too; named with others, they get their own table after the
others'.  All timing follows one rule, pyattn.bench.timing's.

``--suite bf16`` measures bfloat16 products: bfloat16 inputs (prefill
L = S = 2048 unmasked and causal, 4096 at D64 and D128, BERT, ViT) and
float32 ones with ``precision="bf16"`` (the prefill shapes), each beside
pyattn's own exact float32 on the same values (``pyattn-f32``, column
``f32``) and the peers' bfloat16 (torch's bfloat16 SDPA, or float32 with
``fp32_precision = "bf16"``; OpenVINO's SDPA with INFERENCE_PRECISION_HINT
bf16), all timed interleaved, one call each in turn, in the throughput table.

Modules: ``cases`` (:class:`Case`, ``CASES``, ``SUITES``, tolerances),
``peers`` (``IMPLEMENTATIONS``, maps a name to ``prepare(case, q, k, v,
threads) -> call``, the untimed setup returning the timed call: pyattn and
the reference; ``ALONGSIDE``, pyattn-f32; ``PEERS``, the optional other
libraries as :class:`Peer`),
``timing`` (the timing loop and its rule), ``measure`` (:func:`run_case`:
one case prepared, timed and checked), ``report`` (the machine line, the
tables, the plot, the JSON), ``memory`` (--memory), ``layers`` (--layers),
``child`` (a fresh interpreter for those two) and ``cli`` (the options).

pyattn is the implementation the throughput columns describe and the
reference the one every result is checked against.  A peer is measured only
when it imports, otherwise reported as absent, and may decline a case it
cannot run (``n/a``).  Every output, a peer's included, is compared with the
reference outside the timing; one that differs is marked ``(WRONG)`` so a
misconfigured peer cannot show a fast time.
"""
from pyattn.bench.cases import (
                                CASES,
                                DEFAULT_SUITE,
                                LATENCY_CASES,
                                PLOT_SWEEP,
                                SUITES,
                                TOLERANCE,
                                Case,
)
from pyattn.bench.cli import main
from pyattn.bench.measure import run_case
from pyattn.bench.memory import peak_rss_bytes
from pyattn.bench.peers import IMPLEMENTATIONS, PEERS, NotApplicable, Peer
from pyattn.bench.report import machine_info

__all__ = ["CASES", "DEFAULT_SUITE", "IMPLEMENTATIONS", "LATENCY_CASES", "PEERS", "PLOT_SWEEP",
           "SUITES", "TOLERANCE", "Case", "NotApplicable", "Peer", "main", "machine_info",
           "peak_rss_bytes", "run_case"]
