"""The benchmark's problems: :class:`Case`, the named ``CASES``, the
``SUITES`` that group them, and how close a result must be to the reference."""
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Case:
    """One attention problem: q (B, H, L, D), k and v (B, H, S, D)."""

    name: str
    B: int
    H: int
    L: int
    S: int
    D: int
    dtype: str = "float32"
    causal: bool = False
    kv_heads: int = 0      # key/value heads (GQA) when not H
    window: int = 0        # > 0: with causal, each query sees its last window + 1 keys
    cache: bool = False    # pyattn reads k, v from a KVCache through decode_attention
    alignment: str = "top_left"  # of the causal mask: "lower_right" = the last query sees all
    precision: str = None  # pyattn's precision= (None: its default for the dtype)
    with_f32: bool = False  # also time pyattn on the inputs as float32, exact ("pyattn-f32")

    @property
    def Hkv(self):
        return self.kv_heads or self.H

    @property
    def lower_right(self):
        """Causal with the mask's corner at the last query and the last key,
        as new queries against a cache see it (every cache case is)."""
        return self.cache or (self.causal and self.alignment == "lower_right")

    @property
    def mask(self):
        """The mask, as the tables print it after the dtype ('' for none)."""
        if not self.causal:
            return ""
        return "causal lower-right" if self.lower_right else "causal"

    @property
    def bf16_products(self):
        """Whether pyattn is asked for bfloat16 products (run where the CPU has
        them): precision="bf16", or bfloat16 inputs unless precision="exact"."""
        return self.precision == "bf16" or (self.dtype == "bfloat16" and self.precision != "exact")

    @property
    def check_dtype(self):
        """The dtype whose tolerance pyattn's and the peers' results are checked
        with: bfloat16's for bfloat16 products of float32 inputs."""
        return "bfloat16" if self.precision == "bf16" else self.dtype

    @property
    def shape(self):
        heads = f"{self.H}/{self.Hkv}" if self.Hkv != self.H else f"{self.H}"
        return f"{self.B} {heads} {self.L} {self.S} {self.D}"

    @property
    def sdpa_kwargs(self):
        """The case's options as scaled_dot_product_attention keywords; a
        cache case is the same call aligned lower-right, as decode_attention."""
        kw = {"is_causal": self.causal}
        if self.Hkv != self.H:
            kw["enable_gqa"] = True
        if self.window:
            kw["window"] = (self.window, 0)
        if self.lower_right:
            kw.update(is_causal=True, alignment="lower_right")
        return kw

    @property
    def unmasked_pairs(self):
        """(query, key) pairs that take part: L*S; for is_causal (torch's
        top-left aligned lower triangle) the sum over rows i of min(i + 1, S),
        and with a window of min(i + 1, S, window + 1); lower-right (L <= S),
        L*S less the L*(L-1)/2 keys after each query."""
        L, S = self.L, self.S
        if self.lower_right:
            return L * S - L * (L - 1) // 2
        if not self.causal:
            return L * S
        reach = S if not self.window else min(S, self.window + 1)
        full_rows = max(0, L - reach)  # rows that see `reach` keys (when L <= S)
        if L <= S:
            ramp = min(L, reach)
            return ramp * (ramp + 1) // 2 + full_rows * reach
        return S * (S + 1) // 2 + (L - S) * S

    @property
    def flops(self):
        """4*D per (query, key) pair: 2*D for q.k and 2*D for p*v."""
        return 4 * self.B * self.H * self.D * self.unmasked_pairs

    @property
    def np_dtype(self):
        if self.dtype == "bfloat16":
            from ml_dtypes import bfloat16
            return np.dtype(bfloat16)
        return np.dtype(self.dtype)

    @property
    def nbytes(self):
        """Bytes of q, k, v and out, each read or written once."""
        itemsize = self.np_dtype.itemsize
        return itemsize * self.B * self.D * (2 * self.H * self.L + 2 * self.Hkv * self.S)

    def make_inputs(self, seed=0):
        rng = np.random.default_rng(seed)
        q = rng.standard_normal((self.B, self.H, self.L, self.D), dtype=np.float32)
        k = rng.standard_normal((self.B, self.Hkv, self.S, self.D), dtype=np.float32)
        v = rng.standard_normal((self.B, self.Hkv, self.S, self.D), dtype=np.float32)
        dtype = self.np_dtype
        if dtype == np.float64:
            q, k, v = (rng.standard_normal(x.shape) for x in (q, k, v))
        return tuple(x.astype(dtype, copy=False) for x in (q, k, v))


