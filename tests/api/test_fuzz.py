"""Property tests over the whole functional API: random
shapes, dtypes, strides, masks and flags, each call checked for

- agreement with pyattn.reference,
- softmax weights whose rows sum to 1 (0 for a row that sees no key),
- invariance to permuting the keys together with their values (and mask),
- bitwise invariance to the thread count, and agreement across ISA kernels.

The "ci" Hypothesis profile (tests/conftest.py) fixes the example budget.
"""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from support import FULL

import pyattn
from pyattn import _dispatch, functional
from pyattn import reference as ref

DTYPES = FULL + [np.float16]


@st.composite
def calls(draw):
    """(args, kwargs) of one random scaled_dot_product_attention call."""
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    hkv = draw(st.integers(1, 3))
    hq = hkv * draw(st.sampled_from([1, 2]))
    L, S = draw(st.integers(1, 140)), draw(st.integers(1, 300))
    E, Ev = draw(st.integers(1, 40)), draw(st.integers(1, 24))

    def array(shape, transposed):
        a = rng.standard_normal(shape).astype(dtype)
        if transposed:  # same values, other strides: a non-contiguous view
            a = np.ascontiguousarray(np.swapaxes(a, -1, -2)).swapaxes(-1, -2)
        return a

    q = array(batch + (hq, L, E), draw(st.booleans()))
    k = array(batch + (hkv, S, E), draw(st.booleans()))
    v = array(batch + (hkv, S, Ev), draw(st.booleans()))
    kwargs = {"enable_gqa": hq != hkv, "is_causal": draw(st.booleans())}
    mask_kind = draw(st.sampled_from(["none", "bool", "float"]))
    if mask_kind != "none":
        shape = draw(st.sampled_from([(L, S), (1, S), (L, 1), (hq, L, S)]))
        keep = rng.random(shape) > 0.3
        kwargs["attn_mask"] = keep if mask_kind == "bool" else np.where(
            keep, rng.standard_normal(shape), -np.inf).astype(np.float32)
    if draw(st.booleans()):
        kwargs["alignment"] = "lower_right"
    if draw(st.booleans()):
        kwargs["window"] = (draw(st.none() | st.integers(0, 50)),
                            draw(st.none() | st.integers(0, 50)))
    if draw(st.booleans()):
        kwargs["alibi_slopes"] = rng.uniform(0, 0.5, hq)
    if draw(st.booleans()):
        kwargs["softcap"] = float(rng.uniform(1, 30))
    if draw(st.booleans()):
        kwargs["sinks"] = rng.standard_normal(hq)
    return (q, k, v), kwargs


def _tolerance(dtype, shape_out):
    if dtype == np.float64:
        return dict(rtol=1e-9, atol=1e-11)
    if dtype == np.float16:
        return dict(rtol=4e-3, atol=4e-3)
    return dict(rtol=2e-4, atol=2e-5)


@given(calls())
def test_agrees_with_the_reference(call):
    (q, k, v), kwargs = call
    got, lse = pyattn.scaled_dot_product_attention(q, k, v, return_lse=True, **kwargs)
    want, want_lse = ref.scaled_dot_product_attention(q, k, v, return_lse=True, **kwargs)
    assert got.dtype == q.dtype and got.shape == want.shape
    np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64),
                               **_tolerance(q.dtype, got.shape))
    assert np.array_equal(np.isneginf(lse), np.isneginf(want_lse))
    finite = np.isfinite(want_lse)
    np.testing.assert_allclose(lse[finite], want_lse[finite], **_tolerance(q.dtype, lse.shape))


@given(calls())
def test_weight_rows_sum_to_one(call):
    (q, k, v), kwargs = call
    out, weights, lse = functional.attention(q, k, v, weights="heads", return_lse=True, **kwargs)
    sums = weights.sum(-1)
    sees_a_key = np.isfinite(lse)
    if kwargs.get("sinks") is not None:  # a sink takes e^(sink - lse) of the mass
        sink = np.asarray(kwargs["sinks"], np.float64)[:, None]
        sums = sums + np.exp(sink - np.where(sees_a_key, lse, np.inf))
    np.testing.assert_allclose(sums[sees_a_key], 1, rtol=1e-4)
    assert (sums[~sees_a_key] == 0).all() and (weights >= 0).all()
    # and they are the weights the output used
    vv = np.repeat(v, q.shape[-3] // v.shape[-3], axis=-3) if kwargs["enable_gqa"] else v
    np.testing.assert_allclose((weights @ vv.astype(weights.dtype)).astype(np.float64),
                               out.astype(np.float64), **_tolerance(q.dtype, out.shape))


@given(calls(), st.integers(0, 2**32 - 1))
def test_permuting_keys_with_values_changes_nothing(call, seed):
    (q, k, v), kwargs = call
    # positions matter for causality, windows and ALiBi: only the plain softmax is symmetric
    for key in ("is_causal", "window", "alibi_slopes", "alignment"):
        kwargs.pop(key, None)
    perm = np.random.default_rng(seed).permutation(k.shape[-2])
    permuted = dict(kwargs)
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.shape[-1] > 1:
        permuted["attn_mask"] = mask[..., perm]
    got = pyattn.scaled_dot_product_attention(q, k[..., perm, :], v[..., perm, :], **permuted)
    want = pyattn.scaled_dot_product_attention(q, k, v, **kwargs)
    np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64),
                               **_tolerance(q.dtype, got.shape))


@given(calls())
def test_thread_count_and_kernel_do_not_matter(call):
    (q, k, v), kwargs = call
    first = pyattn.scaled_dot_product_attention(q, k, v, num_threads=1, **kwargs)
    for n in (2, 3):
        assert np.array_equal(
            pyattn.scaled_dot_product_attention(q, k, v, num_threads=n, **kwargs), first,
            equal_nan=True)
    chosen = _dispatch.KERNEL
    try:
        for name in _dispatch.usable_kernels():
            _dispatch.KERNEL = name
            other = pyattn.scaled_dot_product_attention(q, k, v, **kwargs)
            np.testing.assert_allclose(other.astype(np.float64), first.astype(np.float64),
                                       **_tolerance(q.dtype, first.shape))
    finally:
        _dispatch.KERNEL = chosen
