"""Every input rule: the exception type, and a message that names the argument
and the shapes (or values) at fault.  pyattn and its NumPy reference share the
rules, so each test runs against both."""
import re

import numpy as np
import pytest

import pyattn
from pyattn import reference as ref
from pyattn._validation import cpu_count


@pytest.fixture(params=["pyattn", "reference"])
def sdpa(request):
    return {"pyattn": pyattn.scaled_dot_product_attention,
            "reference": ref.scaled_dot_product_attention}[request.param]


def f32(*shape):
    return np.ones(shape, np.float32)


def esc(obj):
    """The regex matching str(obj) literally (shapes are tuples)."""
    return re.escape(str(obj))


# --------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------

BAD_DTYPES = {
    "int64": np.ones((2, 3), np.int64),
    "int32": np.ones((2, 3), np.int32),
    "uint8": np.ones((2, 3), np.uint8),
    "bool": np.ones((2, 3), bool),
    "complex128": np.ones((2, 3), np.complex128),
    "complex64": np.ones((2, 3), np.complex64),
    "longdouble": np.ones((2, 3), np.longdouble),
    "object": np.array([[1.0, 2.0, 3.0], [4.0, 5.0, None]], dtype=object),
    "str": np.array([["a", "b", "c"], ["d", "e", "f"]]),
    "int_list": [[1, 2, 3], [4, 5, 6]],
}


@pytest.mark.parametrize("which", ["query", "key", "value"])
@pytest.mark.parametrize("bad", list(BAD_DTYPES))
def test_unsupported_dtype_is_type_error(sdpa, bad, which):
    args = {"query": f32(2, 3), "key": f32(2, 3), "value": f32(2, 3)}
    args[which] = BAD_DTYPES[bad]
    dtype = np.asarray(BAD_DTYPES[bad]).dtype
    match = rf"{which} has dtype {esc(dtype)}.*float32, float64, float16"
    with pytest.raises(TypeError, match=match):
        sdpa(args["query"], args["key"], args["value"])


@pytest.mark.parametrize("dtypes", [(np.float32, np.float64, np.float64),
                                    (np.float64, np.float32, np.float64),
                                    (np.float64, np.float64, np.float32)])
def test_mixed_float_dtypes_are_type_error(sdpa, dtypes):
    q, k, v = (np.ones((4, 3), d) for d in dtypes)
    names = [np.dtype(d).name for d in dtypes]
    with pytest.raises(TypeError, match=(rf"share one dtype.*query {names[0]}, "
                                         rf"key {names[1]}, value {names[2]}")):
        sdpa(q, k, v)


def test_none_input_is_type_error(sdpa):
    with pytest.raises(TypeError, match="key must be an array of float32, float64, .*got None"):
        sdpa(f32(2, 3), None, f32(2, 3))


def test_ragged_input_is_value_error(sdpa):
    with pytest.raises(ValueError, match="value cannot be converted to an array"):
        sdpa(f32(2, 3), f32(2, 3), [[1.0, 2.0, 3.0], [1.0]])


# --------------------------------------------------------------------------
# shapes
# --------------------------------------------------------------------------

@pytest.mark.parametrize("which,shape", [("query", (4,)), ("query", ()), ("key", (3,)),
                                         ("value", (3,)), ("value", ())])
def test_fewer_than_two_dims_is_value_error(sdpa, which, shape):
    args = {"query": f32(2, 3), "key": f32(2, 3), "value": f32(2, 3)}
    args[which] = f32(*shape)
    with pytest.raises(ValueError, match=rf"{which} must have at least 2 dimensions.*"
                                         rf"got shape {esc(shape)}"):
        sdpa(args["query"], args["key"], args["value"])


def test_mismatched_head_dim_is_value_error(sdpa):
    with pytest.raises(ValueError, match=(rf"query and key .* last dimension E.*query "
                                          rf"{esc((2, 4, 5, 8))} and key {esc((2, 4, 6, 7))}")):
        sdpa(f32(2, 4, 5, 8), f32(2, 4, 6, 7), f32(2, 4, 6, 8))


