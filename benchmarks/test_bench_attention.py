"""pyattn against pyattn.reference on the named shapes of pyattn.bench, one
benchmark group per shape.

    python -m pytest benchmarks --benchmark-only

pyattn runs on every case of pyattn.bench (its "full" suite); the slow
reference only on the "quick" suite.  Each pyattn benchmark also checks,
outside the timing, that its result matches the reference, so a fast but
wrong kernel cannot pass.

A baseline run is committed in benchmarks/baseline/baseline.json; see
benchmarks/baseline/README.md for the commands that compare a new run with it.
"""
import numpy as np
import pytest

from pyattn.bench import CASES, IMPLEMENTATIONS, SUITES, TOLERANCE

REFERENCE_ROUNDS = 3  # the reference is slow (~0.3 s a prefill call)


def case_params(names):
    """One pytest.param per named case, id'd and grouped by its name."""
    return [pytest.param(CASES[name], id=name, marks=pytest.mark.benchmark(group=name))
            for name in names]


# the full suite and the decoding cases of the inference suite (its 16k
# cases take seconds a call: python -m pyattn.bench --suite inference)
PYATTN_CASES = SUITES["full"] + tuple(n for n in SUITES["inference"] if n.startswith("decode"))


@pytest.mark.parametrize("case", case_params(PYATTN_CASES))
def test_pyattn(benchmark, case, inputs, reference_output):
    q, k, v = inputs(case)
    out = benchmark(IMPLEMENTATIONS["pyattn"](case, q, k, v, None))
    want = reference_output(case)  # computed after the timing, outside it
    assert out.shape == want.shape and out.dtype == want.dtype
    np.testing.assert_allclose(out.astype(np.float64), want.astype(np.float64),
                               **TOLERANCE[case.dtype])


@pytest.mark.parametrize("case", case_params(SUITES["quick"]))
def test_reference(benchmark, case, inputs):
    q, k, v = inputs(case)
    out = benchmark.pedantic(IMPLEMENTATIONS["reference"](case, q, k, v, None),
                             rounds=REFERENCE_ROUNDS, iterations=1, warmup_rounds=1)
    assert out.shape == q.shape[:-1] + v.shape[-1:]
    assert np.isfinite(out).all()
