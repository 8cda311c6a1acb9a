"""pyattn.SelfAttention and pyattn.MultiHeadAttention against NumPy oracles built
from pyattn.reference: shapes, masks, weights, dtypes, initialisation,
state_dict round trips and input errors.  NumPy only (the comparison with
torch.nn.MultiheadAttention lives in test_layers_torch.py)."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import FULL as DTYPES
from support import f32, ids, peak_traced_bytes, randn

import pyattn
from pyattn import functional
from pyattn import reference as ref


def tols(dtype):
    """(rtol, atol) for a layer in `dtype` against a float64 oracle; atol is
    scaled by the magnitude of the expected values in assert_close."""
    return (1e-10, 1e-10) if np.dtype(dtype) == np.float64 else (1e-4, 2e-5)


def close(helpers, actual, expected, dtype):
    rtol, atol = tols(dtype)
    helpers.assert_close(actual, expected, dtype=dtype, rtol=rtol, atol=atol)


def explicit_softmax(scores):
    """exp(s - max) / sum, written out; a row that is all -inf gives zeros."""
    scores = np.asarray(scores, np.float64)
    m = np.max(scores, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(scores - m)
    total = e.sum(axis=-1, keepdims=True)
    return np.where(total > 0, e / np.where(total > 0, total, 1.0), 0.0)


# --------------------------------------------------------------------------
# SelfAttention oracle
# --------------------------------------------------------------------------

def sa_params(layer):
    f = np.float64
    bias = layer.b_q is not None
    zeros = np.zeros
    return dict(
        w_q=np.asarray(layer.w_q, f), w_k=np.asarray(layer.w_k, f), w_v=np.asarray(layer.w_v, f),
        b_q=np.asarray(layer.b_q, f) if bias else zeros(layer.kdim),
        b_k=np.asarray(layer.b_k, f) if bias else zeros(layer.kdim),
        b_v=np.asarray(layer.b_v, f) if bias else zeros(layer.vdim),
    )


def sa_oracle(layer, x, attn_mask=None, is_causal=False):
    """(out, weights) in float64: x @ w + b, reference SDPA for the output and
    an explicit softmax for the weights."""
    p = sa_params(layer)
    x = np.asarray(x, np.float64)
    q = x @ p["w_q"] + p["b_q"]
    k = x @ p["w_k"] + p["b_k"]
    v = x @ p["w_v"] + p["b_v"]
    mask = None if attn_mask is None else (
        attn_mask if attn_mask.dtype == np.bool_ else np.asarray(attn_mask, np.float64))
    out = ref.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    scores = (q @ np.swapaxes(k, -1, -2)) / np.sqrt(layer.kdim)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf) if mask.dtype == np.bool_ else scores + mask
    if is_causal:
        L = scores.shape[-1]
        scores = np.where(np.tri(L, L, dtype=bool), scores, -np.inf)
    return out, explicit_softmax(scores)


def randomize_sa_bias(layer, rng):
    if layer.b_q is not None:
        layer.b_q = randn(rng, layer.b_q.shape, layer.dtype, 0.5)
        layer.b_k = randn(rng, layer.b_k.shape, layer.dtype, 0.5)
        layer.b_v = randn(rng, layer.b_v.shape, layer.dtype, 0.5)


# --------------------------------------------------------------------------
# SelfAttention
# --------------------------------------------------------------------------

def test_self_attention_attributes_and_defaults():
    layer = pyattn.SelfAttention(8, rng=0)
    assert (layer.embed_dim, layer.kdim, layer.vdim) == (8, 8, 8)
    assert np.dtype(layer.dtype) == np.float32
    assert layer.w_q.shape == layer.w_k.shape == layer.w_v.shape == (8, 8)
    assert layer.b_q is None and layer.b_k is None and layer.b_v is None  # bias=False default
    for w in (layer.w_q, layer.w_k, layer.w_v):
        assert w.dtype == np.float32

    layer = pyattn.SelfAttention(8, kdim=5, vdim=3, bias=True, dtype=np.float64, rng=0)
    assert (layer.embed_dim, layer.kdim, layer.vdim) == (8, 5, 3)
    assert layer.w_q.shape == (8, 5) and layer.w_k.shape == (8, 5) and layer.w_v.shape == (8, 3)
    assert layer.b_q.shape == (5,) and layer.b_k.shape == (5,) and layer.b_v.shape == (3,)
    for b in (layer.b_q, layer.b_k, layer.b_v):
        assert b.dtype == np.float64
        assert not b.any()  # zeros at init


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dims", [(16, None, None), (16, 8, 24), (12, 20, 5)],
                         ids=["kv_default", "k8_v24", "k20_v5"])
@pytest.mark.parametrize("xshape", [(7, 16), (3, 7, 16), (2, 3, 5, 16)],
                         ids=["2d", "3d", "4d"])
def test_self_attention_matches_oracle(dims, bias, dtype, xshape, rng, helpers):
    E, kdim, vdim = dims
    layer = pyattn.SelfAttention(E, kdim=kdim, vdim=vdim, bias=bias, dtype=dtype, rng=rng)
    randomize_sa_bias(layer, rng)
    x = randn(rng, xshape[:-1] + (E,), dtype)
    out = layer(x)
    exp_out, exp_w = sa_oracle(layer, x)
    assert out.shape == xshape[:-1] + (vdim or E,)
    close(helpers, out, exp_out, dtype)

    out2, w = layer(x, return_weights=True)
    L = xshape[-2]
    assert w.shape == xshape[:-2] + (L, L)
    close(helpers, out2, exp_out, dtype)
    close(helpers, w, exp_w, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("mask_kind", ["bool", "float", "bool_broadcast", "float_broadcast"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_self_attention_masks(mask_kind, is_causal, dtype, rng, helpers):
    B, L, E = 3, 9, 12
    layer = pyattn.SelfAttention(E, kdim=6, vdim=10, bias=True, dtype=dtype, rng=rng)
    randomize_sa_bias(layer, rng)
    x = randn(rng, (B, L, E), dtype)
    mshape = (L, L) if mask_kind.endswith("broadcast") else (B, L, L)
    keep = rng.random(mshape) > 0.3
    keep[..., 0] = True  # every row keeps a key (causal keeps key 0 too)
    if mask_kind.startswith("bool"):
        mask = keep
    else:
        mask = np.where(keep, rng.standard_normal(mshape), -np.inf).astype(dtype)
    out, w = layer(x, attn_mask=mask, is_causal=is_causal, return_weights=True)
    exp_out, exp_w = sa_oracle(layer, x, mask, is_causal)
    close(helpers, out, exp_out, dtype)
    close(helpers, w, exp_w, dtype)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=0, atol=1e-5)
    assert np.all(w[~np.broadcast_to(keep, w.shape)] == 0)
    out_only = layer(x, attn_mask=mask, is_causal=is_causal)
    close(helpers, out_only, exp_out, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_self_attention_causal_only(dtype, rng, helpers):
    layer = pyattn.SelfAttention(8, bias=True, dtype=dtype, rng=rng)
    randomize_sa_bias(layer, rng)
    x = randn(rng, (2, 11, 8), dtype)
    out, w = layer(x, is_causal=True, return_weights=True)
    exp_out, exp_w = sa_oracle(layer, x, is_causal=True)
    close(helpers, out, exp_out, dtype)
    close(helpers, w, exp_w, dtype)
    assert np.all(w[:, np.triu(np.ones((11, 11), bool), 1)] == 0)  # nothing above the diagonal
    # The first query sees only itself.
    np.testing.assert_array_equal(w[:, 0, 0], 1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_self_attention_fully_masked_rows_are_zero(mask_kind, dtype, rng, helpers):
    B, L, E = 2, 6, 8
    layer = pyattn.SelfAttention(E, bias=True, dtype=dtype, rng=rng)
    randomize_sa_bias(layer, rng)  # a nonzero b_v must not leak into a masked row
    x = randn(rng, (B, L, E), dtype)
    keep = rng.random((B, L, L)) > 0.3
    keep[..., 0] = True
    keep[0, 2] = False
    keep[1, 5] = False
    mask = keep if mask_kind == "bool" else np.where(keep, 0.0, -np.inf).astype(dtype)
    out, w = layer(x, attn_mask=mask, return_weights=True)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(w))
    for b, i in [(0, 2), (1, 5)]:
        assert np.all(out[b, i] == 0)
        assert np.all(w[b, i] == 0)
    exp_out, exp_w = sa_oracle(layer, x, mask)
    close(helpers, out, exp_out, dtype)
    close(helpers, w, exp_w, dtype)
    sums = w.sum(-1)
    np.testing.assert_allclose(np.delete(sums.reshape(-1), [2, L + 5]), 1.0, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_self_attention_dtype(dtype, rng):
    layer = pyattn.SelfAttention(8, kdim=4, vdim=6, bias=True, dtype=dtype, rng=rng)
    for arr in (layer.w_q, layer.w_k, layer.w_v, layer.b_q, layer.b_k, layer.b_v):
        assert arr.dtype == dtype
    x = randn(rng, (5, 8), dtype)
    out, w = layer(x, return_weights=True)
    assert out.dtype == dtype and w.dtype == dtype
    assert out.shape == (5, 6) and w.shape == (5, 5)
    # An input of the other float dtype is cast: the output has the layer's dtype.
    other = np.float64 if dtype == np.float32 else np.float32
    out, w = layer(x.astype(other), return_weights=True)
    assert out.dtype == dtype and w.dtype == dtype


def test_self_attention_seeded_init_is_reproducible():
    a = pyattn.SelfAttention(16, kdim=8, vdim=12, rng=123)
    b = pyattn.SelfAttention(16, kdim=8, vdim=12, rng=123)
    c = pyattn.SelfAttention(16, kdim=8, vdim=12, rng=np.random.default_rng(7))
    d = pyattn.SelfAttention(16, kdim=8, vdim=12, rng=np.random.default_rng(7))
    e = pyattn.SelfAttention(16, kdim=8, vdim=12, rng=124)
    for name in ("w_q", "w_k", "w_v"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        np.testing.assert_array_equal(getattr(c, name), getattr(d, name))
        assert not np.array_equal(getattr(a, name), getattr(e, name))
    # Three different matrices, not one drawn three times.
    assert not np.array_equal(a.w_q, a.w_k)
    # rng=None: fresh randomness each time.
    f = pyattn.SelfAttention(16, kdim=8, vdim=12)
    g = pyattn.SelfAttention(16, kdim=8, vdim=12)
    assert not np.array_equal(f.w_q, g.w_q)


@pytest.mark.parametrize("dims", [(64, None, None), (64, 16, 128), (32, 96, 8)])
def test_self_attention_xavier_bounds(dims):
    E, kdim, vdim = dims
    layer = pyattn.SelfAttention(E, kdim=kdim, vdim=vdim, dtype=np.float64, rng=1)
    for w, out_dim in ((layer.w_q, kdim or E), (layer.w_k, kdim or E), (layer.w_v, vdim or E)):
        bound = np.sqrt(6.0 / (E + out_dim))
        assert np.all(np.abs(w) <= bound)
        assert np.abs(w).max() > 0.9 * bound  # uniform over the whole range
        assert abs(w.mean()) < 0.1 * bound
        # var of U(-a, a) is a^2 / 3
        np.testing.assert_allclose(w.std(), bound / np.sqrt(3), rtol=0.15)


def test_self_attention_num_threads(rng, helpers):
    layer = pyattn.SelfAttention(16, rng=rng)
    x = randn(rng, (3, 20, 16), np.float32)
    a = layer(x, num_threads=1)
    b = layer(x, num_threads=2)
    helpers.assert_close(a, b)


def test_self_attention_errors(rng):
    layer = pyattn.SelfAttention(8, rng=rng)
    x = randn(rng, (2, 5, 8), np.float32)
    with pytest.raises(ValueError, match=r"embed_dim|\bx\b|input"):
        layer(randn(rng, (2, 5, 7), np.float32))
    with pytest.raises(ValueError, match=r"embed_dim|\bx\b|input|dim"):
        layer(randn(rng, (8,), np.float32))
    with pytest.raises(ValueError, match="attn_mask"):
        layer(x, attn_mask=np.ones((5, 4), bool))
    with pytest.raises(ValueError, match="attn_mask"):
        layer(x, attn_mask=np.ones((3, 5, 5), bool))


# --------------------------------------------------------------------------
# MultiHeadAttention oracle (torch semantics, written out in NumPy)
# --------------------------------------------------------------------------

def additive(mask):
    """A torch-convention mask (bool True = masked out; float = added) as a
    float64 additive mask; bool masks go through the `attend = ~mask`
    convention of pyattn.reference."""
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        attend = ~mask
        return np.where(attend, 0.0, -np.inf)
    return mask.astype(np.float64)


def mha_oracle(sd, num_heads, query, key, value, *, batch_first=True, key_padding_mask=None,
               attn_mask=None, is_causal=False, average_attn_weights=True):
    """(output, weights) in float64 following torch.nn.MultiheadAttention:
    project, split heads, reference SDPA per head, concatenate, out_proj.
    `weights` is averaged or per head, in torch's layout."""
    f = np.float64
    sd = {k: np.asarray(v, f) for k, v in sd.items()}
    q, k, v = (np.asarray(a, f) for a in (query, key, value))
    unbatched = q.ndim == 2
    if unbatched:
        q, k, v = q[None], k[None], v[None]
    elif not batch_first:
        q, k, v = (a.swapaxes(0, 1) for a in (q, k, v))
    if "in_proj_weight" in sd:
        wq, wk, wv = np.split(sd["in_proj_weight"], 3)
    else:
        wq, wk, wv = sd["q_proj_weight"], sd["k_proj_weight"], sd["v_proj_weight"]
    E = wq.shape[0]
    bq, bk, bv = np.split(sd["in_proj_bias"], 3) if "in_proj_bias" in sd else (np.zeros(E),) * 3
    bo = sd.get("out_proj.bias", np.zeros(E))
    q, k, v = q @ wq.T + bq, k @ wk.T + bk, v @ wv.T + bv
    B, L, _ = q.shape
    S = k.shape[1]
    H = num_heads
    hd = E // H

    def heads(a):  # (B, N, E) -> (B, H, N, hd)
        return a.reshape(a.shape[0], a.shape[1], H, hd).transpose(0, 2, 1, 3)

    qh, kh, vh = heads(q), heads(k), heads(v)
    add = np.zeros((B, H, L, S))
    if attn_mask is not None:
        m = additive(attn_mask)
        add = add + (m.reshape(B, H, L, S) if m.ndim == 3 else m)
    if key_padding_mask is not None:
        m = additive(key_padding_mask).reshape(B, S)
        add = add + m[:, None, None, :]
    if is_causal:
        add = np.where(np.tri(L, S, dtype=bool), add, -np.inf)
    attended = ref.scaled_dot_product_attention(qh, kh, vh, attn_mask=add)
    out = attended.transpose(0, 2, 1, 3).reshape(B, L, E) @ sd["out_proj.weight"].T + bo
    weights = explicit_softmax(qh @ kh.swapaxes(-1, -2) / np.sqrt(hd) + add)
    if average_attn_weights:
        weights = weights.mean(axis=1)
    if unbatched:
        out, weights = out[0], weights[0]
    elif not batch_first:
        out = out.swapaxes(0, 1)
    return out, weights


