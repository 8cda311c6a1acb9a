"""pyattn.MultiHeadAttention against torch.nn.MultiheadAttention: the same
outputs and attention weights over random configurations, with weights copied
both ways (pyattn -> torch and torch -> pyattn), the same state_dict keys, the
same initialisation rules, and the one documented difference (a query whose
keys are all masked: torch gives NaN, pyattn gives zeros before out_proj).

Runs only when torch is installed (CI installs it)."""
import sys

import numpy as np
import pytest

import pyattn

torch = pytest.importorskip("torch")

TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}
TOL = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float64: dict(rtol=1e-10, atol=1e-10)}

# (embed_dim, num_heads): one head, head_dim 1, odd head counts (torch's fast
# path needs an even count), the 512 / 8 walk-through example
HEAD_COMBOS = [(8, 1), (8, 2), (12, 3), (16, 4), (16, 8), (24, 6), (32, 4), (6, 6), (10, 5),
               (64, 8), (512, 8), (20, 2)]
MODES = ["self", "cross", "kvdim", "kv_same"]  # kvdim: cross attention, kdim/vdim != embed_dim
MASK_SETS = ["", "kpm", "attn2", "attn3", "kpm+attn2", "kpm+attn3"]
N_CONFIGS = 72


def make_config(seed):
    """A random configuration; the features cycle with the seed so that every
    one is covered (test_configs_cover_every_feature checks it), the sizes are
    drawn from a seeded generator."""
    r = np.random.default_rng(10_000 + seed)
    E, H = HEAD_COMBOS[seed % len(HEAD_COMBOS)]
    mode = MODES[(seed // 2) % 4]
    kdim = vdim = None
    if mode == "kvdim":
        kdim, vdim = (int(d) for d in r.integers(1, 20, size=2))
        if kdim == vdim == E:
            kdim = E + 1
    unbatched = seed % 5 == 0
    B = 1 if unbatched else int(r.integers(1, 4))
    L = int(r.integers(1, 9))
    S = L if mode == "self" else int(r.integers(1, 9))
    return dict(
        seed=seed, E=E, H=H, mode=mode, kdim=kdim, vdim=vdim, B=B, L=L, S=S,
        bias=seed % 3 != 0,
        batch_first=seed % 2 == 0,
        unbatched=unbatched,
        kind=["bool", "float"][(seed // 5) % 2],
        masks=MASK_SETS[seed % 6],
        is_causal=seed % 3 == 1 or seed % 11 == 0,
        need_weights=seed % 4 != 3,
        average=(seed // 4) % 2 == 0,
        dtype=np.float64 if seed % 7 in (0, 2, 5) else np.float32,
        direction="pyattn->torch" if (seed // 7) % 2 == 0 else "torch->pyattn",
        load_tensors=seed % 3 == 2,  # torch->pyattn: hand the tensors over directly
    )


CONFIGS = [make_config(s) for s in range(N_CONFIGS)]


def config_id(cfg):
    parts = [f"s{cfg['seed']}", f"E{cfg['E']}H{cfg['H']}", cfg["mode"]]
    if cfg["kdim"] is not None:
        parts.append(f"k{cfg['kdim']}v{cfg['vdim']}")
    parts.append("unbatched" if cfg["unbatched"] else f"B{cfg['B']}")
    parts.append(f"L{cfg['L']}S{cfg['S']}")
    parts.append("bf" if cfg["batch_first"] else "seqfirst")
    if not cfg["bias"]:
        parts.append("nobias")
    if cfg["masks"]:
        parts.append(f"{cfg['masks']}-{cfg['kind']}")
    if cfg["is_causal"]:
        parts.append("causal")
    parts.append(("avg" if cfg["average"] else "perhead") if cfg["need_weights"] else "now")
    parts.append("f64" if cfg["dtype"] == np.float64 else "f32")
    parts.append("p2t" if cfg["direction"] == "pyattn->torch" else "t2p")
    return "-".join(parts)


def test_configs_cover_every_feature():
    assert len(CONFIGS) >= 60
    seen = lambda key: {c[key] for c in CONFIGS}  # noqa: E731
    assert {(c["E"], c["H"]) for c in CONFIGS} == set(HEAD_COMBOS)
    assert seen("mode") == set(MODES)
    assert seen("masks") == set(MASK_SETS)
    for key in ("bias", "batch_first", "unbatched", "is_causal", "need_weights", "average"):
        assert seen(key) == {True, False}, key
    assert seen("kind") == {"bool", "float"}
    assert seen("dtype") == {np.float32, np.float64}
    assert seen("direction") == {"pyattn->torch", "torch->pyattn"}
    pairs = lambda *keys: {tuple(c[k] for k in keys) for c in CONFIGS}  # noqa: E731
    assert {(k, m) for k, m in pairs("kind", "masks") if m} == {
        (k, m) for k in ("bool", "float") for m in MASK_SETS[1:]}
    assert {(c["is_causal"], "attn" in c["masks"]) for c in CONFIGS} == {
        (a, b) for a in (True, False) for b in (True, False)}
    assert {(c["mode"], c["batch_first"]) for c in CONFIGS} == {
        (m, b) for m in MODES for b in (True, False)}
    assert any(c["unbatched"] and "attn3" in c["masks"] for c in CONFIGS)
    assert any(c["unbatched"] and "kpm" in c["masks"] for c in CONFIGS)
    assert any(c["unbatched"] and c["mode"] == "kvdim" for c in CONFIGS)
    assert any(c["direction"] == "torch->pyattn" and c["load_tensors"] for c in CONFIGS)
    assert any(c["kdim"] is not None and c["kdim"] != c["vdim"] for c in CONFIGS)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def torch_module(E, H, bias, kdim, vdim, batch_first, dtype):
    return torch.nn.MultiheadAttention(E, H, bias=bias, kdim=kdim, vdim=vdim,
                                       batch_first=batch_first,  # torch's default is False
                                       dtype=TORCH_DTYPE[dtype]).eval()


def pyattn_module(E, H, bias, kdim, vdim, batch_first, dtype, rng):
    return pyattn.MultiHeadAttention(E, H, bias=bias, kdim=kdim, vdim=vdim,
                                     batch_first=batch_first, dtype=dtype, rng=rng)


def to_torch(sd):
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


def from_torch(sd):
    return {k: v.detach().cpu().numpy() for k, v in sd.items()}


def paired_modules(cfg, rng):
    """(pyattn module, torch module) holding the same parameters, with random
    nonzero biases, copied in the config's direction."""
    args = (cfg["E"], cfg["H"], cfg["bias"], cfg["kdim"], cfg["vdim"], cfg["batch_first"],
            cfg["dtype"])
    if cfg["direction"] == "pyattn->torch":
        tm = torch_module(*args)
        pm = pyattn_module(*args, rng=rng)
        sd = pm.state_dict()
        for k in sd:
            if k.endswith("bias"):
                sd[k] = rng.standard_normal(sd[k].shape) * 0.5
        pm.load_state_dict(sd)
        tm.load_state_dict(to_torch(pm.state_dict()))
    else:
        torch.manual_seed(cfg["seed"])
        tm = torch_module(*args)
        with torch.no_grad():
            for name, p in tm.named_parameters():
                if name.endswith("bias"):
                    p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape)) * 0.5))
        pm = pyattn_module(*args, rng=rng)
        sd = dict(tm.state_dict()) if cfg["load_tensors"] else from_torch(tm.state_dict())
        pm.load_state_dict(sd)
    t_sd, p_sd = tm.state_dict(), pm.state_dict()
    assert list(p_sd) == list(t_sd)
    for k in t_sd:
        np.testing.assert_array_equal(p_sd[k], t_sd[k].numpy(), err_msg=k)
    return pm, tm


def inputs(cfg, rng):
    """query, key, value as NumPy arrays in the config's layout; for "self"
    the three are one array, for "kv_same" key is value."""
    E, dtype = cfg["E"], cfg["dtype"]
    kdim, vdim = cfg["kdim"] or E, cfg["vdim"] or E

    def seq(n, d):
        if cfg["unbatched"]:
            shape = (n, d)
        else:
            shape = (cfg["B"], n, d) if cfg["batch_first"] else (n, cfg["B"], d)
        return rng.standard_normal(shape).astype(dtype)

    q = seq(cfg["L"], E)
    if cfg["mode"] == "self":
        return q, q, q
    k = seq(cfg["S"], kdim)
    if cfg["mode"] == "kv_same":
        return q, k, k
    return q, k, seq(cfg["S"], vdim)


def make_masks(cfg, rng):
    """(key_padding_mask, attn_mask) in torch's convention (bool True = masked
    out, float = added), with key 0 allowed everywhere: no row is fully masked,
    even with the causal mask, so torch gives no NaN."""
    B, H, L, S, dtype, kind = cfg["B"], cfg["H"], cfg["L"], cfg["S"], cfg["dtype"], cfg["kind"]

    def mask(shape):
        masked = rng.random(shape) < 0.35
        masked[..., 0] = False
        if kind == "bool":
            return masked
        return np.where(masked, -np.inf, rng.standard_normal(shape)).astype(dtype)

    kpm = attn = None
    if "kpm" in cfg["masks"]:
        kpm = mask((S,) if cfg["unbatched"] else (B, S))
    if "attn2" in cfg["masks"]:
        attn = mask((L, S))
    elif "attn3" in cfg["masks"]:
        attn = mask((B * H, L, S))  # B = 1 unbatched: (num_heads, L, S)
    return kpm, attn


def causal_mask_like(cfg):
    """The top-left causal mask in torch's convention, of the config's kind."""
    masked = ~np.tri(cfg["L"], cfg["S"], dtype=bool)
    return masked if cfg["kind"] == "bool" else np.where(masked, -np.inf, 0.0).astype(cfg["dtype"])


def torch_attn_args(cfg, attn):
    """torch needs an attn_mask with is_causal (its flag is only a hint): give
    it the causal mask alone, or merged into the user's attn_mask (with the
    hint off, since the merged mask is no longer purely causal)."""
    if not cfg["is_causal"]:
        return attn, False
    causal = causal_mask_like(cfg)
    if attn is None:
        return causal, True
    merged = (attn | causal) if attn.dtype == np.bool_ else attn + causal
    return merged, False


def t(a):
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a))


