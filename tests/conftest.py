"""Shared configuration and helpers for pyattn's tests.

Hypothesis profiles: "ci" (the default: derandomised, so every run draws the
same examples) and "dev" (random, more examples); choose with the
HYPOTHESIS_PROFILE environment variable.

The suite runs under pytest's default import mode, "prepend" (pyproject.toml
sets no ``--import-mode``): the directory of this file is put on ``sys.path``,
so test modules import plain helpers and constants (parametrize lists, ids,
mask builders) from ``tests/support.py``; helpers that tests take as
arguments are fixtures here.  Under this mode a test module's name is its
file's basename, so basenames must stay unique across tests/ and its
subfolders (which have no ``__init__.py``).  ``helpers`` is session-scoped so
that Hypothesis tests may use it too.
"""
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from support import USABLE_KERNELS, randn

import pyattn
from pyattn import _attention, _dispatch, _plan

settings.register_profile(
    "ci", derandomize=True, max_examples=60, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# Environment variables that change what a child interpreter does.
_CHILD_ENV_DROP = ("OMP_NUM_THREADS", "OMP_THREAD_LIMIT", "OMP_DYNAMIC", "OMP_PROC_BIND",
                   "OMP_PLACES", "GOMP_CPU_AFFINITY", _dispatch.ENV_VAR, "PYTHONSTARTUP")


class Helpers:
    """Namespace of test helpers (see the `helpers` fixture)."""

    randn = staticmethod(randn)  # support.randn

    @staticmethod
    def qkv(rng, qshape, kshape, vshape, dtype=np.float32):
        return tuple(Helpers.randn(rng, s, dtype) for s in (qshape, kshape, vshape))

    @staticmethod
    def tolerance(dtype, score_bound=0.0):
        """(rtol, atol) for comparing against the NumPy reference; atol is
        relative to the magnitude of the expected values (see assert_close).

        A score of size M is only known to about M * eps, and an error d in a
        score moves its softmax weight by a factor exp(d); so when the scores
        can be large (`score_bound`, see score_bound()) the tolerance grows to
        8 * eps * M."""
        eps = float(np.finfo(dtype).eps)
        base = 1e-12 if np.dtype(dtype) == np.float64 else 2e-5
        tol = max(base, 8 * eps * float(score_bound))
        return tol, (tol if np.dtype(dtype) == np.float64 else max(1e-5, tol))

    @staticmethod
    def score_bound(q, k, scale=None):
        """An upper bound of |scale * q . k| over all query/key rows
        (Cauchy-Schwarz), for tolerance()."""
        q = np.asarray(q, np.float64)
        k = np.asarray(k, np.float64)
        if q.size == 0 or k.size == 0:
            return 0.0
        scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
        qn = np.sqrt((q * q).sum(axis=-1)).max()
        kn = np.sqrt((k * k).sum(axis=-1)).max()
        return float(abs(scale) * qn * kn)

    @staticmethod
    def assert_close(actual, expected, dtype=None, rtol=None, atol=None, score_bound=0.0):
        """Same shape and dtype, NaNs in the same places, and
        |actual - expected| <= atol * max(1, max|expected|) + rtol * |expected|."""
        actual = np.asarray(actual)
        expected = np.asarray(expected)
        dtype = np.dtype(dtype if dtype is not None else expected.dtype)
        assert actual.shape == expected.shape, (actual.shape, expected.shape)
        assert actual.dtype == dtype, (actual.dtype, dtype)
        d_rtol, d_atol = Helpers.tolerance(dtype, score_bound)
        rtol = d_rtol if rtol is None else rtol
        atol = d_atol if atol is None else atol
        finite = np.isfinite(expected)
        mag = float(np.max(np.abs(expected[finite]), initial=0.0))
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * max(1.0, mag),
                                   equal_nan=True)

    @staticmethod
    def child_env(**overrides):
        """An environment for a child interpreter that imports the same pyattn
        as this process (installed or built in place), free of OpenMP and
        kernel-choice variables unless given in `overrides`."""
        env = {k: v for k, v in os.environ.items() if k not in _CHILD_ENV_DROP}
        pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(pyattn.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(
            [pkg_parent] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.update({k: str(v) for k, v in overrides.items()})
        return env

    @staticmethod
    def run_python(code, cwd, timeout=120, **env_overrides):
        """Run `code` in a fresh interpreter (cwd=`cwd`, which should not be
        the repository root); return the CompletedProcess, asserting success."""
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=cwd, env=Helpers.child_env(**env_overrides),
            capture_output=True, text=True, timeout=timeout,
        )
        assert proc.returncode == 0, (
            f"child exited with {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
        return proc


@pytest.fixture(scope="session")
def helpers():
    return Helpers


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id: reproducible, distinct per test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=USABLE_KERNELS)
def kernel(request, monkeypatch):
    """Runs the test once per kernel implementation this machine can run,
    by switching the one pyattn chose at import."""
    assert hasattr(_dispatch, "KERNEL")
    monkeypatch.setattr(_dispatch, "KERNEL", request.param)
    return request.param


@pytest.fixture
def spy_threads():
    """Records the team size of every kernel launch, made through the fast
    or the general path."""
    used = []
    _attention.record_launches(used)
    yield used
    _attention.record_launches(None)


@pytest.fixture
def exact_threads(monkeypatch):
    """Turns off the cost model, so that num_threads=n runs exactly n threads
    (at most one per work item) even on small problems: for tests of results
    across team sizes."""
    monkeypatch.setattr(_attention, "THREAD_COST_MODEL", False)


@pytest.fixture
def spy_split(monkeypatch):
    """The key chunk _plan.split_keys picks (0: no split), for every call."""
    chunks = []
    real = _plan.split_keys

    def spy(*args):
        chunks.append(real(*args))
        return chunks[-1]

    monkeypatch.setattr(_plan, "split_keys", spy)
    return chunks
