"""The quantized KV formats' NumPy oracles (pyattn.reference's quantize_int8,
quantize_float8_e4m3fn and to_float8_e4m3fn_bits): the properties
docs/kv-cache.md promises, which the compiled quantizer must share, and the
float8 conversion checked against ml_dtypes' own (an independent
implementation)."""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pyattn.reference import (
    dequantize_float8_e4m3fn,
    dequantize_int8,
    float8_e4m3fn_values,
    quantize_float8_e4m3fn,
    quantize_int8,
    to_float8_e4m3fn_bits,
)

finite = st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False)


# --------------------------------------------------------------------------
# int8
# --------------------------------------------------------------------------

@st.composite
def int8_rows(draw):
    group = draw(st.sampled_from([32, 64]))
    d = group * draw(st.integers(1, 4))
    n = draw(st.integers(1, 3))
    return draw(arrays(np.float32, (n, d), elements=finite)), group


@settings(max_examples=200, deadline=None)
@given(int8_rows())
def test_error_at_most_half_a_scale(case):
    x, group = case
    q, scales = quantize_int8(x, group)
    s = np.repeat(scales.astype(np.float32), group, axis=-1)
    err = np.abs(dequantize_int8(q, scales) - x)
    # half a step, plus the float16 rounding of the scale (2**-11 relative of
    # 127 steps) for the one element a rounded-down scale clips; a group too
    # small for a nonzero float16 scale is stored as zeros
    tiny = 127 * 2.0 ** -25
    assert np.all(err <= np.maximum(s * (0.5 + 127 * 2.0 ** -11), tiny))


def test_zero_maps_to_zero_and_ties_to_even():
    x = np.zeros((1, 32), np.float32)
    q, scales = quantize_int8(x)
    assert not q.any() and not scales.any()
    # amax 127 gives scale exactly 1: 2.5 -> 2 and -3.5 -> -4 (half to even)
    x[0, :3] = [127, 2.5, -3.5]
    q, scales = quantize_int8(x)
    assert scales[0, 0] == 1 and list(q[0, :3]) == [127, 2, -4]


def test_int8_layout_and_group_sizes():
    x = np.random.default_rng(0).standard_normal((2, 4, 128), np.float32)
    for group, n in ((32, 4), (64, 2), (128, 1)):
        q, scales = quantize_int8(x, group)
        assert q.shape == x.shape and q.dtype == np.int8
        assert scales.shape == (2, 4, n) and scales.dtype == np.float16
        assert np.abs(q).max() == 127


@pytest.mark.parametrize("bad, match", [
    (dict(group_size=16), "group_size"),
    (dict(x=np.full((1, 32), np.nan, np.float32)), "finite"),
    (dict(x=np.full((1, 32), 1e9, np.float32)), "overflows float16"),
])
def test_int8_errors(bad, match):
    args = dict(x=np.ones((1, 128), np.float32), group_size=32) | bad
    with pytest.raises(ValueError, match=match):
        quantize_int8(**args)


@pytest.mark.parametrize("x, exc", [(np.float32(1.0), ValueError),
                                    (np.array(["a"] * 32), TypeError)])
def test_inputs_that_are_not_rows_of_reals_name_x(x, exc):
    """A 0-d x, or one NumPy cannot read as float32: an error naming x, not
    an IndexError or NumPy's own message."""
    with pytest.raises(exc, match=r"^x must"):
        quantize_int8(x)


def test_int8_dequantize_errors():
    q, scales = quantize_int8(np.ones((1, 64), np.float32))
    with pytest.raises(TypeError, match="int8"):
        dequantize_int8(q.astype(np.int16), scales)
    with pytest.raises(ValueError, match="equal groups"):
        dequantize_int8(q, scales[:, :1].repeat(3, axis=-1))


# --------------------------------------------------------------------------
# float8_e4m3fn
# --------------------------------------------------------------------------

@st.composite
def float8_rows(draw):
    d = draw(st.sampled_from([32, 64, 96, 128]))
    group = draw(st.sampled_from([g for g in (32, 64, d) if d % g == 0]))
    n = draw(st.integers(1, 3))
    return draw(arrays(np.float32, (n, d), elements=finite)), group


def test_values_are_ml_dtypes_values():
    mine = float8_e4m3fn_values()
    theirs = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(mine, theirs)  # NaN at 0x7f and 0xff in both
    assert np.isnan(mine[[0x7f, 0xff]]).all() and np.nanmax(mine) == 448


