"""Long-running stability: memory over many calls, and 64-bit indexing.

Memory: a fresh interpreter makes 100k small calls, then 1k larger ones
(prefill, causal with a float mask, split-KV decode, MultiHeadAttention with
averaged and per-head weights, SelfAttention with weights), after a warm-up,
and reads its resident set size (/proc/self/statm) at six checkpoints per
phase.  Growth after the warm-up must stay under a bound that any per-call
leak would exceed: 4 MiB over 100k small calls (a leak of 42 bytes per call
would pass it) and 8 MiB over 1k larger calls (every one of them allocates
at least 64 KiB of output and scratch).  A control leak shows that the
measurement sees such growth.  The 100k small calls run on one thread: with
two threads each call wakes an OpenMP worker, ~60 us per call on an idle
2-core VM but ~1.2 ms when the VM is busy (100k calls: 6 s or 2 min), so
2k more small calls use the default thread count.  BLAS is limited to one
thread in the child for the same reason (the layers' projections).

Index safety: arrays whose elements lie beyond 2^31 (and 2^32) elements from
their start, through huge batch, head, row and column strides, read from
and written to large *virtual* mappings (MAP_NORESERVE: address space, not
memory; 5 * 2^31 elements each, 40 GiB for float32) of which only the few
pages holding elements are ever touched.  The results must be
bitwise those of contiguous copies, and close to the reference; the process
must not grow by more than a few MiB.  A 32-bit offset anywhere on the way
(the batch byte offsets and head strides of the driver, the row and column
strides of the kernel, the mask's strides) would read other memory (zeros)
and fail the comparison, or crash.
"""
import json
import mmap
import os
import platform
import sys

import numpy as np
import pytest

import pyattn
from pyattn import reference as ref

sdpa = pyattn.scaled_dot_product_attention
MiB = 1 << 20
# Under tools/sanitize.sh, ASan's quarantine and shadow memory grow RSS by
# design (as for test_memory.py, which it skips): RSS bounds do not apply.
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")

# --------------------------------------------------------------------------
# RSS over many calls
# --------------------------------------------------------------------------

N_SMALL = 100_000        # one thread
N_SMALL_DEFAULT = 2_000  # the default thread count
N_LARGE = 1_000
SMALL_BOUND = 4 * MiB
LARGE_BOUND = 8 * MiB

