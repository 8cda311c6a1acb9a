"""Peak memory of one call is O(threads x tile), not O(L x S).

Each case runs in a fresh interpreter and reads the process's peak resident
set size (VmHWM) after the call, against its resident set size just before:
that difference bounds what the call added at its peak (from above, so the
check is conservative).  Not ru_maxrss: on Linux it keeps the high-water mark
of the image before exec, i.e. of the (large) pytest process that forked the
child.  tracemalloc cannot see the kernel's C mallocs.
A control allocation in the same child shows that the measurement does see a
score-matrix-sized buffer.  The calls use two threads, so the bound does not
depend on the machine's CPU count (per-thread scratch is part of the budget).
"""
import json
import textwrap

import pytest

L = S = 8192
D = 64
MiB = 1 << 20
SCORES_BYTES = L * S * 4  # float32 scores: 256 MiB
LIMIT = 64 * MiB

CHILD = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import pyattn

    def rss_now():
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: the peak so far (less conservative)
            return peak()

    from pyattn.bench import peak_rss_bytes as peak

    L = S = {L}
    D = {D}
    case = {case!r}
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 1, n, D), dtype=np.float32) for n in (L, S, S))
    kwargs = {{}}
    if case == "causal_float_mask_row":
        kwargs = dict(is_causal=True, attn_mask=rng.standard_normal((1, S)))  # float64 row
    elif case == "bool_mask_column":
        kwargs = dict(attn_mask=rng.random((L, 1)) < 0.9)
    # Start the OpenMP thread pool and fault in the code, on a small problem.
    pyattn.scaled_dot_product_attention(q[..., :256, :], k[..., :256, :], v[..., :256, :])

    before = rss_now()
    out = pyattn.scaled_dot_product_attention(q, k, v, num_threads=2, **kwargs)
    grew = peak() - before

    # Spot-check three rows against a direct NumPy computation of just them.
    rows = np.array([0, L // 2 - 1, L - 1])
    s = (q[0, 0, rows].astype(np.float64) @ k[0, 0].T.astype(np.float64)) / np.sqrt(D)
    if "attn_mask" in kwargs:
        m = np.broadcast_to(kwargs["attn_mask"], (L, S))[rows]
        s = np.where(m, s, -np.inf) if m.dtype == bool else s + m
    if kwargs.get("is_causal"):
        s = np.where(np.arange(S)[None, :] <= rows[:, None], s, -np.inf)
    w = np.exp(s - s.max(axis=1, keepdims=True))
    expected = (w / w.sum(axis=1, keepdims=True)) @ v[0, 0].astype(np.float64)
    err = float(np.abs(out[0, 0, rows] - expected).max())

    # Control: a buffer the size of the scores is seen by this measurement.
    base = rss_now()
    scores = np.ones((L, S), np.float32)
    control = peak() - base
    del scores
    print(json.dumps({{"grew": grew, "out_bytes": out.nbytes, "err": err,
                       "control": control}}))
""")


@pytest.mark.parametrize("case", ["plain", "causal_float_mask_row", "bool_mask_column"])
def test_peak_memory_is_independent_of_scores_size(case, helpers, tmp_path):
    proc = helpers.run_python(CHILD.format(L=L, D=D, case=case), cwd=tmp_path, timeout=300)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["control"] >= 0.9 * SCORES_BYTES, got  # the measurement works
    assert got["out_bytes"] == L * D * 4
    extra = got["grew"] - got["out_bytes"]
    assert extra < LIMIT, f"the call grew the peak RSS by {extra / MiB:.1f} MiB over its output"
    assert got["err"] < 1e-4, got