def test_zero_head_dim_is_value_error(sdpa):
    with pytest.raises(ValueError, match=rf"head dimension E must be at least 1.*"
                                         rf"query {esc((2, 5, 0))}"):
        sdpa(f32(2, 5, 0), f32(2, 6, 0), f32(2, 6, 3))


def test_mismatched_sequence_length_is_value_error(sdpa):
    with pytest.raises(ValueError, match=(rf"key and value .* sequence length S.*key "
                                          rf"{esc((2, 3, 6, 8))} and value {esc((2, 3, 7, 8))}")):
        sdpa(f32(2, 3, 5, 8), f32(2, 3, 6, 8), f32(2, 3, 7, 8))


def test_non_broadcastable_batch_is_value_error(sdpa):
    with pytest.raises(ValueError, match=(rf"batch dimensions of query {esc((2,))}, "
                                          rf"key {esc((3,))} and value {esc((3,))}.*broadcast")):
        sdpa(f32(2, 4, 5, 8), f32(3, 4, 6, 8), f32(3, 4, 6, 8))
    with pytest.raises(ValueError, match=(rf"query {esc((2, 3))}, key {esc((2, 1))} and "
                                          rf"value {esc((4, 3))}")):
        sdpa(f32(2, 3, 1, 5, 8), f32(2, 1, 1, 6, 8), f32(4, 3, 1, 6, 8))


def test_key_value_heads_differ_is_value_error(sdpa):
    with pytest.raises(ValueError, match=r"key and value .* same number of heads.* 2 and 3"):
        sdpa(f32(6, 5, 8), f32(2, 6, 8), f32(3, 6, 8), enable_gqa=True)


def test_heads_differ_without_gqa_is_value_error(sdpa):
    with pytest.raises(ValueError, match=r"query has 8 heads and key/value have 2.*enable_gqa"):
        sdpa(f32(1, 8, 5, 4), f32(1, 2, 6, 4), f32(1, 2, 6, 4))
    # Not a multiple: no suggestion to enable GQA.
    with pytest.raises(ValueError, match=r"query has 6 heads and key/value have 4") as info:
        sdpa(f32(6, 5, 4), f32(4, 6, 4), f32(4, 6, 4))
    assert "enable_gqa" not in str(info.value)


@pytest.mark.parametrize("hq,hkv", [(6, 4), (8, 3), (2, 4)])
def test_gqa_heads_not_a_multiple_is_value_error(sdpa, hq, hkv):
    with pytest.raises(ValueError, match=rf"enable_gqa=True.*Hq={hq}.*multiple.*Hkv={hkv}"):
        sdpa(f32(hq, 5, 4), f32(hkv, 6, 4), f32(hkv, 6, 4), enable_gqa=True)


# --------------------------------------------------------------------------
# attn_mask
# --------------------------------------------------------------------------

@pytest.mark.parametrize("mask_shape", [(6, 6), (5, 7), (3, 5, 6), (3, 1, 1, 1), (5, 1, 1)])
def test_mask_not_broadcastable_is_value_error(sdpa, mask_shape):
    # scores (..., Hq, L, S) = (2, 2, 5, 6)
    with pytest.raises(ValueError, match=(rf"attn_mask of shape {esc(mask_shape)} does not "
                                          rf"broadcast.*{esc((2, 2, 5, 6))}")):
        sdpa(f32(2, 2, 5, 3), f32(2, 2, 6, 3), f32(2, 2, 6, 3), attn_mask=f32(*mask_shape) > 0)


def test_mask_with_more_dims_than_scores_is_value_error(sdpa):
    with pytest.raises(ValueError, match=(rf"attn_mask of shape {esc((1, 1, 5, 6))} has more "
                                          rf"dimensions than the scores.*{esc((1, 5, 6))}")):
        sdpa(f32(5, 3), f32(6, 3), f32(6, 3), attn_mask=np.zeros((1, 1, 5, 6), np.float32))


