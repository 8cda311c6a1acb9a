"""Determinism: what may and may not change pyattn's bits.

Bitwise identical, for every kernel:
- across repeated calls, and across fresh processes (other heap addresses,
  another OMP_NUM_THREADS);
- across num_threads 1, 2, 3 and 4, for every code path: tiled and decode
  kernels, masks, causality, GQA, broadcasting, strided inputs, several
  batches and heads on the split-KV path, and the softmax weights (per head
  and averaged over heads, through the layers too);
- across the memory address (alignment) of the inputs and of `out`.

Not bitwise identical, by design: two different chunkings of the keys on the
split-KV path.  Each chunk's output is normalised over its own keys and the
chunks are merged by their logsumexps, so the rounding differs from an
unsplit pass.  The chunking depends only on the shapes (split_keys), never on
the thread count, so for a given shape the result is still bitwise fixed;
different chunkings agree to a few units in the last place.

test_split_keys.py covers the split rule and 1-3 threads for one (batch,
head); test_threads_config.py covers how many threads run.  This file adds
the rest.
"""
import json
import textwrap

import numpy as np
import pytest
from support import randn

import pyattn
from pyattn import _attention, _plan, functional
from pyattn import reference as ref

sdpa = pyattn.scaled_dot_product_attention
THREADS = (1, 2, 3, 4)


def case_inputs(name, rng, kernel):
    """(args, kwargs) of one scaled_dot_product_attention call; shapes are
    chosen per kernel so that L spans several query blocks and ends with a
    partial one (and a block of fewer rows than the micro-kernel's)."""
    f64 = np.float64
    bm32 = _attention.block_rows(kernel, "float32")
    bm64 = _attention.block_rows(kernel, "float64")
    L32, L64 = 2 * bm32 + 3, bm64 + 5
    if name == "plain":
        return (randn(rng, (2, 3, L32, 64)), randn(rng, (2, 3, 300, 64)),
                randn(rng, (2, 3, 300, 48))), {}
    if name == "causal_f64":
        return (randn(rng, (2, 2, L64, 32), f64), randn(rng, (2, 2, L64, 32), f64),
                randn(rng, (2, 2, L64, 40), f64)), {"is_causal": True}
    if name == "bool_mask_gqa":
        q, k, v = (randn(rng, s) for s in [(1, 8, L32, 16), (1, 2, 257, 16), (1, 2, 257, 16)])
        return (q, k, v), {"attn_mask": rng.random((L32, 257)) > 0.4, "enable_gqa": True}
    if name == "additive_mask_broadcast_batch":
        q, k, v = (randn(rng, s) for s in [(3, 1, 4, L32, 24), (1, 2, 4, 190, 24),
                                             (1, 2, 4, 190, 8)])
        return (q, k, v), {"attn_mask": randn(rng, (2, 1, L32, 190)), "is_causal": True}
    if name == "strided_views":
        big = randn(rng, (2, 4, L32, 3, 80), f64)
        q = big[:, :, :, 0, :32]
        k = big[:, :, ::-1, 1, 40:72]
        v = big[:, ::-1, :, 2, ::3]
        return (q, k, v), {}
    if name == "decode_no_split":  # L=1, S < 2 * SPLIT_MIN_KEYS: the direct path
        return (randn(rng, (4, 8, 1, 128)), randn(rng, (4, 8, 1500, 128)),
                randn(rng, (4, 8, 1500, 128))), {}
    if name == "decode_split_batched":  # 2*3 items < 16: split-KV over S=5000
        q, k, v = (randn(rng, (2, 3, n, 64)) for n in (1, 5000, 5000))
        return (q, k, v), {"attn_mask": rng.random((2, 1, 1, 5000)) > 0.2}
    if name == "few_rows_split_causal_f64":  # L=5 rows, S=3000 keys, split, causal
        q, k, v = (randn(rng, (1, 2, n, 32), f64) for n in (5, 3000, 3000))
        return (q, k, v), {"is_causal": True}
    raise ValueError(name)


SPLIT_CASES = {"decode_split_batched", "few_rows_split_causal_f64"}
CASES = ["plain", "causal_f64", "bool_mask_gqa", "additive_mask_broadcast_batch",
         "strided_views", "decode_no_split", "decode_split_batched",
         "few_rows_split_causal_f64"]