def randomize_mha_bias(mha, rng, scale=0.5):
    """Nonzero biases (zeros at init would hide bias bugs), set through
    load_state_dict."""
    sd = mha.state_dict()
    for key in sd:
        if key.endswith("bias"):
            sd[key] = rng.standard_normal(sd[key].shape) * scale
    mha.load_state_dict(sd)
    return mha


def make_mha(E, H, rng, bias=True, kdim=None, vdim=None, batch_first=True, dtype=np.float32):
    rng = np.random.default_rng(rng)
    mha = pyattn.MultiHeadAttention(E, H, bias=bias, kdim=kdim, vdim=vdim,
                                    batch_first=batch_first, dtype=dtype, rng=rng)
    if bias:
        randomize_mha_bias(mha, rng)
    return mha


def seq_inputs(rng, B, L, S, E, kdim, vdim, batch_first, dtype, unbatched=False):
    def one(n, d):
        if unbatched:
            return randn(rng, (n, d), dtype)
        return randn(rng, (B, n, d) if batch_first else (n, B, d), dtype)
    return one(L, E), one(S, kdim), one(S, vdim)


def check_mha(helpers, mha, dtype, query, key, value, **kwargs):
    """Runs mha with need_weights averaged and per head (and off) and compares
    all three with the oracle."""
    sd = mha.state_dict()
    bf = mha.batch_first
    out, w = mha(query, key, value, **kwargs)
    exp_out, exp_w = mha_oracle(sd, mha.num_heads, query, key, value, batch_first=bf, **kwargs)
    close(helpers, out, exp_out, dtype)
    close(helpers, w, exp_w, dtype)
    out_h, w_h = mha(query, key, value, average_attn_weights=False, **kwargs)
    _, exp_wh = mha_oracle(sd, mha.num_heads, query, key, value, batch_first=bf,
                           average_attn_weights=False, **kwargs)
    close(helpers, out_h, exp_out, dtype)
    close(helpers, w_h, exp_wh, dtype)
    out_n, none = mha(query, key, value, need_weights=False, **kwargs)
    assert none is None
    close(helpers, out_n, exp_out, dtype)
    return out, w, w_h