CASES = {
    c.name: c
    for c in [
        # the quick suite (the default run), in the order it is printed
        Case("prefill", B=1, H=8, L=2048, S=2048, D=64),
        Case("bert", B=8, H=12, L=128, S=128, D=64),
        Case("causal", B=1, H=8, L=2048, S=2048, D=64, causal=True),
        Case("decode", B=1, H=32, L=1, S=4096, D=128),
        Case("prefill-f64", B=1, H=8, L=1024, S=1024, D=64, dtype="float64"),
        # the rest of the full suite: the prefill sweep over L = S and D, and ViT-B/16
        Case("prefill-512-d64", B=1, H=8, L=512, S=512, D=64),
        Case("prefill-1k-d64", B=1, H=8, L=1024, S=1024, D=64),
        Case("prefill-4k-d64", B=1, H=8, L=4096, S=4096, D=64),
        Case("prefill-1k-d128", B=1, H=8, L=1024, S=1024, D=128),
        Case("prefill-2k-d128", B=1, H=8, L=2048, S=2048, D=128),
        Case("prefill-4k-d128", B=1, H=8, L=4096, S=4096, D=128),
        Case("vit", B=4, H=12, L=197, S=197, D=64),
        # the inference suite: decoding from a KVCache, GQA, half storage, windows
        Case("decode-cache", B=1, H=32, L=1, S=4096, D=128, cache=True),
        Case("decode-cache-f16", B=1, H=32, L=1, S=4096, D=128, cache=True, dtype="float16"),
        Case("decode-cache-bf16", B=1, H=32, L=1, S=4096, D=128, cache=True, dtype="bfloat16"),
        Case("decode-gqa-8k", B=1, H=32, kv_heads=8, L=1, S=8192, D=128, cache=True),
        Case("decode-mha8-8k", B=1, H=8, L=1, S=8192, D=128, cache=True),
        Case("causal-16k", B=1, H=8, L=16384, S=16384, D=64, causal=True),
        Case("window256-16k", B=1, H=8, L=16384, S=16384, D=64, causal=True, window=256),
        # the latency suite: the per-token calls of inference pipelines, on plain
        # arrays, where the call's fixed cost is a large part of its time
        Case("trivial", B=1, H=1, L=1, S=1, D=64),
        Case("decode-h8-s64", B=1, H=8, L=1, S=64, D=64),
        Case("decode-gqa-b4", B=4, H=8, kv_heads=2, L=1, S=232, D=64),
        Case("decode-gqa-s1024", B=1, H=32, kv_heads=8, L=1, S=1024, D=128),
        Case("decode-b8-s512", B=8, H=12, L=1, S=512, D=64),
        Case("decode-h32-s4096", B=1, H=32, L=1, S=4096, D=128),  # 7B-class model, 4k context
        # speculative decoding's verify step: 4 draft tokens against the cache
        Case("verify-gqa-l4", B=1, H=32, kv_heads=8, L=4, S=2048, D=128, causal=True,
             alignment="lower_right"),
        Case("chunked-prefill", B=1, H=16, L=16, S=512, D=64, causal=True,
             alignment="lower_right"),
        Case("prefill-l64", B=1, H=12, L=64, S=64, D=64, causal=True),
        Case("minilm-l32", B=1, H=12, L=32, S=32, D=32),  # all-MiniLM-L6's encoder, one sentence
        # the bf16 suite: bfloat16 products, timed interleaved with pyattn's own
        # float32 (pyattn-f32) and the peers' bfloat16; first bfloat16 inputs ...
        Case("prefill-bf16", B=1, H=8, L=2048, S=2048, D=64, dtype="bfloat16", with_f32=True),
        Case("causal-bf16", B=1, H=8, L=2048, S=2048, D=64, dtype="bfloat16", causal=True,
             with_f32=True),
        Case("prefill-4k-d64-bf16", B=1, H=8, L=4096, S=4096, D=64, dtype="bfloat16",
             with_f32=True),
        Case("prefill-4k-d128-bf16", B=1, H=8, L=4096, S=4096, D=128, dtype="bfloat16",
             with_f32=True),
        Case("bert-bf16", B=8, H=12, L=128, S=128, D=64, dtype="bfloat16", with_f32=True),
        Case("vit-bf16", B=4, H=12, L=197, S=197, D=64, dtype="bfloat16", with_f32=True),
        # ... then float32 inputs with precision="bf16" (the output stays float32)
        Case("prefill-f32-bf16", B=1, H=8, L=2048, S=2048, D=64, precision="bf16",
             with_f32=True),
        Case("causal-f32-bf16", B=1, H=8, L=2048, S=2048, D=64, causal=True, precision="bf16",
             with_f32=True),
        Case("prefill-4k-d64-f32-bf16", B=1, H=8, L=4096, S=4096, D=64, precision="bf16",
             with_f32=True),
        Case("prefill-4k-d128-f32-bf16", B=1, H=8, L=4096, S=4096, D=128, precision="bf16",
             with_f32=True),
    ]
}

