"""The quantized KV caches' figures for docs/kv-cache.md (issue 17): decode
time of int8 and float8_e4m3fn caches against pyattn's float32 and float16
caches and torch's float32 SDPA, timed interleaved in one run; accuracy
against float32 decode per output row on N(0,1) K/V and on the MiniLM
example's layers; the cost of appending one token.

    PYTHONPATH=. python tools/quantized_kv_figures.py [--threads 2] [--reps 40]
"""
import argparse
import concurrent.futures
import importlib.util
import os
import time
import types

import numpy as np

import pyattn

QUANTIZED = ("int8", "float8_e4m3fn")


def interleaved(calls, reps):
    """Median ms of each call, timed in turn (one of each per round)."""
    times = {name: [] for name in calls}
    for fn in calls.values():
        fn()
    for _ in range(reps):
        for name, fn in calls.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def caches(k, v):
    out = {}
    for dtype in ("float32", "float16") + QUANTIZED:
        c = pyattn.KVCache(k.shape[0], k.shape[1], k.shape[3], dtype=dtype)
        c.append(k, v)
        out[dtype] = c
    return out


def stream_read(arrays, threads, pool):
    """Read every byte of `arrays` once on `threads` threads (an OR over
    uint64 words: NumPy's reduction releases the GIL and costs nothing per
    word), the bound a decode of those bytes is held to."""
    words = [a.reshape(-1).view(np.uint64) for a in arrays]
    parts = [w[i * w.size // threads:(i + 1) * w.size // threads]
             for w in words for i in range(threads)]
    list(pool.map(np.bitwise_or.reduce, parts))


def decode_times(H, Hkv, S, threads, reps, rng):
    import torch

    torch.set_num_threads(threads)
    D = 128
    q = rng.standard_normal((1, H, 1, D)).astype(np.float32)
    k, v = (rng.standard_normal((1, Hkv, S, D)).astype(np.float32) for _ in range(2))
    c = caches(k, v)
    q16 = q.astype(np.float16)
    tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
    pool = concurrent.futures.ThreadPoolExecutor(threads)
    calls = {
        "stream read float32": lambda: stream_read(
            [c["float32"]._k, c["float32"]._v], threads, pool),
        "stream read float16": lambda: stream_read(
            [c["float16"]._k, c["float16"]._v], threads, pool),
        "pyattn int8": lambda: pyattn.decode_attention(q, c["int8"], num_threads=threads),
        "pyattn float8_e4m3fn": lambda: pyattn.decode_attention(q, c["float8_e4m3fn"],
                                                                num_threads=threads),
        "pyattn float16": lambda: pyattn.decode_attention(q16, c["float16"],
                                                          num_threads=threads),
        "pyattn float32": lambda: pyattn.decode_attention(q, c["float32"], num_threads=threads),
        "torch float32 SDPA": lambda: torch.nn.functional.scaled_dot_product_attention(
            tq, tk, tv, enable_gqa=H != Hkv),
    }
    with torch.inference_mode():
        return interleaved(calls, reps), c


def row_errors(q, k, v, dtype):
    """Per output row: ||o_quantized - o_f32|| / ||o_f32|| and the cosine, at
    the format's default group size."""
    o32 = pyattn.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    o8 = pyattn.scaled_dot_product_attention(q, pyattn.QuantizedKV.quantize(k, dtype=dtype),
                                             pyattn.QuantizedKV.quantize(v, dtype=dtype),
                                             enable_gqa=True)
    a, b = o8.reshape(-1, o8.shape[-1]).astype(np.float64), o32.reshape(-1, o32.shape[-1])
    rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return rel, cos


def minilm_qkv():
    """q, k, v of every layer of the MiniLM example on a long paragraph."""
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location(
        "minilm", os.path.join(here, "..", "examples", "minilm_embeddings.py"))
    minilm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(minilm)
    model = minilm.MiniLM()
    captured = []

    def capture(q, k, v, attn_mask=None):
        captured.append((q.astype(np.float32), k.astype(np.float32), v.astype(np.float32)))
        return pyattn.reference.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)

    # the example's reference branch calls minilm.reference: a stand-in that records
    minilm.reference = types.SimpleNamespace(scaled_dot_product_attention=capture)
    model.encode([" ".join(minilm.SENTENCES * 6)], attention="reference")
    return captured


