"""Shared fixtures for the pytest-benchmark suite (run it with
``python -m pytest benchmarks --benchmark-only``; it is not part of the
default test run, whose testpaths are ["tests"])."""
import pytest

pytest.importorskip("pytest_benchmark", reason="the benchmarks need pytest-benchmark")

from pyattn.bench import IMPLEMENTATIONS  # noqa: E402


@pytest.fixture(scope="session")
def inputs():
    """inputs(case) -> (q, k, v), generated once per case for the session."""
    _inputs = {}

    def get(case):
        if case.name not in _inputs:
            _inputs[case.name] = case.make_inputs()
        return _inputs[case.name]
    return get


@pytest.fixture(scope="session")
def reference_output(inputs):
    """reference_output(case) -> pyattn.reference's result, computed once per case."""
    _reference_outputs = {}

    def get(case):
        if case.name not in _reference_outputs:
            q, k, v = inputs(case)
            call = IMPLEMENTATIONS["reference"](case, q, k, v, None)
            _reference_outputs[case.name] = call()
        return _reference_outputs[case.name]
    return get