@pytest.mark.parametrize("name", CASES)
def test_bitwise_across_thread_counts_and_repeats(name, kernel, rng, spy_threads, exact_threads):
    args, kwargs = case_inputs(name, rng, kernel)
    first = sdpa(*args, num_threads=1, **kwargs)
    # The shapes are meant to be what their names say.
    L, S = args[0].shape[-2], args[1].shape[-2]
    n_items = first[..., 0, 0].size * -(-L // _attention.block_rows(kernel, first.dtype.name))
    assert (_plan.split_keys(n_items, S) > 0) == (name in SPLIT_CASES)
    for n in THREADS + THREADS[::-1] + (None, -1):
        got = sdpa(*args, num_threads=n, **kwargs)
        assert np.array_equal(got, first), f"num_threads={n}"
    assert spy_threads[:5] == [1, 1, 2, 3, 4]  # really ran on that many threads
    tol = 1e-10 if first.dtype == np.float64 else 2e-4
    np.testing.assert_allclose(first, ref.scaled_dot_product_attention(*args, **kwargs),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("mode", ["heads", "mean"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_weights_bitwise_across_thread_counts(mode, dtype, kernel, rng):
    """The weights path (need_weights): per head, and the mean over heads,
    which one thread sums in head order.

    Exception: asking for weights may change the output's last bits.  The
    weights path always takes the tiled kernel, while without weights a query
    block of fewer rows than the micro-kernel's MR (here the last block, of
    7 rows: MR is 8 on AVX-512) takes the direct (decode) kernel, which sums
    in another order.  For a given call, both are fixed."""
    bm = _attention.block_rows(kernel, np.dtype(dtype).name)
    L = bm + 7
    q, k, v = (randn(rng, s, dtype) for s in [(2, 5, L, 32), (2, 5, 270, 32), (2, 5, 270, 16)])
    mask = rng.random((2, 1, L, 270)) > 0.3
    mask[0, 0, 3] = False  # a fully masked row: weights 0
    results = [functional.attention(q, k, v, mask, True, num_threads=n, weights=mode)[:2]
               for n in THREADS + (2, 1)]
    out0, w0 = results[0]
    assert w0.shape == ((2, 5, L, 270) if mode == "heads" else (2, L, 270))
    for n, (out, w) in zip(THREADS + (2, 1), results):
        assert np.array_equal(out, out0), n
        assert np.array_equal(w, w0), n
    # the output without weights: bitwise fixed too, and within rounding of
    # the one with weights (bitwise equal unless the last block has < MR rows)
    plain = [sdpa(q, k, v, mask, True, num_threads=n) for n in THREADS]
    assert all(np.array_equal(p, plain[0]) for p in plain)
    unit = float(np.finfo(dtype).eps) * float(np.abs(v).max())
    assert float(np.abs(plain[0] - out0).max()) <= 4 * unit
    assert np.array_equal(plain[0][..., :bm, :], out0[..., :bm, :])  # full blocks: same kernel


@pytest.mark.parametrize("average", [True, False])
def test_layers_bitwise_across_thread_counts(average, rng):
    """MultiHeadAttention's output and weights (averaged or per head), and
    SelfAttention's, for 1-4 threads.  The projections are NumPy's BLAS, which
    pyattn's num_threads does not touch."""
    mha = pyattn.MultiHeadAttention(96, 6, rng=5)
    x = randn(rng, (3, 300, 96))
    pad = rng.random((3, 300)) < 0.1
    got = [mha(x, x, x, key_padding_mask=pad, average_attn_weights=average, is_causal=True,
               num_threads=n) for n in THREADS]
    for n, (out, w) in zip(THREADS, got):
        assert np.array_equal(out, got[0][0]), n
        assert np.array_equal(w, got[0][1]), n
    assert got[0][1].shape == ((3, 300, 300) if average else (3, 6, 300, 300))

    sa = pyattn.SelfAttention(40, kdim=24, bias=True, dtype=np.float64, rng=6)
    xs = randn(rng, (2, 270, 40))
    sa_got = [sa(xs, is_causal=True, return_weights=True, num_threads=n) for n in THREADS]
    for out, w in sa_got:
        assert np.array_equal(out, sa_got[0][0]) and np.array_equal(w, sa_got[0][1])


def at_offset(a, byte_offset):
    """A copy of `a` whose data starts `byte_offset` bytes past a 64-byte
    boundary (the offset is a multiple of the itemsize)."""
    raw = np.empty(a.nbytes + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + byte_offset
    view = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    view[...] = a
    assert view.ctypes.data % 64 == byte_offset
    return view


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("L, S", [(131, 300), (1, 600), (3, 4100)])
def test_bitwise_whatever_the_alignment(dtype, L, S, kernel, rng):
    """Inputs and out at every itemsize-multiple offset from a 64-byte
    boundary (vector loads then straddle cache lines differently) give the
    same bits: results do not depend on where NumPy put the arrays."""
    item = np.dtype(dtype).itemsize
    q, k, v = (randn(rng, s, dtype) for s in [(2, L, 40), (2, S, 40), (2, S, 20)])
    want = sdpa(q, k, v)
    for i, off in enumerate(range(0, 64, item)):
        qa, ka, va = (at_offset(a, (off + j * item) % 64) for j, a in enumerate((q, k, v)))
        out = at_offset(np.zeros_like(want), (64 - off) % 64)
        sdpa(qa, ka, va, out=out, num_threads=1 + i % 3)
        assert np.array_equal(out, want), off


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("E, Ev", [(128, 128), (12, 24), (40, 136), (8, 8)])
def test_decode_rows_are_bitwise_those_of_a_lone_row(dtype, E, Ev, kernel, rng, helpers):
    """The direct path loads each key and value row once for up to four query
    rows (GQA heads as rows, a few query rows) in the order a lone row sums
    them: every row of such a block has the bits of the same row decoded
    alone.  The widths cover whole vector pairs, a vector left over and
    scalar tails; S = 300 ends on keys that are not whole vectors."""
    S, hkv = 300, 2
    k, v = randn(rng, (1, hkv, S, E), dtype), randn(rng, (1, hkv, S, Ev), dtype)
    for group in (2, 3, 4, 5):  # rows per block (on AVX2: one group, a group and a tail)
        q = randn(rng, (1, hkv * group, 1, E), dtype)
        got = sdpa(q, k, v, enable_gqa=True, window=(200, None))
        for h in range(hkv * group):
            alone = sdpa(q[:, h:h + 1], k[:, h // group:h // group + 1],
                         v[:, h // group:h // group + 1], window=(200, None))
            assert np.array_equal(got[:, h:h + 1], alone), (group, h)
        helpers.assert_close(got, ref.scaled_dot_product_attention(
            q, k, v, enable_gqa=True, window=(200, None)))
    # three query rows of one head (more than the smallest micro-tile's MR - 1,
    # 3 on baseline, would take the tiled path, which rounds otherwise)
    rows = randn(rng, (1, hkv, 3, E), dtype)
    got = sdpa(rows, k, v)
    for r in range(3):
        assert np.array_equal(got[:, :, r:r + 1], sdpa(rows[:, :, r:r + 1], k, v)), r


# --------------------------------------------------------------------------
# Split-KV: the chunking of S
# --------------------------------------------------------------------------

def force_chunk(monkeypatch, keys_per_chunk):
    """Make every call split the keys into chunks of this many (0: no split)."""
    monkeypatch.setattr(_plan, "split_keys", lambda n_items, S: keys_per_chunk)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_each_chunking_is_bitwise_fixed_and_all_agree(dtype, kernel, rng, monkeypatch):
    """For one decode-like shape, run the split-KV path with every chunking of
    S = 5000 keys from none to 5 chunks (key0 must stay a multiple of 1024).
    Each is bitwise identical across thread counts and repeats; different
    chunkings agree to a few ulps of the output's magnitude."""
    q, k, v = (randn(rng, s, dtype) for s in [(2, 2, 3, 64), (2, 2, 5000, 64), (2, 2, 5000, 48)])
    mask = rng.random((3, 5000)) > 0.5
    mask[:, :1100] = False  # the first chunk is fully masked for 1024-key chunks
    want = ref.scaled_dot_product_attention(*(a.astype(np.float64) for a in (q, k, v)),
                                            attn_mask=mask)
    eps = float(np.finfo(dtype).eps)
    by_chunk = {}
    for chunk in (0, 1024, 2048, 3072, 4096, 5120):
        force_chunk(monkeypatch, chunk)
        runs = [sdpa(q, k, v, attn_mask=mask, num_threads=n) for n in THREADS + (1,)]
        for n, got in zip(THREADS + (1,), runs):
            assert np.array_equal(got, runs[0]), (chunk, n)
        by_chunk[chunk] = runs[0]
    # An output is a weighted mean of value rows: its rounding error scales
    # with max|v| (measured: at most 0.5 eps * max|v| on every kernel).
    unit = eps * float(np.abs(v).max())
    for chunk, got in by_chunk.items():
        for other, name in ((by_chunk[0], "no split"), (want, "the float64 reference")):
            err = float(np.abs(got - other).max()) / unit
            assert err <= 4, f"chunk {chunk}: differs from {name} by {err:.2f} eps * max|v|"


@pytest.mark.parametrize("target", [1, 4, 16, 64])
def test_split_target_changes_chunking_not_the_answer(target, rng, monkeypatch):
    """SPLIT_TARGET_ITEMS sets how many chunks a decode call gets (1: never
    split).  For a fixed setting, results do not depend on the thread count;
    across settings they agree to a few ulps."""
    q, k, v = randn(rng, (1, 3, 1, 64)), randn(rng, (1, 3, 8192, 64)), randn(rng, (1, 3, 8192, 64))
    base = sdpa(q, k, v)  # the default target (16): 3 items -> 6 chunks of 1536 -> 2048
    monkeypatch.setattr(_plan, "SPLIT_TARGET_ITEMS", target)
    chunk = _plan.split_keys(3, 8192)
    assert (chunk == 0) == (target <= 3)
    runs = [sdpa(q, k, v, num_threads=n) for n in THREADS]
    for got in runs:
        assert np.array_equal(got, runs[0])
    unit = float(np.finfo(np.float32).eps) * float(np.abs(v).max())
    assert float(np.abs(runs[0] - base).max()) <= 4 * unit


# --------------------------------------------------------------------------
# Across processes
# --------------------------------------------------------------------------

DIGEST_CHILD = textwrap.dedent("""
    import hashlib, json
    import numpy as np
    import threadpoolctl
    import pyattn
    from pyattn import functional

    def digest():
        rng = np.random.default_rng(2024)
        h = hashlib.sha256()
        for qs, ks, kw in [((2, 4, 300, 64), (2, 4, 500, 64), {"is_causal": True}),
                           ((1, 6, 1, 64), (1, 6, 4096, 64), {}),
                           ((3, 2, 70, 16), (3, 2, 70, 16),
                            {"attn_mask": rng.random((70,)) > 0.5})]:
            for dtype in (np.float32, np.float64):
                q = rng.standard_normal(qs).astype(dtype)
                k = rng.standard_normal(ks).astype(dtype)
                v = rng.standard_normal(ks).astype(dtype)
                h.update(pyattn.scaled_dot_product_attention(q, k, v, **kw).tobytes())
                out, w, _ = functional.attention(q[..., :40, :], k, v, weights="mean", **kw)
                h.update(out.tobytes() + w.tobytes())
        mha = pyattn.MultiHeadAttention(64, 4, rng=0)
        x = rng.standard_normal((2, 50, 64)).astype(np.float32)
        # The projections are NumPy's BLAS, whose sums follow its own thread
        # count (OpenBLAS reads OMP_NUM_THREADS too): one BLAS thread everywhere.
        with threadpoolctl.threadpool_limits(1, user_api="blas"):
            out, w = mha(x, x, x)
        h.update(out.tobytes() + w.tobytes())
        return h.hexdigest()

    print(json.dumps({"digest": digest(), "kernel": pyattn.config()["kernel"],
                      "threads": pyattn.config()["default_threads"]}))
""")


def test_bitwise_across_processes(helpers, tmp_path):
    """Fresh interpreters (new heap addresses) with OMP_NUM_THREADS 1 and 3,
    against this process: one digest.  The kernel is pinned to this process's
    choice, since different ISAs round differently."""
    ns = {"__name__": "digest"}
    exec(compile(DIGEST_CHILD.split("print(json")[0], "digest", "exec"), ns)
    here = ns["digest"]()
    kernel = pyattn.config()["kernel"]
    for omp in (1, 3):
        proc = helpers.run_python(DIGEST_CHILD, cwd=tmp_path, OMP_NUM_THREADS=omp,
                                  PYATTN_ISA=kernel)
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        assert (got["kernel"], got["threads"]) == (kernel, omp)
        assert got["digest"] == here, f"OMP_NUM_THREADS={omp}"
