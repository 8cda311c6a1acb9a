"""A toy autoregressive decoder with random weights: greedy generation with a
pyattn.KVCache per layer, against recomputing attention over the whole
prefix at every step.  Both give the same tokens; the cache is faster, and
more so the longer the text.

    pip install .
    python examples/generate.py [--prompt 512] [--new 64] [--layers 4] [--kv-dtype int8]

With --kv-dtype int8 (or float8_e4m3fn, with ml_dtypes) it also decodes
with quantized caches, fed the float32 run's tokens, and counts the steps
whose greedy token is the same as float32's.

The model is a small pre-norm transformer decoder (random weights, so the
tokens mean nothing): token embedding, then per layer grouped-query attention
(8 query heads on 2 key/value heads) and a ReLU MLP, then an output layer.
"""
import argparse
import time

import numpy as np

import pyattn


class ToyDecoder:
    def __init__(self, vocab=1000, dim=256, layers=4, heads=8, kv_heads=2, seed=0):
        rng = np.random.default_rng(seed)
        self.dim, self.heads, self.kv_heads, self.head_dim = dim, heads, kv_heads, dim // heads
        init = lambda *shape: (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)  # noqa: E731
        self.embed = init(vocab, dim) * np.float32(np.sqrt(vocab))
        kv = kv_heads * self.head_dim
        # an output layer of its own: with the embedding's transpose, the
        # token's own embedding dominates and the model repeats its input
        self.head = init(dim, vocab)
        # queries 6x larger: peaked attention, as in a trained model (with
        # unit-scale scores it is near uniform and the model repeats a token)
        self.layers = [dict(wq=6 * init(dim, dim), wk=init(dim, kv), wv=init(dim, kv),
                            wo=init(dim, dim), w1=init(dim, 4 * dim), w2=init(4 * dim, dim))
                       for _ in range(layers)]

    def _heads(self, x, n):  # (T, n * head_dim) -> (1, n, T, head_dim)
        return x.reshape(x.shape[0], n, self.head_dim).transpose(1, 0, 2)[np.newaxis]

    @staticmethod
    def _norm(x):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)

    def forward(self, tokens, caches=None):
        """Logits of the last position.  With caches (one KVCache per layer),
        `tokens` are the new ones and the caches hold everything before them;
        without, `tokens` is the whole prefix and attention is recomputed."""
        x = self.embed[tokens]
        for i, p in enumerate(self.layers):
            h = self._norm(x)
            q = self._heads(h @ p["wq"], self.heads)
            k, v = self._heads(h @ p["wk"], self.kv_heads), self._heads(h @ p["wv"], self.kv_heads)
            if caches is None:
                att = pyattn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                caches[i].append(k, v)
                att = pyattn.decode_attention(q, caches[i])
            x = x + att[0].transpose(1, 0, 2).reshape(len(tokens), self.dim) @ p["wo"]
            x = x + np.maximum(self._norm(x) @ p["w1"], 0) @ p["w2"]
        return self._norm(x[-1]) @ self.head

    def new_caches(self, dtype="float32"):
        return [pyattn.KVCache(1, self.kv_heads, self.head_dim, dtype=dtype) for _ in self.layers]


def generate_cached(model, prompt, n_new):
    caches = model.new_caches()
    logits = model.forward(prompt, caches)  # prefill: the prompt in one call
    out = []
    for _ in range(n_new):
        out.append(int(np.argmax(logits)))
        logits = model.forward(np.array(out[-1:]), caches)
    return out


def agreement(model, prompt, tokens, dtype):
    """Steps at which caches of `dtype`, fed the same tokens, pick the same
    greedy token as `tokens` (a float32 run's): teacher-forced, so one
    disagreement does not make every later step differ."""
    caches = model.new_caches(dtype)
    logits = model.forward(prompt, caches)
    same = 0
    for token in tokens:
        same += int(np.argmax(logits)) == token
        logits = model.forward(np.array([token]), caches)
    return same


def generate_recomputed(model, prompt, n_new):
    tokens = list(prompt)
    for _ in range(n_new):
        tokens.append(int(np.argmax(model.forward(np.array(tokens)))))
    return tokens[len(prompt):]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=512, help="prompt length (tokens)")
    parser.add_argument("--new", type=int, default=64, help="tokens to generate")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--kv-dtype", choices=["int8", "float8_e4m3fn"],
                        help="also count the greedy tokens a quantized cache shares with float32")
    args = parser.parse_args(argv)
    model = ToyDecoder(layers=args.layers)
    prompt = np.random.default_rng(1).integers(0, 1000, args.prompt)
    results = {}
    for name, generate in [("KVCache + decode_attention", generate_cached),
                           ("recompute the whole prefix", generate_recomputed)]:
        t0 = time.perf_counter()
        tokens = generate(model, prompt, args.new)
        seconds = time.perf_counter() - t0
        results[name] = tokens
        print(f"{name:<28} {args.new / seconds:8.1f} tokens/s  "
              f"({seconds:.2f} s for {args.new} tokens after a {args.prompt}-token prompt)")
    same = len(set(map(tuple, results.values()))) == 1
    print("same tokens:", same)
    if args.kv_dtype:
        n = agreement(model, prompt, results["KVCache + decode_attention"], args.kv_dtype)
        print(f"{args.kv_dtype} cache: {n} of {args.new} greedy tokens equal float32's "
              f"({100 * n / args.new:.1f} %)")
    return results


if __name__ == "__main__":
    main()
