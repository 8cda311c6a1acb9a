"""The int8 KV format's NumPy oracle (pyattn.reference.quantize_int8): the
properties docs/kv-cache.md promises, which the compiled quantizer must share."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pyattn.reference import dequantize_int8, quantize_int8

finite = st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False)


@st.composite
def rows(draw):
    group = draw(st.sampled_from([32, 64]))
    d = group * draw(st.integers(1, 4))
    n = draw(st.integers(1, 3))
    return draw(arrays(np.float32, (n, d), elements=finite)), group


@settings(max_examples=200, deadline=None)
@given(rows())
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


@settings(max_examples=100, deadline=None)
@given(rows())
def test_idempotent(case):
    x, group = case
    q, scales = quantize_int8(x, group)
    q2, scales2 = quantize_int8(dequantize_int8(q, scales), group)
    np.testing.assert_array_equal(dequantize_int8(q2, scales2),
                                  dequantize_int8(q, scales))


def test_zero_maps_to_zero_and_ties_to_even():
    x = np.zeros((1, 32), np.float32)
    q, scales = quantize_int8(x)
    assert not q.any() and not scales.any()
    # amax 127 gives scale exactly 1: 2.5 -> 2 and -3.5 -> -4 (half to even)
    x[0, :3] = [127, 2.5, -3.5]
    q, scales = quantize_int8(x)
    assert scales[0, 0] == 1 and list(q[0, :3]) == [127, 2, -4]


def test_layout_and_group_sizes():
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
def test_errors(bad, match):
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


def test_dequantize_errors():
    q, scales = quantize_int8(np.ones((1, 64), np.float32))
    with pytest.raises(TypeError, match="int8"):
        dequantize_int8(q.astype(np.int16), scales)
    with pytest.raises(ValueError, match="equal groups"):
        dequantize_int8(q, scales[:, :1].repeat(3, axis=-1))