SUITES = {
    "quick": ("prefill", "bert", "causal", "decode", "prefill-f64"),
    "full": ("prefill-512-d64", "prefill-1k-d64", "prefill", "prefill-4k-d64",
             "prefill-1k-d128", "prefill-2k-d128", "prefill-4k-d128",
             "causal", "bert", "vit", "decode", "prefill-f64"),
    "inference": ("decode-cache", "decode-cache-f16", "decode-cache-bf16", "decode-gqa-8k",
                  "decode-mha8-8k", "causal-16k", "window256-16k"),
    "latency": ("trivial", "decode-h8-s64", "decode-gqa-b4", "decode-gqa-s1024",
                "decode-b8-s512", "decode-h32-s4096", "verify-gqa-l4", "chunked-prefill",
                "prefill-l64", "minilm-l32"),
    "bf16": ("prefill-bf16", "causal-bf16", "prefill-4k-d64-bf16", "prefill-4k-d128-bf16",
             "bert-bf16", "vit-bf16", "prefill-f32-bf16", "causal-f32-bf16",
             "prefill-4k-d64-f32-bf16", "prefill-4k-d128-f32-bf16"),
}
DEFAULT_SUITE = "quick"
# these cases are timed interleaved and reported in µs with their spread
# (measure.run_case, report.format_latency), wherever they are named
LATENCY_CASES = frozenset(SUITES["latency"])
# these are timed interleaved too, in the throughput table: the bf16 suite's
# ratios (bfloat16 products over float32, pyattn over each peer) come from
# calls made side by side, not minutes apart
INTERLEAVED_CASES = LATENCY_CASES | frozenset(SUITES["bf16"])

# --plot: throughput against L = S for these (B1 H8 D64 float32, not causal)
PLOT_SWEEP = ("prefill-512-d64", "prefill-1k-d64", "prefill", "prefill-4k-d64")

# the --memory case: the reference would need B*H*L*S*4 bytes for its scores
MEMORY_CASE = Case("memory", B=1, H=8, L=16384, S=16384, D=64)

# how close pyattn must be to the reference (np.allclose), by Case.check_dtype
# (bfloat16 also for float32 inputs with bfloat16 products)
TOLERANCE = {"float32": dict(rtol=1e-4, atol=1e-5), "float64": dict(rtol=1e-9, atol=1e-11),
             # one rounding of the output apart (both compute in float32)
             "float16": dict(rtol=2e-3, atol=2e-3), "bfloat16": dict(rtol=1.6e-2, atol=1.6e-2)}

# how close a peer must be to the reference: looser than for pyattn (other
# summation orders), still far below what a wrong layout, scale or mask gives
PEER_TOLERANCE = {"float32": dict(rtol=1e-3, atol=1e-4), "float64": dict(rtol=1e-7, atol=1e-9),
                  "float16": dict(rtol=4e-3, atol=4e-3), "bfloat16": dict(rtol=3.2e-2, atol=3.2e-2)}