@settings(max_examples=300, deadline=None)
@given(arrays(np.float32, 64, elements=st.floats(width=32, allow_nan=True)))
def test_conversion_is_ml_dtypes_rounding_saturated(x):
    """Round half to even as ml_dtypes does, with saturation: ml_dtypes makes
    NaN of what is beyond 448 and half a step, so it is fed x clipped."""
    with np.errstate(invalid="ignore"):
        theirs = np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    np.testing.assert_array_equal(to_float8_e4m3fn_bits(x), theirs)


def test_conversion_edges():
    x = np.float32([0.0, -0.0, 448, 464, 1e30, -np.inf, np.inf, np.nan, 2.0 ** -9,
                    2.0 ** -10, 3 * 2.0 ** -10, 2.0 ** -6, 17.0, 19.0])
    bits = to_float8_e4m3fn_bits(x)
    values = float8_e4m3fn_values()[bits]
    assert list(bits[:2]) == [0x00, 0x80]  # zero keeps its sign
    assert list(values[2:7]) == [448, 448, 448, -448, 448]  # saturated
    assert bits[7] == 0x7f  # NaN stays NaN
    # the smallest subnormal; a tie to 0 (even) and one to 2 * 2^-9 (even)
    assert list(values[8:11]) == [2.0 ** -9, 0, 2 * 2.0 ** -9]
    assert values[11] == 2.0 ** -6 and bits[11] == 0x08  # the smallest normal
    # at 16..32 the step is 2: 17 ties to 16 (even mantissa), 19 to 20
    assert list(values[12:]) == [16, 20]


@settings(max_examples=200, deadline=None)
@given(float8_rows())
def test_error_at_most_half_a_step(case):
    """|x - dequantized| is at most half the format's step at x / scale:
    2^-4 of the value in the normal range, 2^-10 below it, in units of the
    scale, plus the float16 rounding of the scale for a saturated element."""
    x, group = case
    q, scales = quantize_float8_e4m3fn(x, group)
    s = np.repeat(scales.astype(np.float32), group, axis=-1)
    err = np.abs(dequantize_float8_e4m3fn(q, scales) - x)
    tiny = 448 * 2.0 ** -25  # a group too small for a nonzero float16 scale is zeros
    bound = np.maximum(np.abs(x) * 2.0 ** -4, s * 2.0 ** -10) + np.abs(x) * 2.0 ** -11
    assert np.all(err <= np.maximum(bound * (1 + 1e-6), tiny))


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([(quantize_int8, dequantize_int8, int8_rows),
                        (quantize_float8_e4m3fn, dequantize_float8_e4m3fn, float8_rows)]),
       st.data())
def test_idempotent(oracle, data):
    """Quantizing the dequantized values gives them back, in both formats."""
    quantize, dequantize, rows = oracle
    x, group = data.draw(rows())
    q, scales = quantize(x, group)
    q2, scales2 = quantize(dequantize(q, scales), group)
    np.testing.assert_array_equal(dequantize(q2, scales2), dequantize(q, scales))


def test_float8_layout_zero_and_the_largest_magnitude():
    x = np.random.default_rng(0).standard_normal((2, 4, 128), np.float32)
    q, scales = quantize_float8_e4m3fn(x)  # default: one scale per row
    assert q.shape == x.shape and q.dtype == ml_dtypes.float8_e4m3fn
    assert scales.shape == (2, 4, 1) and scales.dtype == np.float16
    # each row's largest magnitude maps to +-448
    assert (np.abs(q.astype(np.float32)).max(-1) == 448).all()
    q, scales = quantize_float8_e4m3fn(x, 32)
    assert scales.shape == (2, 4, 4)
    q, scales = quantize_float8_e4m3fn(np.zeros((1, 32), np.float32))
    assert not q.view(np.uint8).any() and not scales.any()


@pytest.mark.parametrize("bad, match", [
    (dict(group_size=16), "group_size"),
    (dict(x=np.full((1, 32), np.inf, np.float32)), "finite"),
    (dict(x=np.full((1, 32), 448 * 65504 * 1.01, np.float32)), "overflows float16"),
])
def test_float8_errors(bad, match):
    args = dict(x=np.ones((1, 128), np.float32), group_size=32) | bad
    with pytest.raises(ValueError, match=match):
        quantize_float8_e4m3fn(**args)


def test_float8_dequantize_errors():
    q, scales = quantize_float8_e4m3fn(np.ones((1, 64), np.float32))
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        dequantize_float8_e4m3fn(q.view(np.int8), scales)
    with pytest.raises(ValueError, match="equal groups"):
        dequantize_float8_e4m3fn(q, scales.repeat(3, axis=-1))