def run_torch(tm, q, k, v, **kwargs):
    tq = t(q)
    tk = tq if k is q else t(k)
    tv = tk if v is k else t(v)
    kwargs = {n: (t(a) if isinstance(a, np.ndarray) else a) for n, a in kwargs.items()}
    with torch.inference_mode():
        out, w = tm(tq, tk, tv, **kwargs)
    return out.numpy(), (None if w is None else w.numpy())


# --------------------------------------------------------------------------
# outputs and weights against torch over random configs
# --------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_matches_torch(cfg):
    rng = np.random.default_rng(cfg["seed"])
    pm, tm = paired_modules(cfg, rng)
    q, k, v = inputs(cfg, rng)
    kpm, attn = make_masks(cfg, rng)
    t_attn, t_causal = torch_attn_args(cfg, attn)

    out_p, w_p = pm(q, k, v, key_padding_mask=kpm, need_weights=cfg["need_weights"],
                    attn_mask=attn, average_attn_weights=cfg["average"],
                    is_causal=cfg["is_causal"])
    out_t, w_t = run_torch(tm, q, k, v, key_padding_mask=kpm, need_weights=cfg["need_weights"],
                           attn_mask=t_attn, average_attn_weights=cfg["average"],
                           is_causal=t_causal)
    dtype = cfg["dtype"]
    assert np.all(np.isfinite(out_t))  # the config has no fully masked row
    assert out_p.shape == out_t.shape and out_p.dtype == dtype
    np.testing.assert_allclose(out_p, out_t, **TOL[dtype])
    if not cfg["need_weights"]:
        assert w_p is None and w_t is None
        return
    assert w_p.shape == w_t.shape and w_p.dtype == dtype
    np.testing.assert_allclose(w_p, w_t, **TOL[dtype])
    np.testing.assert_allclose(w_p.sum(-1), 1.0, atol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("causal_with_attn", [False, True], ids=["causal_only", "causal+attn"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "seqfirst"])
def test_is_causal_without_attn_mask_matches_torch(batch_first, causal_with_attn):
    """pyattn's is_causal needs no attn_mask; torch gets the explicit mask."""
    rng = np.random.default_rng(7 + batch_first + 2 * causal_with_attn)
    E, H, B, L = 16, 4, 2, 6
    tm = torch_module(E, H, True, None, None, batch_first, np.float64)
    pm = pyattn_module(E, H, True, None, None, batch_first, np.float64, rng)
    sd = {k: rng.standard_normal(a.shape) * 0.3 for k, a in pm.state_dict().items()}
    pm.load_state_dict(sd)
    tm.load_state_dict(to_torch(sd))
    x = rng.standard_normal((B, L, E) if batch_first else (L, B, E))
    attn = None
    if causal_with_attn:
        attn = rng.random((L, L)) < 0.3
        attn[:, 0] = False
    causal = ~np.tri(L, L, dtype=bool)
    for need_weights in (True, False):
        out_p, w_p = pm(x, x, x, attn_mask=attn, is_causal=True, need_weights=need_weights)
        t_attn = causal if attn is None else (attn | causal)
        out_t, w_t = run_torch(tm, x, x, x, attn_mask=t_attn, need_weights=need_weights)
        np.testing.assert_allclose(out_p, out_t, rtol=1e-10, atol=1e-10)
        if need_weights:
            np.testing.assert_allclose(w_p, w_t, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------
# the documented difference: fully masked rows
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_fully_masked_rows_torch_nan_pyattn_bias(dtype):
    """Where torch gives NaN (a query whose keys are all masked), pyattn gives
    out_proj.bias in the output and zeros in the weights; every other row
    matches torch."""
    rng = np.random.default_rng(3)
    E, H, B, L, S = 8, 2, 3, 4, 5
    tm = torch_module(E, H, True, 6, 6, False, dtype)
    pm = pyattn_module(E, H, True, 6, 6, False, dtype, rng)
    sd = pm.state_dict()
    sd["in_proj_bias"] = rng.standard_normal(3 * E)
    sd["out_proj.bias"] = rng.standard_normal(E)
    pm.load_state_dict(sd)
    tm.load_state_dict(to_torch(pm.state_dict()))
    q = rng.standard_normal((L, B, E)).astype(dtype)
    k = rng.standard_normal((S, B, 6)).astype(dtype)
    v = rng.standard_normal((S, B, 6)).astype(dtype)
    kpm = rng.random((B, S)) < 0.3
    kpm[:, 0] = False
    kpm[1] = True  # batch 1: every key is padding
    attn = np.zeros((L, S), bool)
    attn[2] = True  # query 2: no key, in every batch
    dead = np.zeros((B, L), bool)
    dead[1] = True
    dead[:, 2] = True
    out_p, w_p = pm(q, k, v, key_padding_mask=kpm, attn_mask=attn, average_attn_weights=False)
    out_t, w_t = run_torch(tm, q, k, v, key_padding_mask=kpm, attn_mask=attn,
                           average_attn_weights=False)
    out_p, out_t = out_p.swapaxes(0, 1), out_t.swapaxes(0, 1)  # (B, L, E)
    nan_rows = np.isnan(out_t).all(-1)
    np.testing.assert_array_equal(nan_rows, dead)  # torch: NaN exactly there
    assert not np.isnan(out_t[~dead]).any()
    assert np.isfinite(out_p).all() and np.isfinite(w_p).all()
    np.testing.assert_array_equal(out_p[dead], np.broadcast_to(pm.out_proj_bias,
                                                               out_p[dead].shape))
    np.testing.assert_allclose(out_p[~dead], out_t[~dead], **TOL[dtype])
    w_p, w_t = w_p.transpose(0, 2, 1, 3), w_t.transpose(0, 2, 1, 3)  # (B, L, H, S)
    assert np.isnan(w_t[dead]).all()
    assert (w_p[dead] == 0).all()
    np.testing.assert_allclose(w_p[~dead], w_t[~dead], **TOL[dtype])


# --------------------------------------------------------------------------
# state_dict, loading and initialisation
# --------------------------------------------------------------------------

@pytest.mark.parametrize("kv", [(None, None), (16, 16), (5, 16), (16, 7), (3, 9)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_state_dict_keys_and_shapes_match_torch(kv, bias):
    kdim, vdim = kv
    tm = torch_module(16, 4, bias, kdim, vdim, True, np.float32)
    pm = pyattn_module(16, 4, bias, kdim, vdim, True, np.float32, 0)
    t_sd, p_sd = tm.state_dict(), pm.state_dict()
    assert list(p_sd) == list(t_sd)
    for key in t_sd:
        assert p_sd[key].shape == tuple(t_sd[key].shape), key
        assert p_sd[key].dtype == np.float32
    # and either side loads the other's state_dict
    tm.load_state_dict(to_torch(p_sd))
    pm.load_state_dict(from_torch(tm.state_dict()))


def test_load_state_dict_accepts_torch_tensors():
    """CPU torch tensors are array-likes: load_state_dict takes them directly,
    casting float64 tensors to a float32 layer."""
    torch.manual_seed(0)
    tm = torch_module(12, 3, True, 5, 7, True, np.float64)
    pm = pyattn_module(12, 3, True, 5, 7, True, np.float32, 0)
    pm.load_state_dict(tm.state_dict())
    for key, val in tm.state_dict().items():
        got = pm.state_dict()[key]
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, val.numpy().astype(np.float32))


def test_load_state_dict_takes_lazily_negated_tensors():
    """A tensor with the negative bit (x.conj().imag, say) is a view NumPy
    cannot read: its values are loaded."""
    torch.manual_seed(0)
    state = dict(torch.nn.MultiheadAttention(8, 2, batch_first=True).state_dict())
    bias = torch.randn(8, dtype=torch.complex64).conj().imag
    assert bias.is_neg()
    state["out_proj.bias"] = bias
    pm = pyattn.MultiHeadAttention(8, 2)
    pm.load_state_dict(state)
    np.testing.assert_array_equal(pm.out_proj_bias, bias.resolve_neg().numpy())


@pytest.mark.parametrize("layer_dtype", [np.float32, np.float64], ids=["f32-layer", "f64-layer"])
@pytest.mark.parametrize("tensor_dtype", [torch.float32, torch.float64, torch.float16,
                                          torch.bfloat16], ids=str)
def test_load_state_dict_takes_torch_tensors_of_every_float_dtype(tensor_dtype, layer_dtype):
    """CPU tensors of each float dtype load into the layer's own dtype: their
    values rounded once (exact for float16 and bfloat16).  Parameters that
    require grad and non-contiguous tensors load too."""
    torch.manual_seed(0)
    tm = torch.nn.MultiheadAttention(12, 3, kdim=5, vdim=7, batch_first=True, dtype=tensor_dtype)
    params = dict(tm.named_parameters())
    assert params["in_proj_bias"].requires_grad
    params["q_proj_weight"] = params["q_proj_weight"].t().contiguous().t()
    assert not params["q_proj_weight"].is_contiguous()
    pm = pyattn.MultiHeadAttention(12, 3, kdim=5, vdim=7, dtype=layer_dtype, rng=0)
    pm.load_state_dict(params)
    assert pm.dtype == layer_dtype
    for key, got in pm.state_dict().items():
        assert got.dtype == layer_dtype, key
        np.testing.assert_array_equal(
            got, params[key].detach().double().numpy().astype(layer_dtype), err_msg=key)


@pytest.mark.parametrize("tensor_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_float8_tensors_load_exactly(tensor_dtype):
    """NumPy cannot read float8 tensors: they widen to float32 in torch,
    exactly, as bfloat16 does."""
    sd = {k: v.to(tensor_dtype) for k, v in torch_module(8, 2, True, None, None, True,
                                                         np.float32).state_dict().items()}
    pm = pyattn.MultiHeadAttention(8, 2, rng=0)
    pm.load_state_dict(sd)
    for key, got in pm.state_dict().items():
        np.testing.assert_array_equal(got, sd[key].float().numpy(), err_msg=key)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_unreadable_tensor_names_its_key_and_dtype():
    sd = pyattn.MultiHeadAttention(8, 2, rng=0).state_dict()
    sd["out_proj.bias"] = torch.zeros(8, dtype=torch.complex32)  # NumPy has no complex32
    with pytest.raises(ValueError, match=r"^state_dict\['out_proj.bias'\] \(a torch tensor of "
                                         r"dtype torch.complex32\) cannot be converted"):
        pyattn.MultiHeadAttention(8, 2, rng=0).load_state_dict(sd)


def test_bfloat16_tensors_load_without_ml_dtypes(monkeypatch):
    """Without ml_dtypes NumPy has no bfloat16: the tensors widen to float32
    in torch (exact), with the same result."""
    torch.manual_seed(0)
    sd = torch_module(8, 2, True, None, None, True, np.float32).to(torch.bfloat16).state_dict()
    with_ml_dtypes = pyattn.MultiHeadAttention(8, 2, rng=0)
    with_ml_dtypes.load_state_dict(sd)
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # its import now fails
    without = pyattn.MultiHeadAttention(8, 2, rng=1)
    without.load_state_dict(sd)
    for key, got in without.state_dict().items():
        np.testing.assert_array_equal(got, with_ml_dtypes.state_dict()[key], err_msg=key)


def test_bfloat16_torch_module_loads_and_matches_torch():
    """A bfloat16 torch module's state_dict loads into a float32 layer, which
    stays float32 (its inputs and outputs do): it holds the bfloat16 values,
    exactly those of a float32 state_dict rounded to bfloat16 with ml_dtypes,
    and its outputs and weights match torch's bfloat16 module within
    bfloat16's rounding (torch rounds at every step, pyattn computes in float32)."""
    bfloat16 = pytest.importorskip("ml_dtypes").bfloat16
    E, H = 64, 8
    torch.manual_seed(0)
    t32 = torch_module(E, H, True, None, None, True, np.float32)
    with torch.no_grad():
        t32.in_proj_bias.normal_(0, 0.5)
        t32.out_proj.bias.normal_(0, 0.5)
    t16 = torch_module(E, H, True, None, None, True, np.float32).to(torch.bfloat16)
    t16.load_state_dict(t32.state_dict())  # rounds to bfloat16 (to nearest even)
    pm = pyattn.MultiHeadAttention(E, H, rng=0)
    pm.load_state_dict(t16.state_dict())
    assert pm.dtype == np.float32
    rounded = {k: v.astype(bfloat16) for k, v in from_torch(t32.state_dict()).items()}
    for key, got in pm.state_dict().items():
        assert got.dtype == np.float32, key
        np.testing.assert_array_equal(got, rounded[key].astype(np.float32), err_msg=key)
    # the same from NumPy bfloat16 arrays
    from_numpy = pyattn.MultiHeadAttention(E, H, rng=1)
    from_numpy.load_state_dict(rounded)
    for key, got in from_numpy.state_dict().items():
        np.testing.assert_array_equal(got, pm.state_dict()[key], err_msg=key)

    x = np.random.default_rng(0).standard_normal((3, 7, E)).astype(bfloat16)
    tx = torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
    with torch.inference_mode():
        t_out, t_weights = (a.float().numpy() for a in t16(tx, tx, tx))
    out, weights = pm(x, x, x)
    assert out.dtype == weights.dtype == np.float32
    bf16_rounding = 2.0 ** -8  # relative, per rounding; torch's module rounds a few times
    np.testing.assert_allclose(out, t_out, rtol=0, atol=4 * bf16_rounding * np.abs(t_out).max())
    np.testing.assert_allclose(weights, t_weights, rtol=0, atol=4 * bf16_rounding)


def test_load_state_dict_refuses_tensors_off_the_cpu():
    """A tensor without host memory (meta here; CUDA alike) raises ValueError
    naming the key and the device; the layer is unchanged."""
    meta = torch.nn.MultiheadAttention(8, 2, batch_first=True, device="meta")
    pm = pyattn.MultiHeadAttention(8, 2, rng=0)
    before = pm.state_dict()
    with pytest.raises(ValueError, match=r"state_dict\['in_proj_weight'\] is a torch tensor on "
                                         r"the meta device; load CPU tensors .*\.cpu\(\)"):
        pm.load_state_dict(meta.state_dict())
    for key, value in pm.state_dict().items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)


def test_importing_pyattn_does_not_import_torch(helpers, tmp_path):
    """torch stays optional: tensors are recognised through sys.modules."""
    helpers.run_python("import sys, pyattn\n"
                       "assert 'torch' not in sys.modules, 'import pyattn imported torch'",
                       cwd=tmp_path)


def test_torch_to_pyattn_to_torch_round_trip():
    """torch weights -> pyattn -> a fresh torch module: identical outputs."""
    rng = np.random.default_rng(11)
    torch.manual_seed(11)
    src = torch_module(24, 6, True, None, None, True, np.float64)
    with torch.no_grad():
        src.in_proj_bias.copy_(torch.from_numpy(rng.standard_normal(72)))
        src.out_proj.bias.copy_(torch.from_numpy(rng.standard_normal(24)))
    pm = pyattn_module(24, 6, True, None, None, True, np.float64, 0)
    pm.load_state_dict(from_torch(src.state_dict()))
    dst = torch_module(24, 6, True, None, None, True, np.float64)
    dst.load_state_dict(to_torch(pm.state_dict()))
    x = rng.standard_normal((2, 5, 24))
    a = run_torch(src, x, x, x)
    b = run_torch(dst, x, x, x)
    c = pm(x, x, x)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(c[0], a[0], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(c[1], a[1], rtol=1e-10, atol=1e-10)


def init_bounds(E, kdim, vdim):
    """The bound of each uniform init, by torch's rules: xavier-uniform
    sqrt(6 / (fan_in + fan_out)) for the input projections (over the whole
    (3E, E) matrix when packed), kaiming-uniform(a=sqrt(5)) = 1/sqrt(E) for
    out_proj.weight, zero biases."""
    if kdim is None:
        return {"in_proj_weight": np.sqrt(6 / (E + 3 * E)), "out_proj.weight": 1 / np.sqrt(E)}
    return {"q_proj_weight": np.sqrt(6 / (E + E)), "k_proj_weight": np.sqrt(6 / (E + kdim)),
            "v_proj_weight": np.sqrt(6 / (E + vdim)), "out_proj.weight": 1 / np.sqrt(E)}


@pytest.mark.parametrize("kv", [(None, None), (32, 96)], ids=["packed", "separate"])
def test_init_follows_torch_rules(kv):
    E, H = 64, 8
    kdim, vdim = kv
    torch.manual_seed(0)
    t_sd = from_torch(torch_module(E, H, True, kdim, vdim, True, np.float64).state_dict())
    p_sd = pyattn_module(E, H, True, kdim, vdim, True, np.float64, 0).state_dict()
    assert list(p_sd) == list(t_sd)
    bounds = init_bounds(E, kdim, vdim)
    assert set(bounds) | {"in_proj_bias", "out_proj.bias"} == set(t_sd)
    for key in t_sd:
        assert p_sd[key].shape == t_sd[key].shape, key
        if key.endswith("bias"):
            assert not t_sd[key].any() and not p_sd[key].any(), key
            continue
        for name, sd in (("torch", t_sd), ("pyattn", p_sd)):
            w = sd[key]
            assert np.abs(w).max() <= bounds[key], (name, key)  # the rule holds for both
            assert np.abs(w).max() > 0.9 * bounds[key], (name, key)
            np.testing.assert_allclose(w.std(), bounds[key] / np.sqrt(3), rtol=0.15,
                                       err_msg=f"{name} {key}")
    # not the same values: pyattn draws from NumPy, not torch's generator
    assert not np.allclose(p_sd["out_proj.weight"], t_sd["out_proj.weight"])