# --------------------------------------------------------------------------
# MultiHeadAttention: parameters and shapes
# --------------------------------------------------------------------------

def test_mha_attributes_same_dims():
    mha = pyattn.MultiHeadAttention(16, 4, rng=0)
    assert mha.batch_first is True  # NOTE: torch's default is False
    assert mha.embed_dim == 16 and mha.num_heads == 4
    assert mha.in_proj_weight.shape == (48, 16)
    assert mha.q_proj_weight is None and mha.k_proj_weight is None and mha.v_proj_weight is None
    assert mha.in_proj_bias.shape == (48,) and not mha.in_proj_bias.any()
    assert mha.out_proj_weight.shape == (16, 16)
    assert mha.out_proj_bias.shape == (16,) and not mha.out_proj_bias.any()
    for arr in (mha.in_proj_weight, mha.in_proj_bias, mha.out_proj_weight, mha.out_proj_bias):
        assert arr.dtype == np.float32
    # kdim == vdim == embed_dim given explicitly is still the packed layout.
    mha = pyattn.MultiHeadAttention(16, 4, kdim=16, vdim=16, rng=0)
    assert mha.in_proj_weight.shape == (48, 16) and mha.q_proj_weight is None


@pytest.mark.parametrize("kv", [(6, 16), (16, 10), (5, 7)])
def test_mha_attributes_separate_projections(kv):
    kdim, vdim = kv
    mha = pyattn.MultiHeadAttention(16, 2, kdim=kdim, vdim=vdim, dtype=np.float64, rng=0)
    assert mha.in_proj_weight is None
    assert mha.q_proj_weight.shape == (16, 16)
    assert mha.k_proj_weight.shape == (16, kdim)
    assert mha.v_proj_weight.shape == (16, vdim)
    assert mha.in_proj_bias.shape == (48,)
    for arr in (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight, mha.in_proj_bias,
                mha.out_proj_weight, mha.out_proj_bias):
        assert arr.dtype == np.float64


def test_mha_no_bias_attributes():
    mha = pyattn.MultiHeadAttention(8, 2, bias=False, rng=0)
    assert mha.in_proj_bias is None and mha.out_proj_bias is None


def test_mha_bad_num_heads():
    with pytest.raises(ValueError, match="num_heads|embed_dim"):
        pyattn.MultiHeadAttention(10, 3)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_mha_fused_self_attention(dtype, rng, helpers):
    """query is key is value (the fused-GEMM path) equals the oracle and equals
    the same call with three separate copies."""
    E, H, B, L = 32, 4, 3, 10
    mha = make_mha(E, H, rng, dtype=dtype)
    x = randn(rng, (B, L, E), dtype)
    out, w, _ = check_mha(helpers, mha, dtype, x, x, x)
    assert out.shape == (B, L, E) and w.shape == (B, L, L)
    out2, w2 = mha(x, x.copy(), x.copy())
    close(helpers, out2, out.astype(np.float64), dtype)
    close(helpers, w2, w.astype(np.float64), dtype)
    # key is value but query differs
    y = randn(rng, (B, 4, E), dtype)
    check_mha(helpers, mha, dtype, y, x, x)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "seqfirst"])