@pytest.mark.parametrize("dtype", [np.int64, np.int8, np.uint8, np.complex64, object])
def test_mask_of_non_bool_non_float_dtype_is_type_error(sdpa, dtype):
    mask = np.zeros((5, 6), dtype)
    with pytest.raises(TypeError, match=rf"attn_mask has dtype {esc(mask.dtype)}.*bool.*float"):
        sdpa(f32(5, 3), f32(6, 3), f32(6, 3), attn_mask=mask)


def test_mask_int_list_is_type_error(sdpa):
    with pytest.raises(TypeError, match="attn_mask has dtype int"):
        sdpa(f32(2, 3), f32(2, 3), f32(2, 3), attn_mask=[[1, 0], [0, 1]])


# --------------------------------------------------------------------------
# scale
# --------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf"), np.float32("nan"),
                                   np.float64("inf")])
def test_non_finite_scale_is_value_error(sdpa, scale):
    with pytest.raises(ValueError, match=rf"scale must be finite, got {esc(float(scale))}"):
        sdpa(f32(2, 3), f32(2, 3), f32(2, 3), scale=scale)


@pytest.mark.parametrize("scale", ["0.5", True, 1j, [0.5], np.array([0.5, 0.5])])
def test_non_real_scale_is_type_error(sdpa, scale):
    with pytest.raises(TypeError, match=rf"scale must be a real number or None, got "
                                        rf"{type(scale).__name__}"):
        sdpa(f32(2, 3), f32(2, 3), f32(2, 3), scale=scale)


def test_integer_scale_beyond_float_range_is_value_error(sdpa):
    with pytest.raises(ValueError, match="scale must be finite"):
        sdpa(f32(2, 3), f32(2, 3), f32(2, 3), scale=10**400)


# --------------------------------------------------------------------------
# flags
# --------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["is_causal", "enable_gqa"])
@pytest.mark.parametrize("value", [np.array([True, False]), "yes", 1, None])
def test_non_bool_flag_is_type_error(sdpa, flag, value):
    with pytest.raises(TypeError, match=rf"{flag} must be a bool, got {type(value).__name__}"):
        sdpa(f32(2, 3), f32(2, 3), f32(2, 3), **{flag: value})


# --------------------------------------------------------------------------
# num_threads
# --------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1025, 50_000, 2**31, 2**70])
def test_num_threads_above_the_limit_is_value_error(sdpa, n):
    with pytest.raises(ValueError, match=rf"num_threads must be at most 1024; got {n}"):
        sdpa(f32(2, 3), f32(2, 3), f32(2, 3), num_threads=n)


@pytest.mark.parametrize("n", [0, -cpu_count() - 1, -10**6])
def test_num_threads_out_of_range_is_value_error(sdpa, n):
    ncpu = cpu_count()
    with pytest.raises(ValueError, match=(rf"num_threads must be a positive int.*"
                                          rf"\[-{ncpu}, -1\].*{ncpu} CPUs; got {n}")):
        sdpa(f32(2, 3), f32(2, 3), f32(2, 3), num_threads=n)


@pytest.mark.parametrize("n", [1.0, 2.5, True, False, "2", np.float64(2)])
def test_num_threads_not_an_int_is_type_error(sdpa, n):
    with pytest.raises(TypeError, match=rf"num_threads must be an int or None, got "
                                        rf"{type(n).__name__}"):
        sdpa(f32(2, 3), f32(2, 3), f32(2, 3), num_threads=n)


# --------------------------------------------------------------------------
# out
# --------------------------------------------------------------------------

def test_out_wrong_shape_is_value_error(sdpa):
    with pytest.raises(ValueError, match=rf"out has shape {esc((2, 5, 4))}; the result has "
                                         rf"shape {esc((2, 5, 3))}"):
        sdpa(f32(2, 5, 4), f32(2, 6, 4), f32(2, 6, 3), out=f32(2, 5, 4))
    # A broadcastable but different shape is still wrong.
    with pytest.raises(ValueError, match=rf"out has shape {esc((1, 2, 5, 3))}"):
        sdpa(f32(2, 5, 4), f32(2, 6, 4), f32(2, 6, 3), out=f32(1, 2, 5, 3))


