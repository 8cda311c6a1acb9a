"""pyattn.torch.scaled_dot_product_attention against torch's, over a random
sweep of shapes, masks, dtypes and strides; tensors read in place (bfloat16
included: data pointers and memory); out=, return_lse, num_threads from
torch; the errors; and `import pyattn` without torch."""
import tracemalloc

import numpy as np
import pytest
from support import bfloat16

import pyattn
from pyattn import functional

torch = pytest.importorskip("torch", reason="pyattn.torch needs torch")
import pyattn.torch as pt  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# |pyattn - torch in float64| <= TOL * max(1, max |expected|), per input dtype
TOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
N_CASES = 64
needs_bf16 = pytest.mark.skipif(bfloat16 is None, reason="bfloat16 tensors need ml_dtypes")


def layout(rng, shape, dtype, kind):
    """A tensor of `shape` stored as `kind`: contiguous; "transposed" (the
    (B, L, H, E) projection layout seen as (B, H, L, E)); "strided" (every
    other element of a wider row); "expanded" (one batch item broadcast)."""
    def randn(s):
        return torch.from_numpy(rng.standard_normal(s)).to(dtype)
    if kind == "transposed" and len(shape) >= 3:
        return randn(shape[:-3] + (shape[-2], shape[-3], shape[-1])).transpose(-3, -2)
    if kind == "strided":
        return randn(shape[:-1] + (2 * shape[-1],))[..., ::2]
    if kind == "expanded" and len(shape) >= 3:
        return randn((1,) + shape[1:]).expand(shape)
    return randn(shape)


