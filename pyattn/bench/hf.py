"""Whole-model benchmark: HuggingFace transformers models with
``attn_implementation="pyattn"`` against ``"sdpa"`` (torch's
scaled_dot_product_attention), on the same weights and inputs.

    python -m pyattn.bench --suite hf [--threads N] [--json out.json]

The models are built from configs with seeded random weights (no download;
speed does not depend on the weights' values): a MiniLM-shaped encoder
(all-MiniLM-L6-v2's sizes) on B32 x 128 tokens, a small Llama-shaped decoder
(grouped-query heads) on a B4 x 512 prefill, and the same decoder's greedy
``generate()`` with its KV cache.  Both backends run in one process, timed
interleaved by pyattn.bench.timing (strict alternation: every call is tens of
milliseconds or more), torch and pyattn at the same thread count.  The
outputs are compared outside the timing: hidden states or logits within
float32 rounding, generated tokens identical.
"""
import numpy as np

from pyattn.bench.timing import summarize, time_calls

VOCAB = 32000
MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
              intermediate_size=1536, max_position_embeddings=512)
# Llama-shaped, small enough for a benchmark on 2 cores: 8 query heads
# sharing 2 key/value heads, head size 64
LLAMA = dict(vocab_size=VOCAB, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, intermediate_size=1408, max_position_embeddings=2048)
# name: (model kind, batch, prompt tokens, new tokens (0: one forward))
MODEL_CASES = {
    "minilm-b32x128": ("bert", 32, 128, 0),
    "llama-b4x512": ("llama", 4, 512, 0),
    "llama-generate": ("llama", 1, 128, 64),
}
BACKENDS = ("pyattn", "sdpa")


def _models(kind, torch, transformers):
    """{backend: model}, the same seeded weights under each backend."""
    config = (transformers.BertConfig(**MINILM) if kind == "bert"
              else transformers.LlamaConfig(**LLAMA))
    auto = transformers.AutoModel if kind == "bert" else transformers.AutoModelForCausalLM
    models = {}
    for backend in BACKENDS:
        torch.manual_seed(0)
        models[backend] = auto.from_config(config, attn_implementation=backend).eval()
    return models


def _calls(case, models, torch):
    """({backend: zero-argument call}, how to compare two results)."""
    kind, batch, tokens, new = MODEL_CASES[case]
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, models["sdpa"].config.vocab_size, (batch, tokens),
                        generator=generator)
    mask = torch.ones_like(ids)

    def call(model):
        with torch.inference_mode():
            if new:
                return model.generate(ids, attention_mask=mask, max_new_tokens=new,
                                      min_new_tokens=new, do_sample=False, num_beams=1)
            out = model(input_ids=ids, attention_mask=mask, use_cache=False)
            return out.last_hidden_state if kind == "bert" else out.logits

    def same(a, b):
        if new:
            return bool(torch.equal(a, b))
        return bool(np.allclose(a.numpy(), b.numpy(), rtol=1e-3, atol=1e-4))

    return {backend: (lambda m=models[backend]: call(m)) for backend in BACKENDS}, same


def run_hf(threads):
    """Time every model case; a list of records, or a string saying why not."""
    try:
        import torch
        import transformers
    except ImportError as exc:
        return f"--suite hf needs torch and transformers ({exc.name} is not installed)"
    from pyattn.integrations.transformers import register

    register()
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    records, built = [], {}
    for case, (kind, batch, tokens, new) in MODEL_CASES.items():
        models = built.setdefault(kind, _models(kind, torch, transformers))
        calls, same = _calls(case, models, torch)
        timed = time_calls(calls)
        results = timed.results
        records.append({
            "name": case, "batch": batch, "tokens": tokens, "new_tokens": new,
            "threads": threads, "torch": torch.__version__,
            "transformers": transformers.__version__,
            "matches": same(results["pyattn"], results["sdpa"]),
            "impls": {b: summarize(timed.times[b]) for b in BACKENDS},
        })
    return records


def format_hf(records):
    if isinstance(records, str):
        return records
    first = records[0]
    lines = [f"HuggingFace models, attn_implementation pyattn vs sdpa (float32, "
             f"{first['threads']} threads, interleaved; torch {first['torch']}, "
             f"transformers {first['transformers']})",
             f"{'case':<16} {'B':>3} {'tokens':>6} {'new':>4}  {'pyattn ms':>10}  "
             f"{'sdpa ms':>10}  {'speed-up':>8}  check"]
    for r in records:
        mine, theirs = (r["impls"][b]["median_ms"] for b in BACKENDS)
        check = "ok" if r["matches"] else "DIFFERS"
        lines.append(f"{r['name']:<16} {r['batch']:>3} {r['tokens']:>6} {r['new_tokens']:>4}  "
                     f"{mine:>10.1f}  {theirs:>10.1f}  {theirs / mine:>7.2f}x  {check}")
    lines.append("speed-up: sdpa's median time / pyattn's (above 1: pyattn is faster); "
                 "check: hidden states or logits within float32 rounding, "
                 "generated tokens identical")
    return "\n".join(lines)
