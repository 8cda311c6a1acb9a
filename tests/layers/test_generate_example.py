"""examples/generate.py: greedy generation with a KVCache per layer gives the
same tokens as recomputing attention over the whole prefix, and reports the
speed of both."""
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "generate.py"


@pytest.fixture(scope="module")
def example():
    # examples/ is not a package: load the script by path.
    spec = importlib.util.spec_from_file_location("generate_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cached_and_recomputed_generation_agree(example, capsys):
    results = example.main(["--prompt", "40", "--new", "6", "--layers", "2"])
    printed = capsys.readouterr().out
    assert len(results) == 2
    cached, recomputed = results.values()
    assert len(cached) == 6 and all(isinstance(t, int) for t in cached)
    assert cached == recomputed
    assert "same tokens: True" in printed
    speeds = re.findall(r"^(KVCache \+ decode_attention|recompute the whole prefix)\s+"
                        r"([0-9.]+) tokens/s", printed, flags=re.M)
    assert [name for name, _ in speeds] == ["KVCache + decode_attention",
                                            "recompute the whole prefix"]
    assert all(float(rate) > 0 for _, rate in speeds)


def test_cache_prefill_then_steps_matches_the_full_forward(example):
    """The layer-by-layer contract the example relies on: the logits after a
    cached prefill and cached steps equal a forward pass over the whole text."""
    model = example.ToyDecoder(layers=2, seed=3)
    tokens = np.random.default_rng(4).integers(0, 1000, 30)
    caches = model.new_caches()
    model.forward(tokens[:27], caches)
    for t in range(27, 30):
        logits = model.forward(tokens[t:t + 1], caches)
    assert [c.lengths.tolist() for c in caches] == [[30], [30]]
    np.testing.assert_allclose(logits, model.forward(tokens), rtol=2e-4, atol=2e-4)


def test_kv_dtype_agreement_counts_the_steps_that_match(example, capsys):
    """--kv-dtype counts teacher-forced steps whose greedy token equals the
    float32 run's: all of them for a float32 cache, not the first once the
    first token is changed.  The toy's tokens vary, so the count measures
    something (a model that repeats one token agrees trivially)."""
    model = example.ToyDecoder(layers=2)
    prompt = np.random.default_rng(1).integers(0, 1000, 40)
    tokens = example.generate_cached(model, prompt, 8)
    assert len(set(tokens)) >= 4
    assert example.agreement(model, prompt, tokens, "float32") == 8
    changed = [(tokens[0] + 1) % 1000] + tokens[1:]
    assert example.agreement(model, prompt, changed, "float32") <= 7
    example.main(["--prompt", "40", "--new", "8", "--layers", "2", "--kv-dtype", "int8"])
    n = int(re.search(r"^int8 cache: (\d+) of 8 greedy tokens", capsys.readouterr().out,
                      flags=re.M).group(1))
    assert n == example.agreement(model, prompt, tokens, "int8")