def draw_case(seed):
    """Keyword arguments of one random call; features cycle with the seed so
    that every dtype, mask kind and layout comes up."""
    rng = np.random.default_rng(seed)
    dtype = DTYPES[seed % len(DTYPES)]
    batch = tuple(int(b) for b in rng.integers(1, 4, size=seed % 3))
    hkv = int(rng.integers(1, 3))
    hq = hkv * int(rng.choice([1, 1, 2, 3]))
    L, S = (int(n) for n in rng.integers(1, 40, size=2))
    E, Ev = int(rng.choice([4, 8, 16, 33])), int(rng.choice([4, 8, 16, 20]))
    kinds = ["contiguous", "transposed", "strided", "expanded"]
    q = layout(rng, batch + (hq, L, E), dtype, kinds[seed % 4])
    k = layout(rng, batch + (hkv, S, E), dtype, kinds[(seed // 4) % 4])
    v = layout(rng, batch + (hkv, S, Ev), dtype, kinds[(seed // 16) % 4])
    call = dict(query=q, key=k, value=v, enable_gqa=hq != hkv,
                is_causal=bool(rng.random() < 0.4),
                scale=float(rng.uniform(0.05, 1)) if rng.random() < 0.5 else None)
    mask_kind = ["none", "bool", "float", "bool_heads"][(seed // 3) % 4]
    if mask_kind != "none":
        shape = batch[-1:] + (hq, L, S) if mask_kind == "bool_heads" else (L, S)
        keep = torch.from_numpy(rng.random(shape) < 0.7)
        keep[..., 0] = True  # no row without a key: torch's math kernel gives NaN there
        if mask_kind == "float":
            bias = torch.from_numpy(rng.standard_normal(shape)).to(dtype)
            call["attn_mask"] = bias.masked_fill(~keep, float("-inf"))
        else:
            call["attn_mask"] = keep
    return call


def torch_sdpa_float64(query, key, value, attn_mask=None, is_causal=False, **kw):
    """torch's SDPA on float64 copies: the exact answer for the same inputs.
    A mask with is_causal is folded into one mask (torch's float64 kernel
    refuses both; its float32 kernel combines them, as pyattn does)."""
    if attn_mask is not None and is_causal:
        causal = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool).tril()
        attn_mask = (attn_mask & causal if attn_mask.dtype == torch.bool
                     else attn_mask.masked_fill(~causal, float("-inf")))
        is_causal = False
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.double()
    return torch.nn.functional.scaled_dot_product_attention(
        query.double(), key.double(), value.double(), attn_mask=attn_mask,
        is_causal=is_causal, **kw)


def assert_close(got, want, dtype):
    assert got.dtype == dtype and got.shape == want.shape
    tol = TOL[dtype] * max(1.0, want.abs().max().item())
    assert (got.double() - want).abs().max().item() <= tol


@pytest.mark.parametrize("seed", range(N_CASES))
def test_matches_torch_sdpa(seed):
    call = draw_case(seed)
    if call["query"].dtype == torch.bfloat16 and bfloat16 is None:
        pytest.skip("bfloat16 tensors need ml_dtypes")
    got = pt.scaled_dot_product_attention(**call)
    assert_close(got, torch_sdpa_float64(**call), call["query"].dtype)


def test_sweep_covers_every_feature():
    cases = [draw_case(seed) for seed in range(N_CASES)]
    assert {c["query"].dtype for c in cases} == set(DTYPES)
    assert {c["query"].ndim for c in cases} == {3, 4, 5}
    assert any(c["enable_gqa"] for c in cases) and any(c["is_causal"] for c in cases)
    masks = [c.get("attn_mask") for c in cases]
    assert any(m is None for m in masks)
    assert any(m is not None and m.dtype == torch.bool and m.ndim == 2 for m in masks)
    assert any(m is not None and m.dtype == torch.bool and m.ndim > 2 for m in masks)
    assert any(m is not None and m.is_floating_point() for m in masks)
    assert any(not c["query"].is_contiguous() for c in cases)
    assert any(0 in c["key"].stride() for c in cases)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_options_out_and_lse(dtype):
    if dtype == torch.bfloat16 and bfloat16 is None:
        pytest.skip("bfloat16 tensors need ml_dtypes")
    rng = np.random.default_rng(1)
    q, k, v = (layout(rng, (2, 4, 9, 8), dtype, "transposed") for _ in range(3))
    sinks = torch.linspace(-1, 1, 4, dtype=dtype)  # a tensor, bfloat16 included
    kv_lengths = torch.tensor([9, 5])
    buf = torch.empty(2, 9, 4, 8, dtype=dtype)  # written through a (B, H, L, E) view
    out, lse = pt.scaled_dot_product_attention(
        q, k, v, is_causal=True, out=buf.transpose(1, 2), window=(3, 0), softcap=2.0,
        sinks=sinks, kv_lengths=kv_lengths, alignment="lower_right", return_lse=True)
    assert out.data_ptr() == buf.data_ptr() and lse.shape == (2, 4, 9)
    as_np = {name: pt._as_array(t, name) for name, t in
             (("query", q), ("key", k), ("value", v))}
    as_np["sinks"] = sinks.double().numpy()  # widened exactly, bfloat16 included
    want, want_lse = pyattn.scaled_dot_product_attention(
        **as_np, is_causal=True, window=(3, 0), softcap=2.0, kv_lengths=[9, 5],
        alignment="lower_right", return_lse=True)
    np.testing.assert_array_equal(pt._as_array(out, "out"), want)
    np.testing.assert_array_equal(lse.numpy(), want_lse)


@needs_bf16
def test_bfloat16_tensors_are_read_in_place(monkeypatch):
    """The arrays pyattn gets share the tensors' memory, and the call
    allocates (NumPy memory, which tracemalloc sees) only the result."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(1, 256, 8, 3 * 64, generator=g).to(torch.bfloat16)  # fused QKV, (B, L, H, 3E)
    q, k, v = (big[..., i * 64:(i + 1) * 64].transpose(1, 2) for i in range(3))
    mask = torch.rand(256, 256, generator=g) > 0.2
    seen = {}
    real = functional.scaled_dot_product_attention

    def spy(**arrays):
        seen.update(arrays)
        return real(**arrays)

    monkeypatch.setattr(functional, "scaled_dot_product_attention", spy)
    pt.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # warm-up: first-call allocations
    tracemalloc.start()
    try:
        out = pt.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    for name, tensor in (("query", q), ("key", k), ("value", v), ("attn_mask", mask)):
        array = seen[name]
        assert array.ctypes.data == tensor.data_ptr(), name
        assert array.strides == tuple(s * tensor.element_size() for s in tensor.stride()), name
    assert seen["query"].dtype == bfloat16
    out_bytes = out.numel() * out.element_size()
    assert peak < out_bytes + q.numel() * q.element_size() // 2  # less than any input's copy


def test_lazily_negated_views_read_their_values():
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    got = pt.scaled_dot_product_attention(q, torch._neg_view(k), v)
    assert_close(got, torch_sdpa_float64(q, -k, v), torch.float32)


def test_a_lazily_negated_or_conjugated_out_is_refused():
    """Resolving it would fill a copy and leave `out` as it was: refused."""
    q = torch.randn(1, 2, 4, 8)
    out = torch._neg_view(torch.zeros(1, 2, 4, 8))
    with pytest.raises(ValueError, match="^out is a lazily negated or conjugated view"):
        pt.scaled_dot_product_attention(q, q, q, out=out)
    assert not out.any()
    with pytest.raises(ValueError, match="^out is a lazily negated or conjugated view"):
        conj = torch.zeros(1, 2, 4, 8, dtype=torch.complex64).conj()
        pt.scaled_dot_product_attention(q, q, q, out=conj)


def test_a_conjugated_complex_input_is_refused_by_its_dtype():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(TypeError, match="^query has dtype complex64"):
        pt.scaled_dot_product_attention(torch.complex(q, q).conj(), q, q)


def test_num_threads_follows_torch(monkeypatch):
    calls = []
    real = functional.scaled_dot_product_attention
    monkeypatch.setattr(functional, "scaled_dot_product_attention",
                        lambda **kw: calls.append(kw["num_threads"]) or real(**kw))
    q = torch.randn(1, 2, 4, 8)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        pt.scaled_dot_product_attention(q, q, q)
        pt.scaled_dot_product_attention(q, q, q, num_threads=2)
    finally:
        torch.set_num_threads(saved)
    assert calls == [1, 2]


def test_inference_mode_and_no_grad():
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    with torch.no_grad():
        pt.scaled_dot_product_attention(q, q, q)
    with torch.inference_mode():
        x = torch.randn(1, 2, 4, 8)
        assert pt.scaled_dot_product_attention(x, x, x).is_inference()


@pytest.mark.parametrize("case, error, match", [
    ("dropout", ValueError, r"dropout_p must be 0.*0\.1"),
    ("meta", ValueError, r"key is on the meta device"),
    ("sparse", ValueError, r"attn_mask is a torch.sparse_coo tensor"),
    ("grad", ValueError, r"query requires grad.*torch.no_grad"),
    ("grad_sinks", ValueError, r"sinks requires grad"),
    ("int", TypeError, r"query"),
    ("dtype", TypeError, r"query has dtype torch.float8_e4m3fn"),
    ("out_array", TypeError, r"out must be a torch tensor"),
    ("out_shape", ValueError, r"out"),
])
def test_errors(case, error, match):
    q = torch.randn(1, 2, 4, 8)
    call = dict(query=q, key=q, value=q)
    if case == "dropout":
        call["dropout_p"] = 0.1
    elif case == "meta":
        call["key"] = q.to("meta")
    elif case == "sparse":
        call["attn_mask"] = torch.ones(4, 4).to_sparse()
    elif case == "grad":
        call["query"] = q.clone().requires_grad_()
    elif case == "grad_sinks":
        call["sinks"] = torch.zeros(2, requires_grad=True)
    elif case == "int":
        call["query"] = q.to(torch.int32)
    elif case == "dtype":
        call["query"] = q.to(torch.float8_e4m3fn)
    elif case == "out_array":
        call["out"] = np.empty((1, 2, 4, 8), np.float32)
    elif case == "out_shape":
        call["out"] = torch.empty(1, 2, 4, 7)
    with pytest.raises(error, match=match):
        pt.scaled_dot_product_attention(**call)


def test_import_pyattn_does_not_import_torch(helpers, tmp_path):
    helpers.run_python("import sys, pyattn, pyattn.integrations\n"
                       "assert 'torch' not in sys.modules, 'pyattn imported torch'", cwd=tmp_path)