@pytest.mark.parametrize("kv", [(None, None), (6, 6), (12, 20), (16, 5)],
                         ids=["same", "k6v6", "k12v20", "k16v5"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_mha_cross_attention(kv, batch_first, bias, dtype, rng, helpers):
    E, H, B, L, S = 16, 4, 2, 7, 9
    kdim, vdim = kv
    mha = make_mha(E, H, rng, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first,
                   dtype=dtype)
    q, k, v = seq_inputs(rng, B, L, S, E, kdim or E, vdim or E, batch_first, dtype)
    out, w, w_h = check_mha(helpers, mha, dtype, q, k, v)
    assert out.shape == ((B, L, E) if batch_first else (L, B, E))
    assert w.shape == (B, L, S) and w_h.shape == (B, H, L, S)
    assert out.dtype == dtype and w.dtype == dtype and w_h.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("kv", [(None, None), (6, 10)], ids=["same", "k6v10"])
def test_mha_unbatched(kv, dtype, rng, helpers):
    E, H, L, S = 12, 3, 5, 8
    kdim, vdim = kv
    for batch_first in (True, False):  # ignored for unbatched input
        mha = make_mha(E, H, rng, kdim=kdim, vdim=vdim, batch_first=batch_first, dtype=dtype)
        q, k, v = seq_inputs(rng, 1, L, S, E, kdim or E, vdim or E, True, dtype, unbatched=True)
        kpm = rng.random(S) < 0.3
        kpm[0] = False
        attn = rng.random((L, S)) < 0.3
        attn[:, 0] = False
        out, w, w_h = check_mha(helpers, mha, dtype, q, k, v)
        assert out.shape == (L, E) and w.shape == (L, S) and w_h.shape == (H, L, S)
        check_mha(helpers, mha, dtype, q, k, v, key_padding_mask=kpm, attn_mask=attn)
        attn3 = rng.random((H, L, S)) < 0.3
        attn3[..., 0] = False
        check_mha(helpers, mha, dtype, q, k, v, attn_mask=attn3, is_causal=True)
        if kdim is None:
            check_mha(helpers, mha, dtype, q, q, q, key_padding_mask=rng.random(L) < 0.0)


def masks(rng, B, H, L, S, kind, dtype, which):
    """Random (key_padding_mask, attn_mask) in torch's convention with key 0
    always allowed, so no row is fully masked.  `which` picks the masks;
    `kind` is "bool" or "float" (-inf where masked, random elsewhere)."""
    kpm = attn = None
    if "kpm" in which:
        masked = rng.random((B, S)) < 0.35
        masked[:, 0] = False
        kpm = masked if kind == "bool" else np.where(
            masked, -np.inf, rng.standard_normal((B, S))).astype(dtype)
    if "attn2" in which or "attn3" in which:
        shape = (L, S) if "attn2" in which else (B * H, L, S)
        masked = rng.random(shape) < 0.35
        masked[..., 0] = False
        attn = masked if kind == "bool" else np.where(
            masked, -np.inf, rng.standard_normal(shape)).astype(dtype)
    return kpm, attn


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("kind", ["bool", "float", "mixed"])
@pytest.mark.parametrize("which", ["kpm", "attn2", "attn3", "kpm+attn2", "kpm+attn3"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_mha_masks(which, kind, is_causal, dtype, rng, helpers):
    E, H, B, L, S = 16, 2, 3, 6, 6
    mha = make_mha(E, H, rng, dtype=dtype)
    x = randn(rng, (B, L, E), dtype)
    kpm, attn = masks(rng, B, H, L, S, "bool" if kind == "mixed" else kind, dtype, which)
    if kind == "mixed" and attn is not None:  # float attn_mask with a bool key_padding_mask
        attn = np.where(attn, -np.inf, rng.standard_normal(attn.shape)).astype(dtype)
    _, w, w_h = check_mha(helpers, mha, dtype, x, x, x, key_padding_mask=kpm, attn_mask=attn,
                          is_causal=is_causal)
    atol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=atol)
    np.testing.assert_allclose(w_h.sum(-1), 1.0, atol=atol)
    np.testing.assert_allclose(w_h.mean(axis=1), w, rtol=1e-5, atol=atol)
    if kpm is not None:
        padded = kpm if kpm.dtype == np.bool_ else np.isneginf(kpm)
        assert np.all(w_h[np.broadcast_to(padded[:, None, None, :], w_h.shape)] == 0)
    if is_causal:
        assert np.all(w_h[..., np.triu(np.ones((L, S), bool), 1)] == 0)


MiB = 1 << 20
# (key_padding_mask, attn_mask) as broadcast views of one row, claiming (B, S)
# and (B * H, L, S) = 8 MiB as bool, 32 MiB as float32 and 64 MiB as float64
BROADCAST_MASKS = {
    "bool-attn": (None, np.bool_),
    "float32-attn": (None, np.float32),
    "float64-attn": (None, np.float64),  # converted to the layer's float32
    "bool-kpm+bool-attn": (np.bool_, np.bool_),
    "float32-kpm+bool-attn": (np.float32, np.bool_),
    "bool-kpm+float64-attn": (np.bool_, np.float64),
}


@pytest.mark.parametrize("case", BROADCAST_MASKS)
def test_mha_broadcast_masks_stay_views(case, rng, helpers):
    E, H, B, L, S = 8, 2, 4, 1024, 1024
    mha = make_mha(E, H, rng, dtype=np.float32)
    x = randn(rng, (B, L, E))
    masked = rng.random(S) < 0.3  # not a padded suffix: not kv_lengths
    masked[0] = False

    def row(dtype):  # torch's convention: True / -inf masks out
        return masked if dtype == np.bool_ else np.where(masked, -np.inf, 0.5).astype(dtype)

    kpm_dtype, attn_dtype = BROADCAST_MASKS[case]
    kpm = None if kpm_dtype is None else np.broadcast_to(row(kpm_dtype), (B, S))
    attn = np.broadcast_to(row(attn_dtype), (B * H, L, S))
    got, peak = peak_traced_bytes(lambda: mha(x, x, x, key_padding_mask=kpm, attn_mask=attn,
                                              need_weights=False)[0])
    assert peak < 4 * MiB, f"{peak / MiB:.1f} MiB for a {got.nbytes // 1024} KiB result"
    copies = [None if m is None else np.ascontiguousarray(m) for m in (kpm, attn)]
    expected = mha(x, x, x, key_padding_mask=copies[0], attn_mask=copies[1],
                   need_weights=False)[0]
    helpers.assert_close(got, expected, np.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("L_S", [(5, 9), (9, 5)], ids=["L<S", "L>S"])
def test_mha_causal_cross_attention_top_left(L_S, dtype, rng, helpers):
    """is_causal with L != S is aligned top-left (query i sees keys j <= i),
    with and without an attn_mask and a key_padding_mask."""
    E, H, B = 8, 2, 2
    L, S = L_S
    mha = make_mha(E, H, rng, kdim=5, vdim=3, dtype=dtype)
    q, k, v = seq_inputs(rng, B, L, S, E, 5, 3, True, dtype)
    _, _, w_h = check_mha(helpers, mha, dtype, q, k, v, is_causal=True)
    assert np.all(w_h[..., ~np.tri(L, S, dtype=bool)] == 0)
    kpm, attn = masks(rng, B, H, L, S, "bool", dtype, "kpm+attn2")
    check_mha(helpers, mha, dtype, q, k, v, key_padding_mask=kpm, attn_mask=attn,
              is_causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "seqfirst"])
@pytest.mark.parametrize("source", ["kpm_bool", "kpm_float", "attn_bool", "attn_float",
                                    "causal_and_attn"])
def test_mha_fully_masked_rows(source, batch_first, dtype, rng, helpers):
    """A query row with every key masked gives zeros before out_proj (so the
    output row equals out_proj.bias) and zero weights, where torch gives NaN."""
    E, H, B, L, S = 8, 2, 3, 4, 5
    mha = make_mha(E, H, rng, kdim=6, vdim=6, batch_first=batch_first, dtype=dtype)
    q, k, v = seq_inputs(rng, B, L, S, E, 6, 6, batch_first, dtype)
    kpm = attn = None
    dead = np.zeros((B, L), bool)  # (batch, query row) fully masked
    if source.startswith("kpm"):
        masked = rng.random((B, S)) < 0.3
        masked[:, 0] = False
        masked[1] = True  # every key of batch 1 is padding
        dead[1] = True
        kpm = masked if source == "kpm_bool" else np.where(masked, -np.inf, 0.0).astype(dtype)
    elif source.startswith("attn"):
        masked = rng.random((L, S)) < 0.3
        masked[:, 0] = False
        masked[2] = True  # query 2 sees no key, in every batch
        dead[:, 2] = True
        attn = masked if source == "attn_bool" else np.where(masked, -np.inf, 0.0).astype(dtype)
    else:  # the causal mask allows only key 0 to query 0, and attn_mask removes it
        attn = np.zeros((L, S), bool)
        attn[0, 0] = True
        dead[:, 0] = True
    is_causal = source == "causal_and_attn"
    out, w, w_h = check_mha(helpers, mha, dtype, q, k, v, key_padding_mask=kpm, attn_mask=attn,
                            is_causal=is_causal)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(w)) and np.all(np.isfinite(w_h))
    out_bf = out if batch_first else out.swapaxes(0, 1)
    bias = np.broadcast_to(mha.out_proj_bias, out_bf[dead].shape)
    np.testing.assert_allclose(out_bf[dead], bias, rtol=0, atol=0)
    assert np.all(w[dead] == 0)
    assert np.all(w_h.transpose(0, 2, 1, 3)[dead] == 0)
    atol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(w[~dead].sum(-1), 1.0, atol=atol)


def test_mha_fully_masked_rows_without_bias(rng):
    mha = pyattn.MultiHeadAttention(8, 2, bias=False, rng=rng)
    x = randn(rng, (2, 3, 8), np.float32)
    kpm = np.array([[False, False, True], [True, True, True]])
    out, w = mha(x, x, x, key_padding_mask=kpm)
    assert np.all(out[1] == 0) and np.all(w[1] == 0)
    assert np.all(out[0] != 0)


def test_mha_output_dtype_is_layer_dtype(rng):
    """Output and weights have the layer's dtype (inputs of the other float
    dtype are cast)."""
    for dtype, other in ((np.float32, np.float64), (np.float64, np.float32)):
        mha = pyattn.MultiHeadAttention(8, 2, dtype=dtype, rng=rng)
        x = randn(rng, (2, 3, 8), other)
        out, w = mha(x, x, x)
        assert out.dtype == dtype and w.dtype == dtype


def test_mha_inputs_untouched_and_views(rng, helpers):
    """Inputs are not modified; non-contiguous views give the same result as
    contiguous copies."""
    E, H = 16, 4
    mha = make_mha(E, H, rng, kdim=8, vdim=8, batch_first=False)
    big_q = randn(rng, (6, 2, 2 * E), np.float32)
    q = big_q[::-1, :, ::2]  # (6, 2, E) seq-first, negative and doubled strides
    k = randn(rng, (2, 7, 8), np.float32).swapaxes(0, 1)  # (7, 2, 8) non-contiguous
    v = randn(rng, (7, 2, 8), np.float32)
    kpm = np.zeros((2, 7), bool)
    kpm[:, 3] = True
    before = [a.copy() for a in (q, k, v, kpm)]
    out, w = mha(q, k, v, key_padding_mask=kpm)
    for a, b in zip((q, k, v, kpm), before):
        np.testing.assert_array_equal(a, b)
    out_c, w_c = mha(np.ascontiguousarray(q), np.ascontiguousarray(k), v,
                     key_padding_mask=kpm)
    helpers.assert_close(out, out_c)
    helpers.assert_close(w, w_c)


def test_mha_num_threads(rng, helpers):
    mha = make_mha(32, 4, rng)
    x = randn(rng, (2, 30, 32), np.float32)
    a = mha(x, x, x, num_threads=1)
    b = mha(x, x, x, num_threads=2)
    helpers.assert_close(a[0], b[0])
    helpers.assert_close(a[1], b[1])


def test_mha_walkthrough_shapes(rng, helpers):
    """The walk-through example: 4 tokens (我, 爱, A, I), 512-d, 8 heads of 64."""
    mha = pyattn.MultiHeadAttention(512, 8, rng=0)
    x = randn(rng, (1, 4, 512), np.float32)
    out, w_h = mha(x, x, x, average_attn_weights=False)
    assert out.shape == (1, 4, 512) and w_h.shape == (1, 8, 4, 4)
    np.testing.assert_allclose(w_h.sum(-1), 1.0, atol=1e-5)
    exp_out, exp_w = mha_oracle(mha.state_dict(), 8, x, x, x, average_attn_weights=False)
    close(helpers, out, exp_out, np.float32)
    close(helpers, w_h, exp_w, np.float32)


# --------------------------------------------------------------------------
# MultiHeadAttention: initialisation
# --------------------------------------------------------------------------

def check_uniform(w, bound):
    assert np.all(np.abs(w) <= bound)
    assert np.abs(w).max() > 0.9 * bound
    assert abs(float(w.mean())) < 0.1 * bound
    np.testing.assert_allclose(float(w.std()), bound / np.sqrt(3), rtol=0.15)


@pytest.mark.parametrize("kv", [(None, None), (32, 96)], ids=["packed", "separate"])
def test_mha_init_distribution(kv):
    E = 64
    kdim, vdim = kv
    mha = pyattn.MultiHeadAttention(E, 8, kdim=kdim, vdim=vdim, dtype=np.float64, rng=3)
    if kdim is None:
        check_uniform(mha.in_proj_weight, np.sqrt(6 / (E + 3 * E)))  # xavier over (3E, E)
    else:
        check_uniform(mha.q_proj_weight, np.sqrt(6 / (E + E)))
        check_uniform(mha.k_proj_weight, np.sqrt(6 / (E + kdim)))
        check_uniform(mha.v_proj_weight, np.sqrt(6 / (E + vdim)))
    check_uniform(mha.out_proj_weight, 1 / np.sqrt(E))
    assert not mha.in_proj_bias.any() and not mha.out_proj_bias.any()


def test_mha_seeded_init_is_reproducible():
    def sd(rng):
        return pyattn.MultiHeadAttention(16, 4, kdim=8, vdim=12, rng=rng).state_dict()

    a, b, c = sd(5), sd(5), sd(6)
    d, e = sd(np.random.default_rng(9)), sd(np.random.default_rng(9))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
        np.testing.assert_array_equal(d[key], e[key])
    for key in ("q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"):
        assert not np.array_equal(a[key], c[key])
    f, g = sd(None), sd(None)
    assert not np.array_equal(f["q_proj_weight"], g["q_proj_weight"])


# --------------------------------------------------------------------------
# MultiHeadAttention: state_dict / load_state_dict
# --------------------------------------------------------------------------

STATE_KEYS = {
    # (same dims, bias): keys in torch's order
    (True, True): ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"],
    (True, False): ["in_proj_weight", "out_proj.weight"],
    (False, True): ["q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                    "out_proj.weight", "out_proj.bias"],
    (False, False): ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("same", [True, False], ids=["packed", "separate"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_state_dict_keys_shapes_and_copies(same, bias, dtype):
    E, kdim, vdim = 12, (None if same else 5), (None if same else 7)
    mha = pyattn.MultiHeadAttention(E, 3, bias=bias, kdim=kdim, vdim=vdim, dtype=dtype, rng=0)
    sd = mha.state_dict()
    assert list(sd) == STATE_KEYS[(same, bias)]
    shapes = {"in_proj_weight": (3 * E, E), "q_proj_weight": (E, E), "k_proj_weight": (E, 5),
              "v_proj_weight": (E, 7), "in_proj_bias": (3 * E,), "out_proj.weight": (E, E),
              "out_proj.bias": (E,)}
    attrs = {"in_proj_weight": "in_proj_weight", "q_proj_weight": "q_proj_weight",
             "k_proj_weight": "k_proj_weight", "v_proj_weight": "v_proj_weight",
             "in_proj_bias": "in_proj_bias", "out_proj.weight": "out_proj_weight",
             "out_proj.bias": "out_proj_bias"}
    for key, val in sd.items():
        assert isinstance(val, np.ndarray)
        assert val.shape == shapes[key] and val.dtype == dtype
        np.testing.assert_array_equal(val, getattr(mha, attrs[key]))
        assert not np.shares_memory(val, getattr(mha, attrs[key]))  # copies
    # Writing into the returned dict leaves the layer alone.
    first = sd[list(sd)[0]]
    saved = first.copy()
    first += 1
    np.testing.assert_array_equal(mha.state_dict()[list(sd)[0]], saved)


@pytest.mark.parametrize("same", [True, False], ids=["packed", "separate"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_state_dict_round_trip(same, bias, rng, helpers):
    E, H = 16, 4
    kdim, vdim = (None, None) if same else (6, 9)
    src = make_mha(E, H, 1, bias=bias, kdim=kdim, vdim=vdim)
    dst = pyattn.MultiHeadAttention(E, H, bias=bias, kdim=kdim, vdim=vdim, rng=2)
    q, k, v = seq_inputs(rng, 2, 5, 7, E, kdim or E, vdim or E, True, np.float32)
    out_src, w_src = src(q, k, v)
    out_dst, _ = dst(q, k, v)
    assert not np.allclose(out_src, out_dst)
    dst.load_state_dict(src.state_dict())
    out_dst, w_dst = dst(q, k, v)
    np.testing.assert_array_equal(out_dst, out_src)
    np.testing.assert_array_equal(w_dst, w_src)
    for key, val in src.state_dict().items():
        np.testing.assert_array_equal(dst.state_dict()[key], val)


def test_load_state_dict_casts_and_accepts_array_likes(rng):
    mha = pyattn.MultiHeadAttention(4, 2, rng=0)  # float32
    sd = {key: rng.standard_normal(val.shape) for key, val in mha.state_dict().items()}
    sd["out_proj.bias"] = sd["out_proj.bias"].tolist()  # a plain list is an array-like
    mha.load_state_dict(sd)
    for key, val in mha.state_dict().items():
        assert val.dtype == np.float32
        np.testing.assert_array_equal(val, np.asarray(sd[key], np.float32))
    assert mha.in_proj_weight.dtype == np.float32 and mha.out_proj_bias.dtype == np.float32
    # The layer does not keep a reference to the caller's arrays.
    sd32 = {key: rng.standard_normal(val.shape).astype(np.float32)
            for key, val in mha.state_dict().items()}
    mha.load_state_dict(sd32)
    sd32["in_proj_weight"][...] = 0
    assert mha.in_proj_weight.any()


@pytest.mark.parametrize("same", [True, False], ids=["packed", "separate"])
def test_load_state_dict_errors(same):
    kdim = None if same else 6
    mha = pyattn.MultiHeadAttention(8, 2, kdim=kdim, vdim=kdim, rng=0)
    good = mha.state_dict()
    first = "in_proj_weight" if same else "k_proj_weight"

    missing = dict(good)
    del missing[first]
    with pytest.raises(ValueError, match=first):
        mha.load_state_dict(missing)
    missing = dict(good)
    del missing["out_proj.bias"]
    with pytest.raises(ValueError, match=r"out_proj\.bias"):
        mha.load_state_dict(missing)

    extra = dict(good, extra_thing=np.zeros(3))
    with pytest.raises(ValueError, match="extra_thing"):
        mha.load_state_dict(extra)
    # The other layout's key is unexpected too.
    other = "q_proj_weight" if same else "in_proj_weight"
    with pytest.raises(ValueError, match=other):
        mha.load_state_dict(dict(good, **{other: np.zeros((24, 8) if not same else (8, 8))}))

    bad = dict(good)
    bad[first] = np.zeros(good[first].shape[:-1] + (good[first].shape[-1] + 1,))
    with pytest.raises(ValueError, match=first):
        mha.load_state_dict(bad)
    bad = dict(good)
    bad["out_proj.bias"] = np.zeros((9,))
    with pytest.raises(ValueError, match=r"out_proj\.bias"):
        mha.load_state_dict(bad)


def test_values_the_layer_dtype_cannot_hold_are_refused(rng):
    """Inputs, float masks and loaded parameters are converted to the layer's
    dtype; a finite value that would become inf there is a ValueError naming
    the argument (the layer is left unchanged), while inf passes through."""
    mha = pyattn.MultiHeadAttention(4, 2, rng=0)  # float32
    x = rng.standard_normal((1, 3, 4))
    huge = x.copy()
    huge[0, 1, 2] = 1e300
    for name in ("query", "key", "value"):
        args = {"query": x, "key": x, "value": x, name: huge}
        with pytest.raises(ValueError, match=rf"{name} holds 1 finite value.*float32"):
            mha(**args)
    for name, mask in (("attn_mask", np.zeros((3, 3))), ("key_padding_mask", np.zeros((1, 3)))):
        mask[..., 1] = -1e300
        with pytest.raises(ValueError, match=rf"{name} holds \d+ finite value.*float32"):
            mha(x, x, x, **{name: mask})
        mask[..., 1] = -np.inf
        assert np.isfinite(mha(x, x, x, **{name: mask})[0]).all()
    good = mha.state_dict()
    bad = {key: val.astype(np.float64) for key, val in good.items()}
    bad["out_proj.bias"][1] = -1e300
    with pytest.raises(ValueError, match=r"state_dict\['out_proj\.bias'\] holds 1 finite"):
        mha.load_state_dict(bad)
    for key, val in mha.state_dict().items():
        np.testing.assert_array_equal(val, good[key])
    inf = dict(good, **{"out_proj.bias": np.full(4, np.inf)})
    mha.load_state_dict(inf)
    assert (mha.out_proj_bias == np.inf).all()


def test_failed_load_state_dict_leaves_layer_unchanged(rng):
    mha = pyattn.MultiHeadAttention(8, 2, rng=0)
    good = mha.state_dict()
    bad = {key: rng.standard_normal(val.shape) for key, val in good.items()}
    bad["out_proj.bias"] = np.zeros((9,))  # the last key is wrong
    with pytest.raises(ValueError, match=r"out_proj\.bias"):
        mha.load_state_dict(bad)
    after = mha.state_dict()
    for key in good:
        np.testing.assert_array_equal(after[key], good[key])


def test_load_state_dict_no_bias():
    mha = pyattn.MultiHeadAttention(8, 2, bias=False, rng=0)
    with_bias = pyattn.MultiHeadAttention(8, 2, bias=True, rng=0).state_dict()
    with pytest.raises(ValueError, match="in_proj_bias|out_proj.bias"):
        mha.load_state_dict(with_bias)
    with pytest.raises(ValueError, match="in_proj_bias|out_proj.bias"):
        pyattn.MultiHeadAttention(8, 2, bias=True, rng=0).load_state_dict(mha.state_dict())


def test_load_state_dict_not_strict():
    """strict=False (as in torch) ignores missing and unexpected keys, and
    still loads the keys it knows."""
    mha = pyattn.MultiHeadAttention(8, 2, rng=0)
    new = np.full((8,), 0.25)
    mha.load_state_dict({"out_proj.bias": new, "extra": np.zeros(2)}, strict=False)
    np.testing.assert_array_equal(mha.out_proj_bias, new.astype(np.float32))


# --------------------------------------------------------------------------
# MultiHeadAttention: input errors
# --------------------------------------------------------------------------

@pytest.fixture
def err_mha():
    return pyattn.MultiHeadAttention(8, 2, kdim=6, vdim=4, rng=0)


VALID_QKV = (f32(2, 3, 8), f32(2, 5, 6), f32(2, 5, 4))  # what err_mha accepts
MHA_ERRORS = {
    # name: (query, key, value, kwargs, argument named in the message)
    "query_embed_dim": (f32(2, 3, 7), f32(2, 5, 6), f32(2, 5, 4), {}, "query"),
    "key_kdim": (f32(2, 3, 8), f32(2, 5, 8), f32(2, 5, 4), {}, "key"),
    "value_vdim": (f32(2, 3, 8), f32(2, 5, 6), f32(2, 5, 6), {}, "value"),
    "query_4d": (f32(1, 2, 3, 8), f32(2, 5, 6), f32(2, 5, 4), {}, "query"),
    "query_1d": (f32(8), f32(5, 6), f32(5, 4), {}, "query"),
    "batched_query_unbatched_key": (f32(2, 3, 8), f32(5, 6), f32(5, 4), {}, "key|query"),
    "unbatched_query_batched_key": (f32(3, 8), f32(2, 5, 6), f32(2, 5, 4), {}, "key|query"),
    "batch_mismatch": (f32(2, 3, 8), f32(3, 5, 6), f32(3, 5, 4), {}, "key|batch"),
    "key_value_len": (f32(2, 3, 8), f32(2, 5, 6), f32(2, 4, 4), {}, "value|key"),
    "key_value_batch": (f32(2, 3, 8), f32(2, 5, 6), f32(1, 5, 4), {}, "value|key"),
    "kpm_len": (*VALID_QKV, {"key_padding_mask": np.zeros((2, 4), bool)}, "key_padding_mask"),
    "kpm_batch": (*VALID_QKV, {"key_padding_mask": np.zeros((3, 5), bool)}, "key_padding_mask"),
    "kpm_3d": (*VALID_QKV, {"key_padding_mask": np.zeros((2, 1, 5), bool)}, "key_padding_mask"),
    "kpm_unbatched_len": (f32(3, 8), f32(5, 6), f32(5, 4),
                          {"key_padding_mask": np.zeros((4,), bool)}, "key_padding_mask"),
    "attn2_shape": (*VALID_QKV, {"attn_mask": np.zeros((3, 4), bool)}, "attn_mask"),
    "attn2_transposed": (*VALID_QKV, {"attn_mask": np.zeros((5, 3), bool)}, "attn_mask"),
    "attn3_batch_not_times_heads": (*VALID_QKV, {"attn_mask": np.zeros((2, 3, 5), bool)},
                                    "attn_mask"),
    "attn3_len": (*VALID_QKV, {"attn_mask": np.zeros((4, 3, 4), bool)}, "attn_mask"),
    "attn_4d": (*VALID_QKV, {"attn_mask": np.zeros((2, 2, 3, 5), bool)}, "attn_mask"),
    "attn_1d": (*VALID_QKV, {"attn_mask": np.zeros((5,), bool)}, "attn_mask"),
}


@pytest.mark.parametrize("case", list(MHA_ERRORS))
def test_mha_input_errors(err_mha, case):
    q, k, v, kwargs, name = MHA_ERRORS[case]
    with pytest.raises(ValueError, match=name):
        err_mha(q, k, v, **kwargs)


@pytest.mark.parametrize("kv", [(6, 6), (8, 5), (5, 8)], ids=["k6v6", "k8v5", "k5v8"])
def test_mha_same_array_with_other_kdim_vdim_errors(kv):
    """query is key is value, but the layer's kdim/vdim differ from embed_dim:
    key (or value) has the wrong width, and the error names it (not a bare
    matmul error from the projection)."""
    kdim, vdim = kv
    mha = pyattn.MultiHeadAttention(8, 2, kdim=kdim, vdim=vdim, rng=0)
    x = f32(2, 3, 8)
    with pytest.raises(ValueError, match="key" if kdim != 8 else "value"):
        mha(x, x, x)


@pytest.mark.parametrize("name", ["key_padding_mask", "attn_mask"])
def test_mha_integer_mask_is_rejected(err_mha, name):
    """Masks are bool (True = masked out) or float (added); torch rejects
    integer masks too."""
    shape = (2, 5) if name == "key_padding_mask" else (3, 5)
    with pytest.raises((TypeError, ValueError), match=name):
        err_mha(f32(2, 3, 8), f32(2, 5, 6), f32(2, 5, 4), **{name: np.zeros(shape, np.int64)})


@pytest.mark.parametrize("make", [
    lambda: pyattn.MultiHeadAttention(8, 2, batch_first="no", rng=0),
    lambda: pyattn.MultiHeadAttention(8, 2, bias=1, rng=0),
    lambda: pyattn.MultiHeadAttention(8, 2, rng=0)(f32(2, 3, 8), f32(2, 3, 8), f32(2, 3, 8),
                                                  need_weights="no"),
    lambda: pyattn.MultiHeadAttention(8, 2, rng=0)(f32(2, 3, 8), f32(2, 3, 8), f32(2, 3, 8),
                                                  average_attn_weights=None),
    lambda: pyattn.SelfAttention(8, bias="yes", rng=0),
    lambda: pyattn.SelfAttention(8, rng=0)(f32(2, 3, 8), return_weights=0),
    lambda: pyattn.MultiHeadAttention(8, 2, rng=0).load_state_dict({}, strict=None),
], ids=["batch_first", "mha_bias", "need_weights", "average_attn_weights", "sa_bias",
        "return_weights", "strict"])
def test_layer_flags_must_be_bools(make):
    """A flag is a bool (or NumPy bool), as is_causal: "no" would be truthy."""
    with pytest.raises(TypeError, match="must be a bool, got"):
        make()


def test_mha_batch_first_false_errors():
    mha = pyattn.MultiHeadAttention(8, 2, batch_first=False, rng=0)
    # (L, B, E) with key (S, B', E): batch sizes differ along axis 1
    with pytest.raises(ValueError, match="key|batch"):
        mha(f32(3, 2, 8), f32(5, 3, 8), f32(5, 3, 8))
    # key_padding_mask is (B, S) whatever batch_first is
    with pytest.raises(ValueError, match="key_padding_mask"):
        mha(f32(3, 2, 8), f32(5, 2, 8), f32(5, 2, 8), key_padding_mask=np.zeros((5, 2), bool))


# --------------------------------------------------------------------------
# Property test over random small configs
# --------------------------------------------------------------------------

HEADS = [(4, 1), (4, 2), (6, 3), (8, 4), (8, 8), (12, 2), (10, 5)]


@st.composite
def mha_configs(draw):
    E, H = draw(st.sampled_from(HEADS))
    same = draw(st.booleans())
    return dict(
        E=E, H=H,
        kdim=None if same else draw(st.integers(1, 9)),
        vdim=None if same else draw(st.integers(1, 9)),
        bias=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        unbatched=draw(st.booleans()),
        self_attn=same and draw(st.booleans()),
        B=draw(st.integers(1, 3)), L=draw(st.integers(1, 7)), S=draw(st.integers(1, 7)),
        kind=draw(st.sampled_from(["bool", "float"])),
        which=draw(st.sampled_from(["", "kpm", "attn2", "attn3", "kpm+attn2", "kpm+attn3"])),
        is_causal=draw(st.booleans()),
        average=draw(st.booleans()),
        dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@given(cfg=mha_configs())
def test_mha_property_matches_oracle(cfg, helpers):
    rng = np.random.default_rng(cfg["seed"])
    E, H, dtype = cfg["E"], cfg["H"], cfg["dtype"]
    kdim, vdim = cfg["kdim"] or E, cfg["vdim"] or E
    B = 1 if cfg["unbatched"] else cfg["B"]
    L = cfg["L"]
    S = L if cfg["self_attn"] else cfg["S"]
    mha = make_mha(E, H, rng, bias=cfg["bias"], kdim=cfg["kdim"], vdim=cfg["vdim"],
                   batch_first=cfg["batch_first"], dtype=dtype)
    q, k, v = seq_inputs(rng, B, L, S, E, kdim, vdim, cfg["batch_first"], dtype,
                         unbatched=cfg["unbatched"])
    if cfg["self_attn"]:
        k = v = q
    kpm, attn = masks(rng, B, H, L, S, cfg["kind"], dtype, cfg["which"])
    if cfg["unbatched"]:
        kpm = None if kpm is None else kpm[0]
    kwargs = dict(key_padding_mask=kpm, attn_mask=attn, is_causal=cfg["is_causal"],
                  average_attn_weights=cfg["average"])
    out, w = mha(q, k, v, **kwargs)
    exp_out, exp_w = mha_oracle(mha.state_dict(), H, q, k, v, batch_first=cfg["batch_first"],
                                **kwargs)
    close(helpers, out, exp_out, dtype)
    close(helpers, w, exp_w, dtype)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5 if dtype == np.float32 else 1e-12)


@given(E=st.integers(1, 9), kdim=st.none() | st.integers(1, 9), vdim=st.none() | st.integers(1, 9),
       bias=st.booleans(), lead=st.lists(st.integers(1, 3), max_size=2), L=st.integers(1, 8),
       mask=st.sampled_from([None, "bool", "float"]), is_causal=st.booleans(),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1))
def test_self_attention_property_matches_oracle(E, kdim, vdim, bias, lead, L, mask, is_causal,
                                                dtype, seed, helpers):
    rng = np.random.default_rng(seed)
    layer = pyattn.SelfAttention(E, kdim=kdim, vdim=vdim, bias=bias, dtype=dtype, rng=rng)
    randomize_sa_bias(layer, rng)
    x = randn(rng, tuple(lead) + (L, E), dtype)
    attn = None
    if mask is not None:
        keep = rng.random((L, L)) > 0.3  # may fully mask rows: they must come out zero
        attn = keep if mask == "bool" else np.where(keep, rng.standard_normal((L, L)),
                                                    -np.inf).astype(dtype)
    out, w = layer(x, attn_mask=attn, is_causal=is_causal, return_weights=True)
    exp_out, exp_w = sa_oracle(layer, x, attn, is_causal)
    assert out.shape == tuple(lead) + (L, vdim or E) and w.shape == tuple(lead) + (L, L)
    close(helpers, out, exp_out, dtype)
    close(helpers, w, exp_w, dtype)
    sums = w.sum(-1)
    assert np.all((np.abs(sums - 1) < 1e-5) | (sums == 0))


@pytest.mark.parametrize("right_padded", [True, False])
def test_mha_turns_end_padding_into_key_lengths(right_padded):
    """A bool key_padding_mask that pads the end of each sequence runs as
    kv_lengths (padded keys are never read); any other stays a mask.  Both
    give the oracle's result."""
    seen = []

    class Spy(pyattn.MultiHeadAttention):
        @staticmethod
        def _attention(*args, **kwargs):
            seen.append((args[3], kwargs.get("kv_lengths")))
            return functional.attention(*args, **kwargs)

    layer = Spy(16, 2, rng=0)
    x = np.random.default_rng(5).standard_normal((3, 9, 16)).astype(np.float32)
    pad = np.arange(9) >= np.array([9, 4, 0])[:, None]  # lengths 9, 4 and 0
    if not right_padded:
        pad[0, 2] = True  # a hole in the middle
    got, w = layer(x, x, x, key_padding_mask=pad)
    mask, kv_lengths = seen[-1]
    if right_padded:
        assert mask is None and kv_lengths.tolist() == [9, 4, 0]
    else:
        assert mask is not None and kv_lengths is None
    ref_layer = pyattn.MultiHeadAttention(16, 2, rng=0)
    # the same padding as a float mask, which always stays a mask
    want, want_w = ref_layer(x, x, x, key_padding_mask=np.where(pad, -np.inf, 0).astype(np.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w, want_w, rtol=1e-5, atol=1e-6)
