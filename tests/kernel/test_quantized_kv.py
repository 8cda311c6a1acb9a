"""Quantized keys and values, int8 and float8_e4m3fn (issue 17): the kernels
read QuantizedKV in place, dequantizing each row in registers, so they must
compute what the float32 kernels compute on the dequantized K/V (to 1e-5,
the issue's bar: they sum each group's products before they scale them, so
the rounding differs), and agree with pyattn.reference on them to float32
rounding; on every path (direct, split-KV, GQA rows, tiled) and with every
score modifier.  Also the compiled quantizers against the NumPy oracles,
KVCache(dtype=...), the container's checks, and the registry's fallback for
sets without quantized kernels."""
from unittest import mock

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import USABLE_KERNELS, random_mask

import pyattn
from pyattn import QuantizedKV, _attention, _dispatch
from pyattn import reference as ref

# the sets that have run quantized K/V on a CPU of theirs
QUANTIZED_SETS = ("avx512_bf16", "avx512", "avx2", "baseline")
FORMATS = ("int8", "float8_e4m3fn")
ORACLES = {"int8": ref.quantize_int8, "float8_e4m3fn": ref.quantize_float8_e4m3fn}


def quantized(rng, shape, group=32, scale=1.0, dtype="int8"):
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    return QuantizedKV.quantize(x, group, dtype=dtype)


def assert_matches_dequantized(got, f32):
    """The quantized result against float32's on the dequantized K/V: 1e-5 relative
    to the output's size (an lse of -inf, a row with no key, must match exactly)."""
    size = np.abs(f32[np.isfinite(f32)]).max(initial=1.0)
    np.testing.assert_allclose(got, f32, rtol=1e-5, atol=1e-5 * size)


def both(q, k, v, **kw):
    """(quantized result, float32 result on the dequantized K/V, reference's)."""
    got = pyattn.scaled_dot_product_attention(q, k, v, **kw)
    kd, vd = k.dequantize(), v.dequantize()
    return (got, pyattn.scaled_dot_product_attention(q, kd, vd, **kw),
            ref.scaled_dot_product_attention(q, kd, vd, **kw))


@st.composite
def calls(draw):
    """A call on quantized K/V: shapes that take the direct path (L < MR),
    the tiled one, GQA heads as rows and split-KV, with random modifiers."""
    hkv = draw(st.integers(1, 3))
    group = draw(st.integers(1, 4))
    L = draw(st.sampled_from([1, 2, 3, 7, 9, 20]))
    S = draw(st.sampled_from([1, 5, 64, 129, 300, 2100]))
    D = draw(st.sampled_from([32, 64, 96, 128, 12]))
    gk = draw(st.sampled_from([g for g in (32, 64, D) if D % g == 0]))
    gv = draw(st.sampled_from([g for g in (32, 64, D) if D % g == 0]))
    B = draw(st.integers(1, 2))
    dtype = draw(st.sampled_from(FORMATS))
    kw = {"enable_gqa": True}
    if draw(st.booleans()):
        kw["is_causal"] = True
        kw["alignment"] = draw(st.sampled_from(["top_left", "lower_right"]))
    if draw(st.booleans()):
        kw["window"] = (draw(st.integers(0, 40)), draw(st.one_of(st.none(), st.integers(0, 5))))
    if draw(st.booleans()):
        kw["softcap"] = draw(st.sampled_from([2.0, 30.0]))
    mods = draw(st.sets(st.sampled_from(["alibi", "sinks", "lengths", "mask", "lse"])))
    return dict(B=B, H=hkv * group, Hkv=hkv, L=L, S=S, D=D, gk=gk, gv=gv, kw=kw, mods=mods,
                dtype=dtype,
                seed=draw(st.integers(0, 2**32 - 1)))