def test_out_wrong_dtype_is_type_error(sdpa):
    with pytest.raises(TypeError, match="out has dtype float64; the result has dtype float32"):
        sdpa(f32(5, 4), f32(6, 4), f32(6, 3), out=np.zeros((5, 3)))


def test_out_not_an_ndarray_is_type_error(sdpa):
    with pytest.raises(TypeError, match="out must be a numpy.ndarray, got list"):
        sdpa(f32(1, 1), f32(1, 1), f32(1, 1), out=[[0.0]])


def test_out_read_only_is_value_error(sdpa):
    out = f32(5, 3)
    out.setflags(write=False)
    with pytest.raises(ValueError, match="out is read-only"):
        sdpa(f32(5, 4), f32(6, 4), f32(6, 3), out=out)
    with pytest.raises(ValueError, match="out is read-only"):
        sdpa(f32(5, 4), f32(6, 4), f32(6, 3), out=np.broadcast_to(f32(1, 3), (5, 3)))


@pytest.mark.parametrize("name", ["query", "key", "value", "attn_mask"])
def test_out_overlapping_an_input_is_value_error(sdpa, name):
    buf = np.random.default_rng(0).standard_normal((4, 6, 3)).astype(np.float32)
    args = {"query": f32(5, 3), "key": f32(6, 3), "value": f32(6, 3), "attn_mask": f32(5, 6)}
    args[name] = buf[0] if name != "query" else buf[0, :5]
    if name == "attn_mask":
        args[name] = buf.reshape(-1)[:30].reshape(5, 6)
    out = buf[0, 1:, :] if name != "attn_mask" else buf[1, :5, :]  # overlaps the input
    assert np.shares_memory(out, args[name])
    before = buf.copy()
    with pytest.raises(ValueError, match=rf"out overlaps {name} in memory"):
        sdpa(args["query"], args["key"], args["value"], attn_mask=args["attn_mask"], out=out)
    assert np.array_equal(buf, before)


def test_out_identical_to_query_is_value_error(sdpa):
    q = f32(5, 3)
    with pytest.raises(ValueError, match="out overlaps query"):
        sdpa(q, f32(6, 3), f32(6, 3), out=q)


# --------------------------------------------------------------------------
# A failed call writes nothing
# --------------------------------------------------------------------------

FAILING_CALLS = {
    "dtype": (dict(query=np.ones((5, 4), np.int64)), TypeError),
    "mixed_dtype": (dict(key=np.ones((6, 4), np.float64)), TypeError),
    "head_dim": (dict(key=f32(6, 5)), ValueError),
    "seq_len": (dict(value=f32(7, 3)), ValueError),
    "mask_shape": (dict(attn_mask=np.ones((4, 6), bool)), ValueError),
    "mask_dtype": (dict(attn_mask=np.ones((5, 6), np.int32)), TypeError),
    "scale": (dict(scale=float("nan")), ValueError),
    "num_threads_zero": (dict(num_threads=0), ValueError),
    "num_threads_type": (dict(num_threads=2.0), TypeError),
    "gqa": (dict(query=f32(3, 5, 4), key=f32(2, 6, 4), value=f32(2, 6, 3), enable_gqa=True),
            ValueError),
}


@pytest.mark.parametrize("case", list(FAILING_CALLS))
def test_failed_call_leaves_out_untouched(sdpa, case):
    changes, exc = FAILING_CALLS[case]
    args = dict(query=f32(5, 4), key=f32(6, 4), value=f32(6, 3))
    args.update(changes)
    out_shape = (3, 5, 3) if case == "gqa" else (5, 3)
    out = np.full(out_shape, 12345.0, np.float32)
    with pytest.raises(exc):
        sdpa(args.pop("query"), args.pop("key"), args.pop("value"), out=out, **args)
    assert (out == 12345.0).all()