CHILD = """
import json, os, sys, time
import numpy as np
import pyattn
from pyattn import functional

N_SMALL, N_SMALL_DEFAULT, N_LARGE = {n_small}, {n_small_default}, {n_large}
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


sdpa = pyattn.scaled_dot_product_attention
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, 1, 4, 8)).astype(np.float32) for _ in range(3))
q64, k64, v64 = (a.astype(np.float64) for a in (q, k, v))
keep = rng.random((4, 4)) > 0.3
buf = np.empty_like(q)
bad_k = k[..., :3, :]
mha_small = pyattn.MultiHeadAttention(8, 2, rng=0)
x_small = rng.standard_normal((1, 4, 8)).astype(np.float32)


def small(i, nt):
    j = i % 8
    if j == 0:
        sdpa(q, k, v, num_threads=nt)
    elif j == 1:
        sdpa(q, k, v, is_causal=True, num_threads=nt)
    elif j == 2:
        sdpa(q, k, v, attn_mask=keep, out=buf, num_threads=nt)
    elif j == 3:
        sdpa(q64, k64, v64, num_threads=nt)
    elif j == 4:
        functional.attention(q, k, v, weights="heads", num_threads=nt)
    elif j == 5:
        mha_small(x_small, x_small, x_small, num_threads=nt)  # need_weights=True
    elif j == 6:
        try:  # an error path
            sdpa(q, bad_k, v, num_threads=nt)
        except ValueError:
            pass
        else:
            raise AssertionError("no error")
    else:
        sdpa(q[0, 0], k[0, 0, :2], v[0, 0, :2], num_threads=nt)


qL, kL, vL = (rng.standard_normal((1, 4, 256, 64)).astype(np.float32) for _ in range(3))
bias = rng.standard_normal((256, 1)).astype(np.float32)
qD = rng.standard_normal((1, 4, 1, 64)).astype(np.float32)
kD, vD = (rng.standard_normal((1, 4, 4096, 64)).astype(np.float32) for _ in range(2))
mha = pyattn.MultiHeadAttention(128, 4, rng=1)
xL = rng.standard_normal((2, 128, 128)).astype(np.float32)
sa = pyattn.SelfAttention(64, rng=2)
xs = rng.standard_normal((2, 100, 64)).astype(np.float32)


def large(i):
    j = i % 6
    if j == 0:
        sdpa(qL, kL, vL)
    elif j == 1:
        sdpa(qL, kL, vL, is_causal=True, attn_mask=bias)
    elif j == 2:
        sdpa(qD, kD, vD)  # split-KV: partial outputs and logsumexps
    elif j == 3:
        mha(xL, xL, xL)  # weights averaged over heads
    elif j == 4:
        mha(xL, xL, xL, average_attn_weights=False)
    else:
        sa(xs, is_causal=True, return_weights=True)


def phase(n, fn, checkpoints=5):
    for i in range(max(n // 20, 60)):  # warm-up
        fn(i)
    marks = [rss()]
    t = time.perf_counter()
    for c in range(checkpoints):
        for i in range(c * n // checkpoints, (c + 1) * n // checkpoints):
            fn(i)
        marks.append(rss())
    return {{"calls": n, "seconds": time.perf_counter() - t, "rss": marks}}


report = {{
    "small_1thread": phase(N_SMALL, lambda i: small(i, 1)),
    "small_default": phase(N_SMALL_DEFAULT, lambda i: small(i, None)),
    "large": phase(N_LARGE, large),
}}
# Control: keeping 2k arrays of 64 KiB alive (125 MiB) is seen as growth.
before = rss()
kept = [np.ones(16384, np.float32) for _ in range(2000)]
report["control"] = rss() - before
print(json.dumps(report))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
@pytest.mark.skipif(UNDER_ASAN, reason="ASan's quarantine grows RSS by design")
def test_rss_is_stable_over_many_calls(helpers, tmp_path):
    code = CHILD.format(n_small=N_SMALL, n_small_default=N_SMALL_DEFAULT, n_large=N_LARGE)
    proc = helpers.run_python(code, cwd=tmp_path, timeout=600, OPENBLAS_NUM_THREADS=1,
                              MKL_NUM_THREADS=1)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    # the measurement works (freed memory the allocator kept is reused first)
    assert got["control"] >= 0.75 * 2000 * 64 * 1024, got

    def growth(name):
        marks = got[name]["rss"]
        return max(marks) - marks[0], [round((m - marks[0]) / MiB, 2) for m in marks]

    for name, bound in [("small_1thread", SMALL_BOUND), ("small_default", SMALL_BOUND),
                        ("large", LARGE_BOUND)]:
        grew, marks = growth(name)
        assert grew <= bound, (f"{name}: {got[name]['calls']} calls grew RSS by "
                               f"{grew / MiB:.2f} MiB (MiB at checkpoints: {marks})")


# --------------------------------------------------------------------------
# Offsets beyond 2^31 elements
# --------------------------------------------------------------------------

# MAP_NORESERVE is in Python's mmap module from 3.12 only; its Linux values.
_NORESERVE = getattr(mmap, "MAP_NORESERVE", None) or {
    "x86_64": 0x4000, "aarch64": 0x4000, "arm64": 0x4000, "riscv64": 0x4000,
}.get(platform.machine())

FAR = 2**31  # elements


def rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Sparse:
    """A private anonymous mapping of `n_elems` elements reserved without
    backing (MAP_NORESERVE): untouched pages cost nothing, each touched one a
    page.  `view(start, shape, strides)` is a strided array (strides in
    elements) into it, checked to stay inside."""

    def __init__(self, n_elems, dtype):
        self.dtype = np.dtype(dtype)
        flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0x20) | _NORESERVE
        try:
            self.map = mmap.mmap(-1, n_elems * self.dtype.itemsize, flags=flags,
                                 prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, OverflowError, ValueError) as exc:
            pytest.skip(f"cannot reserve {n_elems * self.dtype.itemsize / 2**30:.0f} GiB of "
                        f"address space: {exc}")
        if hasattr(self.map, "madvise") and hasattr(mmap, "MADV_NOHUGEPAGE"):
            self.map.madvise(mmap.MADV_NOHUGEPAGE)  # touch 4 KiB pages, not 2 MiB
        self.base = np.frombuffer(self.map, self.dtype)

    def view(self, start, shape, strides):
        assert start >= 0 and all(s >= 0 for s in strides)
        assert start + max_offset(shape, strides) < self.base.size
        item = self.base.itemsize
        return np.lib.stride_tricks.as_strided(self.base[start:], shape,
                                               [s * item for s in strides])


def far_layout(case, L, S, E, Ev):
    """Shape and element strides of q, k, v, out and the mask, for one way of
    putting elements beyond 2^31 (and 2^32) elements from an array's start.
    The odd additions keep rows off each other's pages and the offsets off
    round powers of two."""
    big, half = FAR + 4099, FAR // 2 + 2053
    if case == "batch":      # driver: per-batch byte offsets (batch 2 lies past 2^32)
        return {"q": ((3, 1, L, E), (big, 0, E, 1)),
                "k": ((3, 1, S, E), (big, 0, E, 1)),
                "v": ((3, 1, S, Ev), (big, 0, Ev, 1)),
                "out": ((3, 1, L, Ev), (big, 0, Ev, 1)),
                "mask": ((3, 1, L, S), (big, 0, S, 1))}
    if case == "heads":      # driver: head strides, with GQA (q head h reads kv head h // 2)
        return {"q": ((1, 6, L, E), (0, half, E, 1)),
                "k": ((1, 3, S, E), (0, big, E, 1)),
                "v": ((1, 3, S, Ev), (0, big, Ev, 1)),
                "out": ((1, 6, L, Ev), (0, half, Ev, 1)),
                "mask": ((1, 6, L, S), (0, half, S, 1))}
    if case == "rows":       # kernel: row * row stride
        return {"q": ((1, 1, L, E), (0, 0, half, 1)),
                "k": ((1, 1, S, E), (0, 0, half, 1)),
                "v": ((1, 1, S, Ev), (0, 0, half, 1)),
                "out": ((1, 1, L, Ev), (0, 0, half, 1)),
                "mask": ((1, 1, L, S), (0, 0, half, 1))}
    if case == "columns":    # kernel: column * column stride
        return {"q": ((1, 1, L, E), (0, 0, 1, half)),
                "k": ((1, 1, S, E), (0, 0, 1, half)),
                "v": ((1, 1, S, Ev), (0, 0, 1, half)),
                "out": ((1, 1, L, Ev), (0, 0, 1, half)),
                "mask": ((1, 1, L, S), (0, 0, 1, half))}
    raise ValueError(case)


def max_offset(shape, strides):
    return sum((n - 1) * s for n, s in zip(shape, strides))


@pytest.fixture(scope="module")
def sparse_maps():
    """Per dtype: a mapping for the inputs and one for out (which must not
    overlap them); and one for bool masks."""
    if _NORESERVE is None or not os.path.exists("/proc/self/statm") or sys.maxsize < 2**62:
        pytest.skip("needs 64-bit Linux with a known MAP_NORESERVE")
    n = 5 * FAR  # room for offsets up to 4.5 * 2^31 elements
    maps = {dtype: (Sparse(n, dtype), Sparse(n, dtype)) for dtype in (np.float32, np.float64)}
    maps[np.bool_] = Sparse(n, np.bool_)
    yield maps
    maps.clear()


CASES = [(case, L, S) for case in ("batch", "heads", "rows", "columns")
         for L, S in [(9, 7), (1, 5), (2, 2100)]
         if S < 100 or case in ("batch", "heads")]  # rows/columns: a page per element


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case, L, S", CASES)
def test_offsets_beyond_2_31_elements(case, L, S, dtype, kernel, sparse_maps, rng):
    """(9, 7): the tiled kernel with causality; (1, 5): the decode kernel;
    (2, 2100): split-KV (few work items, S >= 2048)."""
    src, dst = sparse_maps[dtype]
    E, Ev = 8, 6
    lay = far_layout(case, L, S, E, Ev)
    assert max(max_offset(*lay[n]) for n in ("q", "k", "v", "out")) > 2**32
    rss0 = rss_now()
    views = {}
    for i, name in enumerate(("q", "k", "v")):  # distinct starts; odd strides keep them apart
        views[name] = src.view(1_000_003 * (i + 1), *lay[name])
        views[name][...] = rng.standard_normal(lay[name][0]).astype(dtype)
    q, k, v = views["q"], views["k"], views["v"]
    mask = sparse_maps[np.bool_].view(12_345, *lay["mask"])
    mask[...] = rng.random(lay["mask"][0]) > 0.3
    mask[..., 0] = True
    out = dst.view(3_000_017, *lay["out"])
    out[...] = np.nan
    kwargs = {"attn_mask": mask, "is_causal": L == 9, "enable_gqa": case == "heads"}

    got = sdpa(q, k, v, out=out, **kwargs)
    assert got is out
    copies = [np.ascontiguousarray(a) for a in (q, k, v, mask)]
    plain = dict(kwargs, attn_mask=copies[3])
    want = sdpa(*copies[:3], **plain)
    assert np.array_equal(out, want)  # every element, including the far ones
    expected = ref.scaled_dot_product_attention(*(c.astype(np.float64) for c in copies[:3]),
                                                **plain)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(out, expected, rtol=tol, atol=tol)
    # Also on one thread, into a new contiguous result.
    assert np.array_equal(sdpa(q, k, v, num_threads=1, **kwargs), want)
    grew = rss_now() - rss0
    assert grew < 64 * MiB or UNDER_ASAN, f"RSS grew by {grew / MiB:.1f} MiB"