@pytest.mark.parametrize("isa", USABLE_KERNELS)
@given(case=calls())
def test_quantized_equals_float32_on_the_dequantized_kv(helpers, isa, case):
    rng = np.random.default_rng(case["seed"])
    B, H, Hkv, L, S, D = (case[n] for n in ("B", "H", "Hkv", "L", "S", "D"))
    q = rng.standard_normal((B, H, L, D)).astype(np.float32)
    k = quantized(rng, (B, Hkv, S, D), case["gk"], dtype=case["dtype"])
    v = quantized(rng, (B, Hkv, S, D), case["gv"], scale=3.0, dtype=case["dtype"])
    kw = dict(case["kw"])
    mods = case["mods"]
    if "alibi" in mods:
        kw["alibi_slopes"] = rng.random(H) * 0.1
    if "sinks" in mods:
        kw["sinks"] = rng.standard_normal(H)
    if "lengths" in mods:
        kw["kv_lengths"] = rng.integers(0, S + 1, B)
        kw["q_lengths"] = rng.integers(0, L + 1, B)
    if "mask" in mods:
        kw["attn_mask"] = random_mask(rng, "bool", (L, S), np.float32)
    if "lse" in mods:
        kw["return_lse"] = True
    with mock.patch.object(_dispatch, "KERNEL", isa):
        got, f32, expected = both(q, k, v, **kw)
    # scores as large as q.k and the ALiBi bias make the tolerance
    bound = helpers.score_bound(q, k.dequantize()) + 0.1 * (L + S) * ("alibi" in mods)
    for g, f, e in zip(*(r if isinstance(r, tuple) else (r,) for r in (got, f32, expected))):
        assert g.dtype == np.float32
        assert_matches_dequantized(g, f)
        helpers.assert_close(g, f, score_bound=bound)
        helpers.assert_close(g, e, score_bound=bound)


@pytest.mark.parametrize("dtype", FORMATS)
@pytest.mark.parametrize("H,Hkv,L,S,split", [(32, 32, 1, 4096, False), (32, 8, 1, 8192, True),
                                             (8, 2, 3, 2048, True), (4, 4, 40, 600, False)])
