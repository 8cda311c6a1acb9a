"""The fast path (compiled checks and launch of the common call) against the
general path (functional.attention): bitwise the same results, the same
errors, and taken exactly for the calls it is meant for."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyattn import _attention, _dispatch, functional

sdpa = functional.scaled_dot_product_attention


def fast(q, k, v, is_causal=False, scale=None, enable_gqa=False, num_threads=None,
         lower_right=False):
    return _attention.simple_attention(q, k, v, is_causal, scale, enable_gqa, num_threads,
                                       _dispatch.KERNEL, lower_right)


def general(q, k, v, is_causal=False, scale=None, enable_gqa=False, num_threads=None,
            lower_right=False):
    return functional.attention(q, k, v, None, is_causal, scale, enable_gqa,
                                num_threads=num_threads,
                                alignment="lower_right" if lower_right else "top_left")[0]


@st.composite
def simple_calls(draw):
    """Calls the fast path takes: rank 3 or 4, GQA or MQA heads, causal either
    way, a float scale or none, any strides of whole elements, and fewer than
    2048 keys (longer decodes split the keys: the general path's plan)."""
    dtype = draw(st.sampled_from(["float32", "float64", "float16"]))
    hk = draw(st.integers(1, 3))
    hq = hk * draw(st.integers(1, 4))
    L = draw(st.sampled_from([1, 2, 7, 33, 300]))
    S = draw(st.sampled_from([1, 5, 64, 129, 700]))
    E, Ev = draw(st.sampled_from([1, 8, 64])), draw(st.sampled_from([1, 16, 40]))
    batch = draw(st.sampled_from([(), (1,), (3,)]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)

    def array(shape):
        a = rng.standard_normal(shape).astype(dtype)
        if draw(st.booleans()):  # a strided view: every other row, reversed columns
            big = rng.standard_normal(shape[:-2] + (2 * shape[-2], shape[-1])).astype(dtype)
            a = big[..., ::2, ::-1]
        return a

    q = array(batch + (hq, L, E))
    k, v = array(batch + (hk, S, E)), array(batch + (hk, S, Ev))
    kwargs = dict(is_causal=draw(st.booleans()), lower_right=draw(st.booleans()),
                  enable_gqa=hq != hk and hk != 1 or draw(st.booleans()),
                  scale=draw(st.sampled_from([None, 0.1, 1.0, -2.5])),
                  num_threads=draw(st.sampled_from([None, 1, 2, 3])))
    return (q, k, v), kwargs


@given(call=simple_calls())
def test_fast_path_is_taken_and_bitwise_equal_to_the_general_path(call):
    (q, k, v), kwargs = call
    got = fast(q, k, v, **kwargs)
    assert got is not None  # S < 2048: never a split-KV plan
    want = general(q, k, v, **kwargs)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got, want, equal_nan=True)
    public = sdpa(q, k, v, is_causal=kwargs["is_causal"], scale=kwargs["scale"],
                  enable_gqa=kwargs["enable_gqa"], num_threads=kwargs["num_threads"],
                  alignment="lower_right" if kwargs["lower_right"] else "top_left")
    assert np.array_equal(public, want, equal_nan=True)


def test_fast_path_on_every_kernel(kernel, rng, helpers):
    """Prefill, causal both ways, GQA decode (heads as rows) and MQA."""
    for qs, ks, kw in [((2, 4, 300, 64), (2, 4, 300, 64), {}),
                       ((4, 40, 64), (4, 56, 64), dict(is_causal=True, lower_right=True)),
                       ((4, 40, 64), (4, 56, 64), dict(is_causal=True)),
                       ((2, 8, 1, 64), (2, 2, 900, 64), dict(enable_gqa=True)),
                       ((1, 8, 1, 32), (1, 1, 77, 32), dict(is_causal=True, lower_right=True))]:
        q, k, v = helpers.qkv(rng, qs, ks, ks)
        got = fast(q, k, v, **kw)
        assert got is not None, (qs, ks, kw)
        assert np.array_equal(got, general(q, k, v, **kw))


def not_simple(rng):
    """Calls the fast path must leave to the general path, valid or not."""
    q = rng.standard_normal((2, 4, 8, 16)).astype(np.float32)
    big_endian = q.astype(">f4")
    buf = np.zeros(q.nbytes + 1, np.uint8)
    misaligned = buf[1:].view(np.float32).reshape(q.shape)
    misaligned[...] = q
    return {
        "list input": ((q.tolist(), q, q), {}),
        "float64 key": ((q, q.astype(np.float64), q), {}),
        "big-endian": ((big_endian, big_endian, big_endian), {}),
        "misaligned": ((misaligned, q, q), {}),
        "broadcast batch": ((q[:1], q, q), {}),
        "rank 2": ((q[0, 0], q[0, 0], q[0, 0]), {}),
        "rank 5": ((q[None], q[None], q[None]), {}),
        "mixed ranks": ((q[0], q, q), {}),
        "no keys": ((q, q[..., :0, :], q[..., :0, :]), {}),
        "no queries": ((q[..., :0, :], q, q), {}),
        "Ev = 0": ((q, q, q[..., :0]), {}),
        "E mismatch": ((q, q[..., :8], q), {}),
        "S mismatch": ((q, q, q[..., :5, :]), {}),
        "GQA without enable_gqa": ((q, q[:, :2], q[:, :2]), {}),
        "heads not a multiple": ((q[:, :3], q[:, :2], q[:, :2]), dict(enable_gqa=True)),
        "numpy bool is_causal": ((q, q, q), dict(is_causal=np.bool_(True))),
        "int scale": ((q, q, q), dict(scale=1)),
        "huge scale": ((q, q, q), dict(scale=1e300)),
        "nan scale": ((q, q, q), dict(scale=float("nan"))),
        "numpy int threads": ((q, q, q), dict(num_threads=np.int64(2))),
        "negative threads": ((q, q, q), dict(num_threads=-1)),
        "too many threads": ((q, q, q), dict(num_threads=5000)),
        "zero threads": ((q, q, q), dict(num_threads=0)),
        "split-KV decode": ((q[:, :, :1], np.zeros((2, 4, 4096, 16), np.float32),
                             np.zeros((2, 4, 4096, 16), np.float32)), {}),
    }


def test_fast_path_declines_what_it_does_not_check(rng):
    for name, (args, kwargs) in not_simple(rng).items():
        assert fast(*args, **kwargs) is None, name


def test_public_calls_raise_what_the_general_path_raises(rng):
    """The public function's errors are the general path's, for every call
    the fast path declines (it never raises one itself)."""
    for name, (args, kwargs) in not_simple(rng).items():
        public_kwargs = {key: val for key, val in kwargs.items() if key != "lower_right"}
        try:
            want = general(*args, **kwargs)
        except (ValueError, TypeError) as exc:
            with pytest.raises(type(exc)) as info:
                sdpa(*args, **public_kwargs)
            assert str(info.value) == str(exc), name
        else:
            assert np.array_equal(sdpa(*args, **public_kwargs), want, equal_nan=True), name
