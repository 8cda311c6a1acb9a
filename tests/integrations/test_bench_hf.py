"""python -m pyattn.bench --suite hf, on tiny models: the backends run on the
same weights and agree, and the report says so (the real sizes are a
benchmark, not a test)."""
import pytest

pytest.importorskip("torch", reason="--suite hf needs torch")
pytest.importorskip("transformers", reason="--suite hf needs transformers")
from pyattn.bench import hf  # noqa: E402
from pyattn.bench.timing import time_calls  # noqa: E402


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(hf, "MINILM", dict(hf.MINILM, hidden_size=32, num_hidden_layers=1,
                                           num_attention_heads=4, intermediate_size=64))
    monkeypatch.setattr(hf, "LLAMA", dict(hf.LLAMA, hidden_size=32, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          intermediate_size=64, vocab_size=97))
    monkeypatch.setattr(hf, "MODEL_CASES", {"bert-tiny": ("bert", 2, 16, 0),
                                            "llama-tiny": ("llama", 2, 24, 0),
                                            "llama-tiny-generate": ("llama", 1, 8, 6)})
    monkeypatch.setattr(hf, "time_calls", lambda calls: time_calls(calls, repeat=2))


def test_models_agree_and_are_reported(tiny):
    records = hf.run_hf(1)
    assert [r["name"] for r in records] == list(hf.MODEL_CASES)
    for r in records:
        assert r["matches"], r["name"]
        assert set(r["impls"]) == set(hf.BACKENDS)
        assert all(e["repeat"] == 2 and e["median_ms"] > 0 for e in r["impls"].values())
    text = hf.format_hf(records)
    assert all(name in text for name in hf.MODEL_CASES) and "DIFFERS" not in text


def test_the_comparison_sees_a_difference(tiny):
    """`same` is not always true: other weights give other logits and tokens."""
    import torch
    import transformers
    for case in ("llama-tiny", "llama-tiny-generate"):
        models = hf._models("llama", torch, transformers)
        with torch.no_grad():
            for p in models["pyattn"].parameters():
                p.add_(0.5)
        calls, same = hf._calls(case, models, torch)
        assert not same(calls["pyattn"](), calls["sdpa"]()), case