def test_paths_decode_split_gqa_tiled(kernel, rng, helpers, spy_split, H, Hkv, L, S, split,
                                      dtype):
    """The shapes of the issue's decode benchmarks (split-KV, GQA read once)
    and a prefill chunk (tiled), at head_dim 128."""
    q = rng.standard_normal((1, H, L, 128)).astype(np.float32)
    k, v = (quantized(rng, (1, Hkv, S, 128), dtype=dtype) for _ in "kv")
    records = []
    _attention.record_problems(records)
    try:
        got, f32, expected = both(q, k, v, enable_gqa=True, is_causal=True,
                                  alignment="lower_right")
    finally:
        _attention.record_problems(None)
    assert_matches_dequantized(got, f32)
    helpers.assert_close(got, expected)
    if L == 1 and H != Hkv:  # heads as rows: each key/value head once, g rows
        assert records[0][1:3] == (Hkv, H // Hkv)
    assert (spy_split[0] > 0) is split


@pytest.mark.parametrize("dtype", FORMATS)
def test_strided_and_broadcast_views(kernel, rng, dtype):
    """Data read through strides (the direct path gathers such rows, the
    tiled path packs them) and scales that are views, not copies."""
    big = quantized(rng, (2, 3, 400, 128), dtype=dtype)
    data = big.data[:, :, ::2]  # every other key
    k = QuantizedKV(data, big.scales[:, :, ::2], 32)
    t = quantized(rng, (2, 3, 128, 200), group=200, dtype=dtype)  # D = 200, read transposed
    v = QuantizedKV(np.swapaxes(t.data, -1, -2)[:, :, :, :128], np.zeros((2, 3, 200, 1),
                    np.float16) + np.float16(0.01), 128)
    for L in (1, 30):
        q = rng.standard_normal((2, 3, L, 128)).astype(np.float32)
        got = pyattn.scaled_dot_product_attention(q, k, v)
        f32 = pyattn.scaled_dot_product_attention(q, k.dequantize(), v.dequantize())
        assert_matches_dequantized(got, f32)


@pytest.mark.parametrize("dtype", FORMATS)
def test_decode_of_a_quantized_cache_is_float32_decode_of_its_dequantize(kernel, rng, dtype):
    cache = pyattn.KVCache(2, 4, 128, dtype=dtype)
    for n in (5, 1, 300):
        cache.append(rng.standard_normal((2, 4, n, 128)), rng.standard_normal((2, 4, n, 128)),
                     lengths=[n, n // 2])
    q = rng.standard_normal((2, 8, 1, 128)).astype(np.float32)
    kd, vd = cache.dequantize()
    plain = pyattn.KVCache(2, 4, 128)
    plain.append(kd, vd)
    plain.truncate(cache.lengths)
    for kw in ({}, {"window": 64}, {"return_lse": True}):
        got = pyattn.decode_attention(q, cache, **kw)
        want = pyattn.decode_attention(q, plain, **kw)
        for g, w in zip(*(r if isinstance(r, tuple) else (r,) for r in (got, want))):
            assert_matches_dequantized(g, w)


# --------------------------------------------------------------------------
# The quantizer and the cache
# --------------------------------------------------------------------------

@given(x=st.lists(st.floats(-1e6, 1e6, width=32), min_size=64, max_size=64),
       scale=st.sampled_from([1e-30, 1e-7, 1.0, 8.0]), group=st.sampled_from([32, 64]),
       dtype=st.sampled_from(FORMATS))
def test_compiled_quantizer_is_the_oracle_bit_for_bit(x, scale, group, dtype):
    a = (np.array(x, np.float32) * np.float32(scale)).reshape(1, 64)
    data, scales = ORACLES[dtype](a, group)
    got = QuantizedKV.quantize(a, group, dtype=dtype)
    assert got.dtype == data.dtype
    np.testing.assert_array_equal(got.data.view(np.uint8), data.view(np.uint8))
    np.testing.assert_array_equal(got.scales.view(np.uint16), scales.view(np.uint16))
    np.testing.assert_array_equal(got.dequantize(), ref.dequantize(data, scales))


@pytest.mark.parametrize("dtype", FORMATS)
@pytest.mark.parametrize("bad,match", [(np.nan, "finite"), (np.inf, "finite"),
                                       ("huge", "overflows float16")])
def test_quantizer_errors_name_the_argument(bad, match, dtype):
    x = np.zeros((2, 1, 3, 32), np.float32)
    x[1, 0, 2, 5] = 65504.0 * ref.LARGEST[dtype] * 1.01 if bad == "huge" else bad
    with pytest.raises(ValueError, match=f"^x .*{match}"):
        QuantizedKV.quantize(x, dtype=dtype)
    cache = pyattn.KVCache(2, 1, 32, dtype=dtype)
    with pytest.raises(ValueError, match=f"^v_new .*{match}"):
        cache.append(np.zeros_like(x), x)
    assert cache.lengths.tolist() == [0, 0]  # refused whole


@pytest.mark.parametrize("dtype", FORMATS)
def test_quantized_cache_append_truncate_grow_and_nbytes(rng, dtype):
    cache = pyattn.KVCache(3, 2, 128, dtype=dtype, group_size=64)
    requantized = lambda x: ref.dequantize(*ORACLES[dtype](x.astype(np.float32), 64))  # noqa: E731
    oracle_k, oracle_v = [[] for _ in range(3)], [[] for _ in range(3)]
    for step in range(12):  # past the initial 256 positions: growth keeps the contents
        n = int(rng.integers(30, 80))
        lengths = rng.integers(n // 2, n + 1, 3)
        k, v = rng.standard_normal((3, 2, n, 128)), rng.standard_normal((3, 2, n, 128))
        cache.append(k, v, lengths=lengths)
        for b in range(3):
            oracle_k[b].append(k[b, :, :lengths[b]])
            oracle_v[b].append(v[b, :, :lengths[b]])
        if step == 6:
            cache.truncate([5, 0, 1000])
            for b, keep in enumerate([5, 0, 1000]):
                oracle_k[b] = [np.concatenate(oracle_k[b], axis=1)[:, :keep]]
                oracle_v[b] = [np.concatenate(oracle_v[b], axis=1)[:, :keep]]
    kd, vd = cache.dequantize()
    assert kd.dtype == vd.dtype == np.float32
    for b in range(3):
        want_k = np.concatenate(oracle_k[b], axis=1)
        n = want_k.shape[1]
        assert cache.lengths[b] == n
        np.testing.assert_array_equal(kd[b, :, :n], requantized(want_k))
        np.testing.assert_array_equal(vd[b, :, :n], requantized(np.concatenate(oracle_v[b],
                                                                              axis=1)))
    assert cache.capacity >= cache.lengths.max() > 256
    # one-byte keys and values, and 2 float16 scales per row of 128 channels each
    assert cache.nbytes == 3 * 2 * cache.capacity * (128 + 2 * 2) * 2
    # by default int8 has 4 scales per row (0.27x), float8 one (0.254x)
    assert pyattn.KVCache(1, 32, 128, dtype=dtype).nbytes <= {"int8": 0.28, "float8_e4m3fn": 0.26}[
        dtype] * pyattn.KVCache(1, 32, 128).nbytes
    cache.reset()
    assert cache.lengths.tolist() == [0, 0, 0]
    assert cache.keys.shape == (3, 2, 0, 128)


@pytest.mark.parametrize("dtype", FORMATS)
def test_quantized_cache_refuses_other_queries_and_group_sizes(dtype):
    cache = pyattn.KVCache(1, 2, 64, dtype=dtype)
    cache.append(np.ones((1, 2, 3, 64)), np.ones((1, 2, 3, 64)))
    with pytest.raises(TypeError, match="^query must be float32 with quantized key and value"):
        pyattn.decode_attention(np.ones((1, 2, 1, 64)), cache)
    with pytest.raises(ValueError, match="^group_size must be 32, 64 or D = 48"):
        pyattn.KVCache(1, 1, 48, dtype=dtype, group_size=64)
    # the default group (set by head_dim) must suit value_dim too: else ask for one
    with pytest.raises(ValueError, match="default group_size, .* does not suit value_dim "
                                         "\\(40\\): pass group_size"):
        pyattn.KVCache(1, 1, 64, value_dim=40, dtype=dtype)
    assert pyattn.KVCache(1, 1, 64, value_dim=32, dtype=dtype, group_size=32).group_size == 32
    # a head_dim 32 does not divide (80, as Phi-2's heads) is scaled by whole rows
    assert pyattn.KVCache(1, 1, 40, dtype=dtype).group_size == 40
    assert pyattn.KVCache(1, 1, 80, dtype=dtype).group_size == 80
    assert pyattn.QuantizedKV.quantize(np.ones((2, 80)), dtype=dtype).group_size == 80
    with pytest.raises(ValueError, match="^group_size is for quantized"):
        pyattn.KVCache(1, 1, 64, group_size=32)
    with pytest.raises(TypeError, match="^dequantize\\(\\) is for quantized caches"):
        pyattn.KVCache(1, 1, 64).dequantize()


# --------------------------------------------------------------------------
# The container's checks
# --------------------------------------------------------------------------

GOOD_DATA = np.zeros((2, 5, 64), np.int8)
FLOAT8 = np.dtype(ml_dtypes.float8_e4m3fn)
GOOD_SCALES = np.ones((2, 5, 2), np.float16)


@pytest.mark.parametrize("args,error,match", [
    ((GOOD_DATA.astype(np.int16), GOOD_SCALES), TypeError, "^data must be an array of int8 or "
                                                           "float8_e4m3fn"),
    ((GOOD_DATA.view(np.uint8), GOOD_SCALES), TypeError, "^data must be an array of int8"),
    ((np.full((2, 5, 64), 0x7f, np.uint8).view(FLOAT8), GOOD_SCALES, 32), ValueError,
     "^data must hold no NaN"),
    ((np.full((2, 5, 64), 0xff, np.uint8).view(FLOAT8), GOOD_SCALES, 32), ValueError,
     "^data must hold no NaN"),
    ((GOOD_DATA.view(FLOAT8), GOOD_SCALES), ValueError,  # float8's default: one scale per row
     r"^scales must have shape \(2, 5, 1\)"),
    ((GOOD_DATA, GOOD_SCALES.astype(np.float32)), TypeError, "^scales must be a float16"),
    ((GOOD_DATA[0, 0], GOOD_SCALES[0, 0]), ValueError, "^data must have at least 2"),
    ((GOOD_DATA, GOOD_SCALES[:, :4]), ValueError, r"^scales must have shape \(2, 5, 2\)"),
    ((GOOD_DATA, GOOD_SCALES, 48), ValueError, "^group_size must be 32, 64 or D = 64"),
    ((GOOD_DATA, GOOD_SCALES, 2.0), TypeError, "^group_size must be an int"),
    ((GOOD_DATA, np.where(np.arange(2) == 1, np.float16(np.nan), GOOD_SCALES)), ValueError,
     "^scales must be finite and non-negative"),
    ((GOOD_DATA, np.full((2, 5, 2), np.inf, np.float16)), ValueError, "^scales must be finite"),
    ((GOOD_DATA, -GOOD_SCALES), ValueError, "^scales must be finite and non-negative"),
    ((None, GOOD_SCALES), TypeError, "^data must be an array of int8 or float8_e4m3fn "
                                     r"\(with ml_dtypes\), got None"),
])
def test_container_checks_name_the_argument(args, error, match):
    with pytest.raises(error, match=match):
        QuantizedKV(*args)


def test_calls_with_quantized_kv_check_their_partners():
    kv = QuantizedKV(GOOD_DATA, GOOD_SCALES, 32)
    q = np.ones((2, 1, 64), np.float32)
    with pytest.raises(TypeError, match="^key and value must both be pyattn.QuantizedKV or both "
                                        "arrays; got key QuantizedKV and value ndarray"):
        pyattn.scaled_dot_product_attention(q, kv, np.ones((2, 5, 64), np.float32))
    with pytest.raises(TypeError, match="^query must be float32 with quantized key and value"):
        pyattn.scaled_dot_product_attention(q.astype(np.float16), kv, kv)
    with pytest.raises(ValueError, match="^query and key must have the same last dimension"):
        pyattn.scaled_dot_product_attention(np.ones((2, 1, 32), np.float32), kv, kv)
    float8 = QuantizedKV(GOOD_DATA.view(FLOAT8), GOOD_SCALES, 32)
    with pytest.raises(TypeError, match="^quantized key and value must share one storage dtype; "
                                        "got key int8 and value float8_e4m3fn"):
        pyattn.scaled_dot_product_attention(q, kv, float8)
    other = QuantizedKV(np.zeros((2, 6, 64), np.int8), np.ones((2, 6, 2), np.float16), 32)
    with pytest.raises(ValueError, match="^key and value must have the same sequence length"):
        pyattn.scaled_dot_product_attention(q, kv, other)
    # int8 arrays are not float arrays: the kv_only dtype stays out of the float API
    with pytest.raises(TypeError, match="^query has dtype int8"):
        pyattn.scaled_dot_product_attention(GOOD_DATA, GOOD_DATA, GOOD_DATA)


# --------------------------------------------------------------------------
# Which sets run quantized K/V: the hardware rule and the registry's fallback
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FORMATS)
def test_only_the_sets_that_ran_quantized_kv_have_it(dtype):
    for name in _attention.kernel_names():
        assert _attention.has_dtype(name, dtype) is (name in QUANTIZED_SETS), name


@pytest.mark.parametrize("dtype", FORMATS)
def test_sets_without_quantized_kv_fall_back_to_the_best_usable_set_below(dtype):
    names = _attention.kernel_names()
    for i, name in enumerate(names):
        below = [n for n in names[i:] if _attention.has_dtype(n, dtype)
                 and _attention.cpu_supports(n)]
        assert _attention.kernel_for_dtype(name, dtype) == below[0], name
        # the float dtypes never move
        assert _attention.kernel_for_dtype(name, "float32") == name


def test_show_config_names_the_quantized_set():
    """One name for both formats: a set enables them together (QUANTIZED_KV)."""
    name = pyattn.config()["quantized_kernel"]
    assert name in QUANTIZED_SETS
    assert name == _attention.kernel_for_dtype(_dispatch.KERNEL, "int8") == \
        _attention.kernel_for_dtype(_dispatch.KERNEL, "float8_e4m3fn")


@pytest.mark.parametrize("isa", USABLE_KERNELS)
def test_pyattn_isa_caps_the_quantized_set(helpers, tmp_path, isa):
    code = "import pyattn; print(pyattn.config()['quantized_kernel'])"
    out = helpers.run_python(code, cwd=tmp_path, PYATTN_ISA=isa).stdout.split()[-1]
    assert out == _attention.kernel_for_dtype(isa, "int8")
    assert out in USABLE_KERNELS[USABLE_KERNELS.index(isa):]  # that set or one below it


@pytest.mark.parametrize("dtype", FORMATS)
def test_quantized_kv_plans_as_float32(dtype):
    """The quantized kernels' block rows are float32's on the set that runs
    them: the same work items, split and merge, which the comparisons above
    rely on."""
    for isa in USABLE_KERNELS:
        runs = _attention.kernel_for_dtype(isa, dtype)
        assert _attention.block_rows(isa, dtype) == _attention.block_rows(runs, "float32")


@pytest.mark.parametrize("dtype", FORMATS)
def test_an_empty_store_dequantizes_to_empty_rows(dtype):
    """An empty cache (before its first append) and S = 0 data dequantize
    to (..., 0, D), as the kernels read them."""
    keys, values = pyattn.KVCache(1, 2, 64, dtype=dtype).dequantize()
    assert keys.shape == values.shape == (1, 2, 0, 64) and keys.dtype == np.float32
    empty = QuantizedKV.quantize(np.zeros((2, 0, 64)), dtype=dtype)
    assert empty.dequantize().shape == (2, 0, 64)
    q = np.ones((2, 1, 64), np.float32)
    np.testing.assert_array_equal(pyattn.scaled_dot_product_attention(q, empty, empty), 0)
    np.testing.assert_array_equal(ref.scaled_dot_product_attention(q, empty, empty), 0)
