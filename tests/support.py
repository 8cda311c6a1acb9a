"""Plain helpers shared by the test modules (``from support import ...``).

The suite runs under pytest's default import mode ("prepend": pyproject.toml
sets no ``--import-mode``), which puts the directory of tests/conftest.py on
``sys.path`` before any test module is imported, so this module is importable
from every test file, in tests/ and in its subfolders.  What needs pytest's
machinery (fixtures) lives in conftest.py instead; what is needed at import
time (parametrize lists and ids, module-level data) lives here.
"""
import contextlib
import re
import tracemalloc

import numpy as np
import pytest
from hypothesis import strategies as st

import pyattn
from pyattn import _attention, _dispatch
from pyattn import reference as ref

try:
    from ml_dtypes import bfloat16
except ImportError:  # CI installs ml_dtypes; elsewhere the bfloat16 cases skip
    bfloat16 = None

USABLE_KERNELS = _dispatch.usable_kernels()
# pyattn and its NumPy reference share every input rule and every result
SDPA_IMPLS = {"pyattn": pyattn.scaled_dot_product_attention,
              "reference": ref.scaled_dot_product_attention}

needs_bf16 = pytest.mark.skipif(bfloat16 is None, reason="needs ml_dtypes")
FULL = [np.float32, np.float64]  # the full-precision dtypes
HALVES = [np.float16, pytest.param(bfloat16, marks=needs_bf16, id="bfloat16")]
HALF_AND_FULL = FULL + HALVES


# Every score modifier at once, with GQA: (q shape, k shape, v shape, options)
ALL_MODIFIERS_CASE = ((2, 4, 20, 16), (2, 2, 90, 16), (2, 2, 90, 16),
                      dict(enable_gqa=True, is_causal=True, alignment="lower_right",
                           window=(30, None), alibi_slopes=[0.5, 0.25, 0.125, 0.0625],
                           softcap=3.0, sinks=[0.0, 1.0, -1.0, -np.inf], q_lengths=[20, 7],
                           kv_lengths=[90, 33]))


def ids(v):
    """Parametrize id of a dtype (or any value): its name."""
    return getattr(v, "__name__", str(v))


def randn(rng, shape, dtype=np.float32, scale=1.0):
    """Standard-normal array of `dtype` (times `scale`)."""
    return (rng.standard_normal(shape) * scale).astype(dtype)


def draw_batch(draw):
    """Inside a Hypothesis composite: 0 to 2 batch axes of size 1 to 3."""
    nbatch = draw(st.integers(0, 2))
    return tuple(draw(st.integers(1, 3)) for _ in range(nbatch))


def f32(*shape):
    """A float32 array of ones."""
    return np.ones(shape, np.float32)


def esc(obj):
    """The regex matching str(obj) literally (shapes are tuples)."""
    return re.escape(str(obj))


def random_mask(rng, kind, shape, dtype, *, keep=0.7, scale=1.0, neginf=0.3,
                both_values=True):
    """A random attn_mask of `kind`: None; "bool" (True = take part, each
    element with probability `keep`; with `both_values`, both values present
    when it has two or more elements); "float" (normal values times `scale`)
    or "float_neginf" (the same with a fraction `neginf` set to -inf)."""
    if kind is None:
        return None
    if kind == "bool":
        m = np.asarray(rng.random(shape) < keep)
        if both_values and m.size > 1:
            m.flat[0], m.flat[-1] = True, False
        return m
    m = np.asarray(rng.standard_normal(shape) * scale).astype(dtype)
    if kind == "float_neginf":
        m[np.asarray(rng.random(shape) < neginf)] = -np.inf
    return m


@contextlib.contextmanager
def using_kernel(name, exact_threads=False):
    """Switch pyattn's kernel (what conftest's `kernel` fixture does, for
    Hypothesis tests, which cannot take function-scoped fixtures); with
    `exact_threads`, also turn the thread cost model off (conftest's
    `exact_threads`), so that num_threads=2 runs two threads even on small
    problems."""
    saved = _dispatch.KERNEL, getattr(_attention, "THREAD_COST_MODEL", None)
    _dispatch.KERNEL = name
    if exact_threads and saved[1] is not None:
        _attention.THREAD_COST_MODEL = False
    try:
        yield
    finally:
        _dispatch.KERNEL = saved[0]
        if exact_threads and saved[1] is not None:
            _attention.THREAD_COST_MODEL = saved[1]


def peak_traced_bytes(fn):
    """(fn(), the peak of the memory traced during the call): tracemalloc
    sees every NumPy allocation, not the kernel's C scratch."""
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