def where_the_error_comes_from(layers, dtype):
    """MiniLM's worst row with only K, or only V, quantized; and with the keys'
    channels equalised (k * s, q / s: the same scores) before quantizing, s
    = 1 / max |k| per channel over the tokens, as per-channel key scales would
    do: whether a format with other scales would meet the bar."""
    def worst(quantize_k, quantize_v, equalise=False):
        rels = []
        for q, k, v in layers:
            s = 1 / np.abs(k).max(-2, keepdims=True) if equalise else np.ones_like(k[..., :1, :])
            kq = (pyattn.QuantizedKV.quantize(k * s, dtype=dtype).dequantize() / s
                  if quantize_k else k)
            vq = pyattn.QuantizedKV.quantize(v, dtype=dtype).dequantize() if quantize_v else v
            o, o_q = (pyattn.reference.scaled_dot_product_attention(
                q.astype(np.float64), a.astype(np.float64), b.astype(np.float64))
                for a, b in ((k, v), (kq, vq)))
            a, b = o_q.reshape(-1, o.shape[-1]), o.reshape(-1, o.shape[-1])
            rels.append(np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1))
        return f"{100 * np.concatenate(rels).max():.2f} %"
    return (f"max error with only K quantized {worst(True, False)}, only V {worst(False, True)}, "
            f"both with the keys' channels equalised {worst(True, True, equalise=True)}")


def summary(rel, cos):
    return f"mean {100 * rel.mean():.3f} %, max {100 * rel.max():.3f} %, min cosine {cos.min():.6f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=40)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(pyattn.config()["kernel"], "quantized K/V on", pyattn.config()["quantized_kernel"])
    for H, Hkv, S in ((32, 32, 4096), (32, 8, 8192)):
        t, c = decode_times(H, Hkv, S, args.threads, args.reps, rng)
        print(f"decode H{H}/{Hkv} S{S} D128, {args.threads} threads, median ms: "
              + ", ".join(f"{n} {ms:.2f}" for n, ms in t.items()))
        for dtype in ("float32", "float16"):
            share = t[f"stream read {dtype}"] / t[f"pyattn {dtype}"]
            print(f"  {dtype} decode at {100 * share:.0f} % of a streaming read of its bytes")
        for dtype in QUANTIZED:
            ms = t[f"pyattn {dtype}"]
            print(f"  {dtype}/float32 {ms / t['pyattn float32']:.3f}, "
                  f"{dtype}/float16 {ms / t['pyattn float16']:.3f}, "
                  f"torch/{dtype} {t['torch float32 SDPA'] / ms:.2f}x; "
                  f"cache bytes {dtype}/float32 {c[dtype].nbytes / c['float32'].nbytes:.3f}")
    # accuracy: one query row per head against N(0,1) K/V, and MiniLM's layers
    q = rng.standard_normal((1, 32, 1, 128)).astype(np.float32)
    k, v = (rng.standard_normal((1, 32, 4096, 128)).astype(np.float32) for _ in range(2))
    layers = minilm_qkv()
    for dtype in QUANTIZED:
        print(f"accuracy {dtype}, N(0,1) H32 S4096 D128:", summary(*row_errors(q, k, v, dtype)))
        rels, coss = zip(*(row_errors(*qkv, dtype) for qkv in layers))
        print(f"accuracy {dtype}, MiniLM (6 layers, 12 heads, D 32, {rels[0].size // 12} "
              "tokens, every query row):", summary(np.concatenate(rels), np.concatenate(coss)))
        print(f"  MiniLM {dtype}:", where_the_error_comes_from(layers, dtype))
    # appending one token (32 heads x 128) to a cache of 4096, against the decode step
    one_k, one_v = (rng.standard_normal((1, 32, 1, 128)).astype(np.float32) for _ in range(2))
    for dtype in QUANTIZED:
        cache = pyattn.KVCache(1, 32, 128, dtype=dtype, max_len=8192)
        cache.append(k, v)

        def append(cache=cache):
            cache.append(one_k, one_v)
            cache.truncate(4096)

        t = interleaved({"append": append,
                         "decode": lambda cache=cache: pyattn.decode_attention(
                             q, cache, num_threads=args.threads)},
                        args.reps * 5)
        print(f"append one token (32 x 128, {dtype}, incl. a truncate) "
              f"{1e3 * t['append']:.1f} us, the decode step {1e3 * t['decode']:.1f} us")


if __name__ == "__main__":
    main()
