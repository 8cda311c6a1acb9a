"""pyattn.KVCache and pyattn.decode_attention.

  * the cache as a container: appends (ragged too), views, growth by doubling
    (counted without timing: how often the storage is replaced), max_len,
    reset, truncate, value_dim, dtypes, and bad arguments;
  * decode_attention against pyattn.reference on every kernel: MHA, GQA,
    MQA, one and several new queries, ragged sequences, q_lengths, the score
    modifiers, split keys, and a step-by-step generation loop against
    recomputing causal attention over each whole prefix;
  * the GQA "query heads as rows" shortcut (_plan.heads_as_rows): taken
    for one query per sequence, and never where it would change the result.
"""
import copy
import math
import pickle
import sys
import threading

import numpy as np
import pytest
from support import HALF_AND_FULL, ids

import pyattn
from pyattn import _attention, kv_cache
from pyattn import reference as ref


def filled(rng, helpers, lengths, hkv=2, E=16, Ev=None, dtype=np.float32, **kwargs):
    """A cache holding `lengths[b]` random positions in sequence b, and the
    (k, v) arrays it was filled from (positions past a length are unused).
    The storage past each sequence's length holds NaN, left by an earlier,
    reset fill: nothing may read it."""
    B, n = len(lengths), max(lengths)
    cache = pyattn.KVCache(B, hkv, E, dtype=dtype, value_dim=Ev, **kwargs)
    poison = np.full((B, hkv, n, max(E, Ev or E)), np.nan, dtype)
    cache.append(poison[..., :E], poison[..., :Ev or E])
    cache.reset()
    k = helpers.randn(rng, (B, hkv, n, E), dtype)
    v = helpers.randn(rng, (B, hkv, n, Ev or E), dtype)
    cache.append(k, v, lengths=np.array(lengths))
    return cache, k, v


def valid_part(cache):
    """Copies of the cache's keys and values with the positions past each
    sequence's length zeroed (the reference multiplies them by weight 0, and
    0 * NaN is NaN)."""
    keys, values = cache.keys.copy(), cache.values.copy()
    for b, n in enumerate(cache.lengths):
        keys[b, :, n:] = values[b, :, n:] = 0
    return keys, values


def assert_holds(cache, k, v, lengths):
    """The cache's views show exactly k[b, :, :lengths[b]] per sequence."""
    assert cache.lengths.tolist() == list(lengths)
    assert cache.keys.shape == (cache.batch, cache.num_kv_heads, max(lengths), cache.head_dim)
    assert cache.values.shape == cache.keys.shape[:3] + (cache.value_dim,)
    for b, n in enumerate(lengths):
        assert np.array_equal(cache.keys[b, :, :n], k[b, :, :n])
        assert np.array_equal(cache.values[b, :, :n], v[b, :, :n])


def reference_decode(q, cache, **kwargs):
    keys, values = valid_part(cache)
    return ref.scaled_dot_product_attention(
        q, keys, values, is_causal=True, alignment="lower_right",
        kv_lengths=cache.lengths, enable_gqa=True, **kwargs)


class GroupedLaunches(list):
    """The launches (batch items, heads, rows, E) with more than one query row,
    recorded while the test calls with one query row: those ran their heads
    as rows (the key/value heads as heads, each group's query heads as rows),
    whichever path launched them."""

    def append(self, launch):
        if launch[2] > 1:
            super().append(launch)


@pytest.fixture
def spy_grouping():
    launches = GroupedLaunches()
    _attention.record_problems(launches)
    yield launches
    _attention.record_problems(None)


# ==========================================================================
# 1. The cache as a container
# ==========================================================================

def test_append_views_and_lengths(rng, helpers):
    cache = pyattn.KVCache(2, 3, 8)
    assert cache.lengths.tolist() == [0, 0] and cache.keys.shape == (2, 3, 0, 8)
    k1, v1 = helpers.randn(rng, (2, 3, 5, 8)), helpers.randn(rng, (2, 3, 5, 8))
    cache.append(k1, v1)
    assert_holds(cache, k1, v1, [5, 5])
    k2, v2 = helpers.randn(rng, (2, 3, 4, 8)), helpers.randn(rng, (2, 3, 4, 8))
    cache.append(k2, v2, lengths=[4, 1])  # sequence 1 takes only its first new position
    k = np.concatenate([k1, k2], axis=2)
    v = np.concatenate([v1, v2], axis=2)
    assert_holds(cache, k, v, [9, 6])
    # the next append continues each sequence where it ends
    k3, v3 = helpers.randn(rng, (2, 3, 2, 8)), helpers.randn(rng, (2, 3, 2, 8))
    cache.append(k3, v3, lengths=np.array([0, 2], dtype=np.uint8))
    assert cache.lengths.tolist() == [9, 8]
    k[1, :, 6:8], v[1, :, 6:8] = k3[1], v3[1]
    assert_holds(cache, k, v, [9, 8])
    assert np.array_equal(cache.keys[1, :, 6:8], k3[1])
    assert np.array_equal(cache.values[1, :, 6:8], v3[1])
    # an append of n = 0 positions is a no-op
    cache.append(np.empty((2, 3, 0, 8), np.float32), np.empty((2, 3, 0, 8), np.float32))
    assert cache.lengths.tolist() == [9, 8]
    assert "lengths=[9, 8]" in repr(cache)


def test_views_are_views_of_the_storage(rng, helpers):
    cache, k, v = filled(rng, helpers, [7, 3])
    assert np.shares_memory(cache.keys, cache._k) and np.shares_memory(cache.values, cache._v)
    assert cache.keys.dtype == cache.values.dtype == np.float32


def test_appended_arrays_are_copied(rng, helpers):
    cache = pyattn.KVCache(1, 1, 4)
    k, v = helpers.randn(rng, (1, 1, 3, 4)), helpers.randn(rng, (1, 1, 3, 4))
    cache.append(k, v)
    k0, v0 = k.copy(), v.copy()
    k[...] = v[...] = 7
    assert np.array_equal(cache.keys, k0) and np.array_equal(cache.values, v0)


def test_append_accepts_any_layout(rng, helpers):
    big_k = helpers.randn(rng, (2, 4, 10, 12))
    big_v = helpers.randn(rng, (2, 4, 10, 6))
    k, v = big_k[:, ::2, ::-2, ::3], big_v[:, 1::2, ::2]  # (2, 2, 5, 4), (2, 2, 5, 6)
    cache = pyattn.KVCache(2, 2, 4, value_dim=6)
    cache.append(k.tolist(), v)  # nested lists too
    assert_holds(cache, k, v, [5, 5])


def test_growth_is_by_doubling_and_never_copies_otherwise(rng):
    """Amortised O(1) appends: 10_000 single positions replace the storage
    only when the capacity doubles, O(log n) times; every other append writes
    into the same arrays."""
    n = 10_000
    cache = pyattn.KVCache(1, 2, 4, value_dim=3)
    assert cache.capacity == kv_cache.INITIAL_CAPACITY == 256
    data = rng.standard_normal((1, 2, n, 4)).astype(np.float32)
    storages = [(cache._k, cache._v)]  # kept alive, so identity is meaningful
    capacities = [cache.capacity]
    for i in range(n):
        cache.append(data[:, :, i:i + 1], data[:, :, i:i + 1, :3])
        if cache._k is not storages[-1][0]:
            assert cache._v is not storages[-1][1]
            assert cache.capacity > capacities[-1]  # replaced only to grow
            storages.append((cache._k, cache._v))
            capacities.append(cache.capacity)
        else:
            assert cache._v is storages[-1][1] and cache.capacity == capacities[-1]
    grows = len(capacities) - 1
    assert grows <= math.ceil(math.log2(n / 256)) + 1
    assert capacities == [256 * 2**i for i in range(grows + 1)]
    assert capacities[-1] >= n > capacities[-2]
    assert cache.lengths.tolist() == [n]
    assert np.array_equal(cache.keys, data) and np.array_equal(cache.values, data[..., :3])


def test_a_large_append_grows_to_fit(rng, helpers):
    cache = pyattn.KVCache(1, 1, 2)
    k = helpers.randn(rng, (1, 1, 1000, 2))
    cache.append(k, k)
    assert cache.capacity == 1000  # more than double: exactly what is needed
    cache.append(k[:, :, :1], k[:, :, :1])
    assert cache.capacity == 2000
    assert np.array_equal(cache.keys, np.concatenate([k, k[:, :, :1]], axis=2))


def test_max_len_caps_the_storage(rng, helpers):
    cache = pyattn.KVCache(2, 1, 4, max_len=300)
    assert cache.capacity == 256
    k = helpers.randn(rng, (2, 1, 300, 4))
    cache.append(k[:, :, :200], k[:, :, :200])
    cache.append(k[:, :, 200:], k[:, :, 200:], lengths=[100, 50])
    assert cache.capacity == 300  # min(2 * 256, max_len)
    assert_holds(cache, k, k, [300, 250])
    with pytest.raises(ValueError, match=r"max_len = 300.*301"):
        cache.append(k[:, :, :1], k[:, :, :1])
    # a refused append changes nothing
    assert cache.capacity == 300
    assert_holds(cache, k, k, [300, 250])
    # sequence 1 still has room
    cache.append(k[:, :, :1], k[:, :, :1], lengths=[0, 1])
    assert cache.lengths.tolist() == [300, 251]

    small = pyattn.KVCache(1, 1, 4, max_len=10)
    assert small.capacity == 10  # never allocates more than max_len
    small.append(k[:1, :, :10], k[:1, :, :10])
    with pytest.raises(ValueError, match="max_len"):
        small.append(k[:1, :, :1], k[:1, :, :1])
    assert small.capacity == 10 and small.lengths.tolist() == [10]


def test_reset_keeps_the_capacity(rng, helpers):
    cache, k, v = filled(rng, helpers, [600, 20])
    storage, capacity = cache._k, cache.capacity
    cache.reset()
    assert cache.lengths.tolist() == [0, 0]
    assert cache.keys.shape == (2, 2, 0, 16) and cache.values.shape == (2, 2, 0, 16)
    assert cache._k is storage and cache.capacity == capacity
    cache.append(v[:, :, :5], k[:, :, :5])
    assert cache._k is storage
    assert_holds(cache, v, k, [5, 5])


def test_truncate(rng, helpers):
    cache, k, v = filled(rng, helpers, [10, 6, 8], hkv=1, E=4)
    cache.truncate(7)
    assert_holds(cache, k, v, [7, 6, 7])
    cache.truncate(100)  # longer than a sequence: keeps it whole
    assert cache.lengths.tolist() == [7, 6, 7]
    cache.truncate([5, 6, 0])
    assert_holds(cache, k, v, [5, 6, 0])
    assert cache.keys.shape[2] == 6
    # appending after a truncate overwrites what was cut
    new = helpers.randn(rng, (3, 1, 2, 4))
    cache.append(new, -new)
    assert cache.lengths.tolist() == [7, 8, 2]
    for b, start in enumerate([5, 6, 0]):
        assert np.array_equal(cache.keys[b, :, start:start + 2], new[b])
        assert np.array_equal(cache.values[b, :, start:start + 2], -new[b])
        assert np.array_equal(cache.keys[b, :, :start], k[b, :, :start])
    cache.truncate(np.int64(0))
    assert cache.lengths.tolist() == [0, 0, 0]


def test_value_dim_differs_from_head_dim(rng, helpers, kernel):
    cache, k, v = filled(rng, helpers, [9, 4], hkv=2, E=12, Ev=5)
    assert cache.value_dim == 5 and cache.values.shape == (2, 2, 9, 5)
    assert_holds(cache, k, v, [9, 4])
    q = helpers.randn(rng, (2, 4, 2, 12))
    got = pyattn.decode_attention(q, cache)
    assert got.shape == (2, 4, 2, 5)
    helpers.assert_close(got, reference_decode(q, cache))


@pytest.mark.parametrize("dtype", HALF_AND_FULL, ids=ids)
def test_dtypes(rng, helpers, dtype):
    cache, k, v = filled(rng, helpers, [300, 7], dtype=dtype)  # grows once
    assert cache.dtype == np.dtype(dtype)
    assert cache.keys.dtype == cache.values.dtype == np.dtype(dtype)
    assert cache.keys.itemsize == np.dtype(dtype).itemsize
    assert_holds(cache, k, v, [300, 7])
    assert np.dtype(dtype).name in repr(cache)


NARROWING = [  # (cache dtype, source dtype, the smallest finite value that overflows it)
    ("float16", np.float32, 65520.0), ("float16", np.float64, 65520.0),
    ("bfloat16", np.float32, float(np.finfo(np.float32).max)), ("bfloat16", np.float64, 1e300),
    ("float32", np.float64, 1e300),
]


@pytest.mark.parametrize("which", ["k_new", "v_new"])
@pytest.mark.parametrize("cache_dtype, source, big", NARROWING,
                         ids=[f"{c}<-{np.dtype(s).name}" for c, s, _ in NARROWING])
def test_append_refuses_finite_values_the_cache_cannot_hold(rng, cache_dtype, source, big,
                                                            which):
    """A finite value that would become inf in the cache's dtype is a
    ValueError naming the argument; the cache is left as it was.  inf and NaN
    pass through as given, and values that round to the largest finite one
    are stored."""
    cache = pyattn.KVCache(2, 1, 4, dtype=cache_dtype)
    ok = np.ones((2, 1, 3, 4), source)
    cache.append(ok, ok)
    bad = ok.copy()
    bad[1, 0, 2, 3] = -big
    args = (bad, ok) if which == "k_new" else (ok, bad)
    with pytest.raises(ValueError, match=rf"{which} holds 1 finite value.*{cache.dtype.name}"):
        cache.append(*args)
    assert cache.lengths.tolist() == [3, 3]
    special = np.zeros((2, 1, 1, 4), source)
    special[0, 0, 0, :3] = [np.inf, -np.inf, np.nan]
    cache.append(special, special)
    stored = cache.keys[0, 0, 3].astype(np.float64)
    assert stored[0] == np.inf and stored[1] == -np.inf and np.isnan(stored[2])
    if cache_dtype == "float16":  # just below the overflow: rounds to the largest float16
        cache.append(np.full((2, 1, 1, 4), 65519.0, source), special)
        assert (cache.keys[:, :, -1] == 65504).all()


def test_dtype_given_by_name(rng, helpers):
    assert pyattn.KVCache(1, 1, 1, dtype="float16").dtype == np.float16
    assert pyattn.KVCache(1, 1, 1, dtype="f8").dtype == np.float64


# --------------------------------------------------------------------------
# bad arguments: ValueError / TypeError naming the argument
# --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(batch=0), "batch"),
    (dict(batch=-2), "batch"),
    (dict(batch=1.0), "batch"),
    (dict(batch=True), "batch"),
    (dict(batch="2"), "batch"),
    (dict(num_kv_heads=0), "num_kv_heads"),
    (dict(num_kv_heads=None), "num_kv_heads"),
    (dict(head_dim=0), "head_dim"),
    (dict(head_dim=2.5), "head_dim"),
    (dict(value_dim=0), "value_dim"),
    (dict(value_dim=np.float32(3)), "value_dim"),
    (dict(max_len=0), "max_len"),
    (dict(max_len=-1), "max_len"),
    (dict(max_len=10.0), "max_len"),
    (dict(dtype=np.int32), "dtype"),
    (dict(dtype=np.complex64), "dtype"),
    (dict(dtype=bool), "dtype"),
    (dict(dtype=np.longdouble), "dtype"),
])
def test_bad_constructor_arguments(kwargs, match):
    args = dict(batch=2, num_kv_heads=2, head_dim=4)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        pyattn.KVCache(**args)


def test_numpy_integers_are_sizes():
    cache = pyattn.KVCache(np.int64(2), np.int32(3), np.uint8(4), max_len=np.int16(9))
    assert (cache.batch, cache.num_kv_heads, cache.head_dim, cache.max_len) == (2, 3, 4, 9)
    assert cache.capacity == 9


SIZED = {
    "KVCache-batch": lambda size: pyattn.KVCache(size, 1, 1),
    "KVCache-head_dim": lambda size: pyattn.KVCache(1, 1, size),
    "SelfAttention-embed_dim": lambda size: pyattn.SelfAttention(size),
    "MultiHeadAttention-num_heads": lambda size: pyattn.MultiHeadAttention(8, size),
}


@pytest.mark.parametrize("make", SIZED.values(), ids=SIZED)
@pytest.mark.parametrize("size, error", [
    (8.0, TypeError), (np.float64(2), TypeError), ("2", TypeError), (True, TypeError),
    (None, TypeError), (0, ValueError), (-1, ValueError),
], ids=repr)
def test_sizes_are_checked_alike_by_the_cache_and_the_layers(make, size, error):
    """One rule (one helper): a wrong type is a TypeError, a wrong value a ValueError."""
    with pytest.raises(error, match=r"must be a positive int, got"):
        make(size)


@pytest.mark.parametrize("dtype", [None, "banana", np.int32, object], ids=repr)
def test_bad_dtype_is_a_type_error_naming_dtype(dtype):
    """None too: np.dtype(None) is float64, which a cache must not become silently."""
    with pytest.raises(TypeError, match=r"^dtype must be float32, float64, float16, "
                                        r"bfloat16, int8 or float8_e4m3fn \(bfloat16 and "
                                        r"float8 with ml_dtypes\)"):
        pyattn.KVCache(1, 1, 1, dtype=dtype)


def test_non_native_dtype_is_named_with_its_byte_order():
    # '>f4' is float32 by name: the message said "got float32"
    with pytest.raises(TypeError, match=r"^dtype must be in native byte order, got >f4 \(use "
                                        r"float32\)"):
        pyattn.KVCache(1, 1, 1, dtype=">f4")


def _kv(shape_k, shape_v=None, dtype=np.float32):
    return np.zeros(shape_k, dtype), np.zeros(shape_v or shape_k, dtype)


@pytest.mark.parametrize("args, kwargs, exc, match", [
    (_kv((2, 3, 1, 4)), {}, ValueError, r"k_new and v_new must have shapes \(2, 2, 1, 4\)"),
    (_kv((3, 2, 1, 4)), {}, ValueError, "k_new"),  # wrong batch
    (_kv((1, 2, 1, 4)), {}, ValueError, "k_new"),  # batch 1 is not broadcast
    (_kv((2, 2, 1, 5)), {}, ValueError, "k_new"),  # wrong head_dim
    (_kv((2, 2, 1, 4), (2, 2, 1, 3)), {}, ValueError, "v_new"),  # wrong value_dim
    (_kv((2, 2, 2, 4), (2, 2, 1, 4)), {}, ValueError, "v_new"),  # n differs
    (_kv((2, 1, 4)), {}, ValueError, "k_new must have at least 4 dimensions"),
    (_kv((2, 2, 1, 4), (2, 1, 4)), {}, ValueError, "v_new must have at least 4 dimensions"),
    (_kv((1, 2, 2, 1, 4)), {}, ValueError, "k_new"),
    (_kv((2, 2, 1, 4), dtype=np.int32), {}, TypeError, "k_new has dtype int32"),
    ((np.zeros((2, 2, 1, 4), np.float32), np.zeros((2, 2, 1, 4), complex)), {}, TypeError,
     "v_new has dtype complex128"),
    ((None, np.zeros((2, 2, 1, 4), np.float32)), {}, TypeError, "k_new"),
    (_kv((2, 2, 3, 4)), dict(lengths=[4, 1]), ValueError, r"lengths must lie in \[0, n\]"),
    (_kv((2, 2, 3, 4)), dict(lengths=[-1, 1]), ValueError, "lengths"),
    (_kv((2, 2, 3, 4)), dict(lengths=[1, 1, 1]), ValueError, "lengths must be 2 ints"),
    (_kv((2, 2, 3, 4)), dict(lengths=1), ValueError, "lengths"),
    (_kv((2, 2, 3, 4)), dict(lengths=[1.0, 1.0]), ValueError, "lengths"),
    (_kv((2, 2, 3, 4)), dict(lengths=[True, False]), ValueError, "lengths"),
    (_kv((2, 2, 3, 4)), dict(lengths=[[1], [1, 2]]), ValueError,
     "lengths cannot be converted"),  # ragged: NumPy's message named no argument
])
def test_bad_append_arguments(args, kwargs, exc, match, rng, helpers):
    cache, k, v = filled(rng, helpers, [3, 1], hkv=2, E=4)
    with pytest.raises(exc, match=match):
        cache.append(*args, **kwargs)
    assert_holds(cache, k, v, [3, 1])  # a refused append changes nothing


@pytest.mark.parametrize("n, match, error", [
    (-1, "non-negative", ValueError),
    ([2, -1], "non-negative", ValueError),
    ([1, 2, 3], "n must be an int or 2 ints", ValueError),
    ([[1, 2]], "n must be an int or 2 ints", ValueError),
    (1.5, "n must be", TypeError),
    ("1", "n must be", TypeError),
    (None, "n must be", TypeError),
    ([[1], [1, 2]], "n cannot be converted", ValueError),
    (-2**70, "non-negative", ValueError),  # an int beyond int64 is still an int
])
def test_bad_truncate_arguments(n, match, error, rng, helpers):
    cache, k, v = filled(rng, helpers, [3, 2], hkv=1, E=2)
    with pytest.raises(error, match=match):
        cache.truncate(n)
    assert_holds(cache, k, v, [3, 2])


@pytest.mark.parametrize("n", [2**70, np.uint64(2**64 - 1)], ids=repr)
def test_truncate_beyond_int64_keeps_every_position(n, rng, helpers):
    cache, k, v = filled(rng, helpers, [3, 2], hkv=1, E=2)
    cache.truncate(n)
    assert_holds(cache, k, v, [3, 2])


@pytest.mark.parametrize("query, kwargs, exc, match", [
    (np.zeros((2, 4, 1, 8), np.float32), dict(cache="x"), TypeError, "cache must be"),
    (np.zeros((4, 1, 8), np.float32), {}, ValueError, "query must have at least 4"),
    (np.zeros((1, 2, 4, 1, 8), np.float32), {}, ValueError, "query must have shape"),
    (np.zeros((3, 4, 1, 8), np.float32), {}, ValueError, r"query must have shape \(batch=2"),
    (np.zeros((2, 4, 1, 7), np.float32), {}, ValueError, "head_dim=8"),
    (np.zeros((2, 3, 1, 8), np.float32), {}, ValueError, "multiple of the key/value heads"),
    (np.zeros((2, 4, 1, 8), np.float64), {}, TypeError, "share one dtype"),
    (np.zeros((2, 4, 1, 8), np.int32), {}, TypeError, "query has dtype int32"),
    (np.zeros((2, 4, 2, 8), np.float32), dict(q_lengths=[3, 1]), ValueError, "q_lengths"),
    (np.zeros((2, 4, 2, 8), np.float32), dict(q_lengths=[1.0, 1.0]), TypeError, "q_lengths"),
    (np.zeros((2, 4, 1, 8), np.float32), dict(is_causal=False), TypeError, "is_causal"),
    (np.zeros((2, 4, 1, 8), np.float32), dict(window=-1), ValueError, "window"),
    (np.zeros((2, 4, 1, 8), np.float32), dict(sinks=[0.0]), ValueError, "sinks"),
])
def test_bad_decode_arguments(query, kwargs, exc, match, rng, helpers):
    cache, _, _ = filled(rng, helpers, [3, 2], hkv=2, E=8)
    kwargs = dict(kwargs)
    target = kwargs.pop("cache", cache)
    with pytest.raises(exc, match=match):
        pyattn.decode_attention(query, target, **kwargs)


# ==========================================================================
# 2. decode_attention against the reference
# ==========================================================================

HEADS = {"mha": (4, 4), "gqa": (8, 2), "mqa": (6, 1)}


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("L", [1, 3, 11])
@pytest.mark.parametrize("lengths", [[40, 40], [40, 17], [70, 0, 12]], ids=str)
def test_decode_matches_reference(kernel, heads, L, lengths, rng, helpers):
    hq, hkv = HEADS[heads]
    cache, k, v = filled(rng, helpers, lengths, hkv=hkv, E=16, Ev=12)
    q = helpers.randn(rng, (len(lengths), hq, L, 16))
    got = pyattn.decode_attention(q, cache)
    assert got.shape == (len(lengths), hq, L, 12) and got.dtype == np.float32
    bound = helpers.score_bound(q, k)
    helpers.assert_close(got, reference_decode(q, cache), score_bound=bound)
    # and from first principles: each sequence alone, its own keys only,
    # the last query on the last key
    for b, n in enumerate(lengths):
        alone = ref.scaled_dot_product_attention(
            q[b], k[b, :, :n], v[b, :, :n], is_causal=True, alignment="lower_right",
            enable_gqa=True)
        helpers.assert_close(got[b], alone, score_bound=bound)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=ids)
@pytest.mark.parametrize("heads", ["gqa", "mqa"])
def test_decode_with_q_lengths(kernel, heads, dtype, rng, helpers):
    """Sequences that appended fewer than L new positions: their queries come
    first, the padding rows are zeros."""
    hq, hkv = HEADS[heads]
    cache, k, v = filled(rng, helpers, [30, 9, 20], hkv=hkv, E=8, dtype=dtype)
    L = 5
    new_k = helpers.randn(rng, (3, hkv, L, 8), dtype)
    new_v = helpers.randn(rng, (3, hkv, L, 8), dtype)
    q_lengths = np.array([5, 2, 0])
    cache.append(new_k, new_v, lengths=q_lengths)
    q = helpers.randn(rng, (3, hq, L, 8), dtype)
    got, lse = pyattn.decode_attention(q, cache, q_lengths=q_lengths, return_lse=True)
    want, want_lse = reference_decode(q, cache, q_lengths=q_lengths, return_lse=True)
    helpers.assert_close(got, want, score_bound=helpers.score_bound(q, k))
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5)
    assert (got[1, :, 2:] == 0).all() and (got[2] == 0).all()
    assert np.isneginf(lse[1, :, 2:]).all() and np.isneginf(lse[2]).all()
    # sequence 1's two queries are its two newest positions
    keys = np.concatenate([k[1, :, :9], new_k[1, :, :2]], axis=1)
    values = np.concatenate([v[1, :, :9], new_v[1, :, :2]], axis=1)
    alone = ref.scaled_dot_product_attention(q[1, :, :2], keys, values, is_causal=True,
                                             alignment="lower_right", enable_gqa=True)
    helpers.assert_close(got[1, :, :2], alone, score_bound=helpers.score_bound(q, k))


ALIBI8 = 2.0 ** -np.arange(1, 9)
MODIFIERS = {
    "window_int": dict(window=6),
    "window_left": dict(window=(10, None)),
    "alibi": dict(alibi_slopes=ALIBI8),
    "softcap": dict(softcap=1.5),
    "sinks": dict(sinks=np.array([1.0, -1.0, 0.0, 2.0, -np.inf, 0.5, -3.0, 1.5])),
    "scale": dict(scale=0.3),
    "everything": dict(window=(12, 3), alibi_slopes=ALIBI8 / 2, softcap=3.0,
                       sinks=np.linspace(-2, 2, 8), scale=0.5),
}


@pytest.mark.parametrize("name", MODIFIERS)
@pytest.mark.parametrize("heads", ["gqa", "mha"])
@pytest.mark.parametrize("L", [1, 4, 9])
def test_decode_modifiers_pass_through(kernel, name, heads, L, rng, helpers):
    hq, hkv = {"gqa": (8, 2), "mha": (8, 8)}[heads]
    cache, k, _ = filled(rng, helpers, [50, 23], hkv=hkv, E=8, Ev=6)
    q = helpers.randn(rng, (2, hq, L, 8))
    kwargs = MODIFIERS[name]
    got, lse = pyattn.decode_attention(q, cache, return_lse=True, **kwargs)
    want, want_lse = reference_decode(q, cache, return_lse=True, **kwargs)
    bound = helpers.score_bound(q, k, kwargs.get("scale"))
    helpers.assert_close(got, want, score_bound=bound)
    assert lse.shape == (2, hq, L) and lse.dtype == np.float32
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5 * max(1.0, bound))


def test_decode_out_and_num_threads(kernel, rng, helpers):
    cache, k, _ = filled(rng, helpers, [33, 60], hkv=2, E=8)
    q = helpers.randn(rng, (2, 8, 1, 8))
    want = reference_decode(q, cache)
    storage = np.full((2, 8, 3, 16), 5.0, np.float32)
    out = storage[:, :, 1:2, ::2]  # non-contiguous
    for n in (1, 2):
        res = pyattn.decode_attention(q, cache, out=out, num_threads=n)
        assert res is out
        helpers.assert_close(out, want, score_bound=helpers.score_bound(q, k))
    assert (storage[:, :, [0, 2]] == 5).all() and (storage[..., 1::2] == 5).all()


def test_decode_on_an_empty_cache_gives_zeros(kernel):
    cache = pyattn.KVCache(2, 2, 4)
    out, lse = pyattn.decode_attention(np.ones((2, 4, 1, 4), np.float32), cache,
                                       return_lse=True)
    assert out.shape == (2, 4, 1, 4) and (out == 0).all() and np.isneginf(lse).all()


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("L, lengths", [(1, [3000]), (3, [2500]), (1, [3000, 2100])],
                         ids=str)
def test_decode_long_cache_splits_the_keys(kernel, heads, L, lengths, rng, helpers,
                                           spy_split):
    hq, hkv = HEADS[heads]
    if len(lengths) > 1:  # few enough work items to split
        hq, hkv = hq // hkv, 1
    cache, k, _ = filled(rng, helpers, lengths, hkv=hkv, E=8, Ev=4)
    q = helpers.randn(rng, (len(lengths), hq, L, 8))
    got, lse = pyattn.decode_attention(q, cache, return_lse=True, sinks=np.linspace(-1, 1, hq))
    assert spy_split and spy_split[-1] > 0, "the keys were not split"
    want, want_lse = reference_decode(q, cache, return_lse=True, sinks=np.linspace(-1, 1, hq))
    helpers.assert_close(got, want, score_bound=helpers.score_bound(q, k))
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=ids)
def test_generation_loop_equals_recomputing_the_prefix(kernel, dtype, rng, helpers):
    """Greedy-decoding shape: prefill a ragged prompt, then append one position
    per step and decode it; every step equals causal attention recomputed over
    the sequence's whole prefix.  The first sequence crosses the initial
    capacity (256) during the loop."""
    B, hq, hkv, E, Ev, steps = 2, 8, 2, 16, 8, 12
    prompt = [250, 37]
    total = max(prompt) + steps
    qs = helpers.randn(rng, (B, hq, total, E), dtype)
    ks = helpers.randn(rng, (B, hkv, total, E), dtype)
    vs = helpers.randn(rng, (B, hkv, total, Ev), dtype)
    cache = pyattn.KVCache(B, hkv, E, dtype=dtype, value_dim=Ev)
    P = max(prompt)

    # causal attention over each whole sequence: row t is what recomputing
    # over the prefix of t + 1 positions gives for its last query
    causal = [ref.scaled_dot_product_attention(qs[b], ks[b], vs[b], is_causal=True,
                                               enable_gqa=True) for b in range(B)]

    def recomputed(b, n, rows):  # the last `rows` queries of the n-position prefix
        if rows == 1:  # literally: the newest query against the whole prefix
            last = ref.scaled_dot_product_attention(qs[b, :, n - 1:n], ks[b, :, :n],
                                                    vs[b, :, :n], enable_gqa=True)
            np.testing.assert_allclose(last, causal[b][:, n - 1:n], rtol=1e-5, atol=1e-6)
        return causal[b][:, n - rows:n]

    # prefill: sequence b's prompt queries are the first prompt[b] of P rows
    cache.append(ks[:, :, :P], vs[:, :, :P], lengths=prompt)
    got = pyattn.decode_attention(qs[:, :, :P], cache, q_lengths=prompt)
    bound = helpers.score_bound(qs, ks)
    for b, n in enumerate(prompt):
        helpers.assert_close(got[b, :, :n], recomputed(b, n, n), score_bound=bound)
        assert (got[b, :, n:] == 0).all()
    pos = list(prompt)
    for _ in range(steps):
        q = np.stack([qs[b, :, pos[b]:pos[b] + 1] for b in range(B)])
        cache.append(np.stack([ks[b, :, pos[b]:pos[b] + 1] for b in range(B)]),
                     np.stack([vs[b, :, pos[b]:pos[b] + 1] for b in range(B)]))
        pos = [p + 1 for p in pos]
        got = pyattn.decode_attention(q, cache)
        assert got.shape == (B, hq, 1, Ev)
        for b in range(B):
            helpers.assert_close(got[b], recomputed(b, pos[b], 1), score_bound=bound)
    assert cache.lengths.tolist() == pos and cache.capacity == 512


# ==========================================================================
# 3. The heads-as-rows shortcut for grouped-query decoding
# ==========================================================================

@pytest.mark.parametrize("case", ["plain", "softcap", "lse", "long", "out", "scale"])
def test_gqa_decode_runs_heads_as_rows(kernel, case, rng, helpers, spy_grouping):
    """One query per sequence, sequences of one length: the 4 query heads
    that share a KV head are the 4 rows of one problem."""
    n = 3000 if case == "long" else 77
    cache, k, _ = filled(rng, helpers, [n, n], hkv=2, E=16, Ev=8)
    q = helpers.randn(rng, (2, 8, 1, 16))
    kwargs = {"softcap": dict(softcap=2.0), "lse": dict(return_lse=True),
              "scale": dict(scale=-0.7)}.get(case, {})
    want = reference_decode(q, cache, **kwargs)
    if case == "out":
        kwargs["out"] = np.zeros((2, 8, 1, 16), np.float32)[..., 3:11]
    got = pyattn.decode_attention(q, cache, **kwargs)
    assert spy_grouping == [(2, 2, 4, 16)]
    if case == "lse":
        (got, lse), (want, want_lse) = got, want
        np.testing.assert_allclose(lse, want_lse, rtol=1e-5)
    helpers.assert_close(got, want, score_bound=helpers.score_bound(q, k, kwargs.get("scale")))


def test_heads_as_rows_through_sdpa(kernel, rng, helpers, spy_grouping):
    """The same shortcut for plain calls: no causality, a right-only window
    that hides nothing, a query broadcast over heads, leading batch axes."""
    sdpa = pyattn.scaled_dot_product_attention
    q = helpers.randn(rng, (3, 1, 6, 1, 8))
    k, v = helpers.randn(rng, (3, 1, 2, 9, 8)), helpers.randn(rng, (1, 2, 2, 9, 5))
    for kwargs in [{}, dict(window=(None, 8)), dict(softcap=1.0, kv_lengths=[[4, 9]])]:
        spy_grouping.clear()
        got = sdpa(q, k, v, enable_gqa=True, **kwargs)
        assert spy_grouping == [(6, 2, 3, 8)]  # batch (3, 2); 2 KV heads of 3 query rows
        helpers.assert_close(got, ref.scaled_dot_product_attention(q, k, v, enable_gqa=True,
                                                                   **kwargs))
    qb = np.broadcast_to(helpers.randn(rng, (3, 1, 1, 1, 8)), (3, 1, 6, 1, 8))
    spy_grouping.clear()
    got = sdpa(qb, k, v, enable_gqa=True)
    assert len(spy_grouping) == 1
    helpers.assert_close(got, ref.scaled_dot_product_attention(qb, k, v, enable_gqa=True))


# Where the rows would not be interchangeable heads at one position: the
# grouped rows sit at positions 0..g-1, and per-head values would be lost.
NOT_AS_ROWS = {
    "window_left_bound": dict(is_causal=True, alignment="lower_right", window=(5, None)),
    "window_both": dict(window=(3, 3), alignment="lower_right"),
    "alibi": dict(alibi_slopes=ALIBI8, is_causal=True, alignment="lower_right"),
    "sinks": dict(sinks=np.linspace(-2, 2, 8), is_causal=True, alignment="lower_right"),
    "bool_mask": dict(attn_mask="bool"),
    "float_mask": dict(attn_mask="float"),
    "q_lengths": dict(q_lengths=[1, 0], is_causal=True, alignment="lower_right"),
    "causal_top_left": dict(is_causal=True),
    "window_right_top_left": dict(window=(None, 4)),
}


@pytest.mark.parametrize("name", NOT_AS_ROWS)
def test_heads_as_rows_not_used_where_wrong(kernel, name, rng, helpers, spy_grouping):
    sdpa = pyattn.scaled_dot_product_attention
    S = 40
    q = helpers.randn(rng, (2, 8, 1, 8))
    k, v = helpers.randn(rng, (2, 2, S, 8)), helpers.randn(rng, (2, 2, S, 6))
    kwargs = dict(NOT_AS_ROWS[name])
    if kwargs.get("attn_mask") == "bool":
        kwargs["attn_mask"] = rng.random((2, 8, 1, S)) < 0.5  # per head
    elif kwargs.get("attn_mask") == "float":
        kwargs["attn_mask"] = helpers.randn(rng, (8, 1, S))
    got, lse = sdpa(q, k, v, enable_gqa=True, return_lse=True, **kwargs)
    assert spy_grouping == []
    want, want_lse = ref.scaled_dot_product_attention(q, k, v, enable_gqa=True,
                                                      return_lse=True, **kwargs)
    helpers.assert_close(got, want, score_bound=helpers.score_bound(q, k))
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5)


@pytest.mark.parametrize("name", ["alibi", "sinks", "window"])
def test_decode_heads_as_rows_not_used_with_per_head_values(kernel, name, rng, helpers,
                                                             spy_grouping):
    cache, k, _ = filled(rng, helpers, [60, 60], hkv=2, E=8)
    q = helpers.randn(rng, (2, 8, 1, 8))
    kwargs = {"alibi": dict(alibi_slopes=ALIBI8), "sinks": dict(sinks=np.linspace(-2, 2, 8)),
              "window": dict(window=(7, 0))}[name]
    got = pyattn.decode_attention(q, cache, **kwargs)
    assert spy_grouping == []
    helpers.assert_close(got, reference_decode(q, cache, **kwargs),
                         score_bound=helpers.score_bound(q, k))


def test_heads_as_rows_with_ragged_sequences_is_still_right(kernel, rng, helpers):
    """Sequences of different lengths: whichever path runs, the result is the
    reference's (each query head its own row at the sequence's last key)."""
    cache, k, _ = filled(rng, helpers, [90, 31, 1], hkv=2, E=8)
    q = helpers.randn(rng, (3, 8, 1, 8))
    helpers.assert_close(pyattn.decode_attention(q, cache), reference_decode(q, cache),
                         score_bound=helpers.score_bound(q, k))


def test_gqa_decode_of_ragged_sequences_runs_heads_as_rows(rng, helpers, spy_grouping):
    """README: "With one query per sequence, the query heads that share a KV
    head run as the rows of one problem" -- sequences of different lengths
    included, as a batch of decoding sequences usually is."""
    cache, k, _ = filled(rng, helpers, [90, 31], hkv=2, E=8)
    q = helpers.randn(rng, (2, 8, 1, 8))
    got = pyattn.decode_attention(q, cache)
    helpers.assert_close(got, reference_decode(q, cache), score_bound=helpers.score_bound(q, k))
    assert spy_grouping == [(2, 2, 4, 8)]


# ==========================================================================
# 4. Several Python threads on one cache
# ==========================================================================

@pytest.fixture
def fast_thread_switching():
    """Let the interpreter switch threads every microsecond (default 5 ms),
    so that an unsynchronised read-modify-write interleaves within a few
    calls instead of once in a long while."""
    default = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(default)


def run_together(n_threads, work):
    """Run work(t) for t in range(n_threads) on as many threads, started at
    once; re-raise the first exception one of them met."""
    barrier = threading.Barrier(n_threads)
    errors = []

    def body(t):
        barrier.wait()
        try:
            work(t)
        except Exception as exc:  # re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(t,)) for t in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def test_appends_from_several_threads_all_land_once(monkeypatch, fast_thread_switching):
    """4 threads x 300 appends of one or two positions each, through many
    growths of the storage: every position lands exactly once, the positions
    of one append stay together, each thread's appends keep their order, and
    the values stay paired with their keys."""
    monkeypatch.setattr(kv_cache, "INITIAL_CAPACITY", 2)  # grow often, under contention
    n_threads, n_appends, B = 4, 300, 2
    cache = pyattn.KVCache(B, 1, 3, value_dim=4)
    per_append = [1 + i % 2 for i in range(n_appends)]

    def appender(t):
        for i, n in enumerate(per_append):
            key = np.zeros((B, 1, n, 3), np.float32)
            key[...] = [[[[t + 1, i, j] for j in range(n)]]]  # (thread, append, position)
            value = np.concatenate([key, np.arange(B, dtype=np.float32)
                                    .reshape(B, 1, 1, 1).repeat(n, axis=2)], axis=-1)
            cache.append(key, value)

    run_together(n_threads, appender)
    total = n_threads * sum(per_append)
    assert cache.lengths.tolist() == [total] * B
    expected = sorted((t + 1, i, j) for t in range(n_threads)
                      for i, n in enumerate(per_append) for j in range(n))
    for b in range(B):
        rows = [tuple(int(x) for x in row) for row in cache.keys[b, 0]]
        assert sorted(rows) == expected  # each position once: none lost, none doubled
        for t in range(n_threads):
            own = [row[1:] for row in rows if row[0] == t + 1]
            assert own == sorted(own), f"thread {t}'s appends out of order in sequence {b}"
        for p, (t, i, j) in enumerate(rows):
            if j == 1:  # the second position of an append follows its first
                assert rows[p - 1] == (t, i, 0)
        np.testing.assert_array_equal(cache.values[b, 0, :, :3], cache.keys[b, 0])
        assert (cache.values[b, 0, :, 3] == b).all()


def test_decode_keeps_another_threads_rewrite_waiting(rng, helpers, monkeypatch):
    """Another thread rewrites the cache (truncate, append) while
    decode_attention's kernel runs: the rewrite waits, and the result is that
    of the cache as it was.  (The kernel is made to start the rewrite and give
    it 0.2 s; without the lock the rewrite lands in the keys being read.)"""
    S, E = 64, 16
    old_k, old_v, new_k, new_v = (helpers.randn(rng, (1, 2, S, E)) for _ in range(4))
    q = helpers.randn(rng, (1, 4, 1, E))
    cache = pyattn.KVCache(1, 2, E, max_len=S)  # one storage: the rewrite reuses it
    cache.append(old_k, old_v)
    expected = pyattn.decode_attention(q, cache)

    def rewrite():
        cache.truncate(0)
        cache.append(new_k, new_v)

    rewriter = threading.Thread(target=rewrite)
    kernel = kv_cache.scaled_dot_product_attention

    def kernel_racing_a_rewrite(*args, **kwargs):
        rewriter.start()
        rewriter.join(timeout=0.2)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(kv_cache, "scaled_dot_product_attention", kernel_racing_a_rewrite)
    got = pyattn.decode_attention(q, cache)
    rewriter.join()
    np.testing.assert_array_equal(got, expected)
    assert_holds(cache, new_k, new_v, [S])  # and the rewrite came after


LOCKED_USES = {
    "append": lambda c: c.append(np.ones((1, 1, 1, 2), np.float32),
                                 np.ones((1, 1, 1, 2), np.float32)),
    "truncate": lambda c: c.truncate(0),
    "reset": lambda c: c.reset(),
    "keys": lambda c: c.keys,
    "values": lambda c: c.values,
    "decode_attention": lambda c: pyattn.decode_attention(np.ones((1, 1, 1, 2), np.float32), c),
    "repr": repr,
}


@pytest.mark.parametrize("use", LOCKED_USES.values(), ids=LOCKED_USES)
def test_changes_and_reads_wait_while_the_cache_is_locked(use):
    cache = pyattn.KVCache(1, 1, 2)
    with cache._lock:
        user = threading.Thread(target=use, args=(cache,))
        user.start()
        user.join(timeout=0.05)
        assert user.is_alive(), "ran while another thread held the cache"
    user.join()


def test_a_copied_cache_has_its_own_lock(rng, helpers):
    """pickle and copy.deepcopy work (a lock cannot be copied) and give an
    independent cache."""
    cache, k, v = filled(rng, helpers, [5, 3])
    for twin in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        assert twin._lock is not cache._lock
        assert_holds(twin, k, v, [5, 3])
        twin.truncate(1)
        twin.append(k[:, :, :1], v[:, :, :1])
        assert_holds(cache, k, v, [5, 3])


def test_copy_of_a_cache_is_independent(rng, helpers):
    """copy.copy gives a cache of its own: appending to it leaves the original."""
    import copy

    cache, _, _ = filled(rng, helpers, [5, 5], hkv=2, E=8)
    before = cache.keys.copy()
    twin = copy.copy(cache)
    twin.append(np.ones((2, 2, 1, 8), np.float32), np.ones((2, 2, 1, 8), np.float32))
    np.testing.assert_array_equal(cache.keys, before)
    assert list(cache.lengths) == [5, 5] and list(twin.lengths) == [6, 6]


def test_a_batch_beyond_memory_is_refused_before_anything_is_allocated():
    """The storage check comes first: it covers the (batch,) lengths too, which
    NumPy would otherwise try to allocate (8 TiB here) and fail with MemoryError."""
    with pytest.raises(ValueError, match="^the KVCache: keys and values for 256 positions"):
        pyattn.KVCache(batch=2**40, num_kv_heads=1, head_dim=8)


@pytest.mark.parametrize("dtype", ["float16", "float32", "int8"])
def test_only_the_rows_a_sequence_takes_are_converted(dtype):
    """With `lengths`, rows past a sequence's count are not stored, so a value
    the cache could not hold there is no error; in a stored row it is."""
    k = np.zeros((2, 1, 4, 32))
    k[1, 0, 3, 0] = 1e39  # beyond float16 and float32; sequence 1 takes 2 rows
    cache = pyattn.KVCache(2, 1, 32, dtype=dtype)
    cache.append(k, k, lengths=[4, 2])
    assert cache.lengths.tolist() == [4, 2]
    with pytest.raises(ValueError, match="^k_new "):
        cache.append(k, np.zeros_like(k), lengths=[0, 4])
    assert cache.lengths.tolist() == [4, 2]


@pytest.mark.parametrize("name, value", [("is_causal", True), ("alignment", "top_left"),
                                         ("enable_gqa", False), ("kv_lengths", [4])])
def test_decode_attention_refuses_what_it_sets_itself(name, value, rng, helpers):
    """Causality, alignment, GQA and the lengths come from the cache: a caller's
    own is a TypeError that says so, naming decode_attention (it was a
    "multiple values" error naming scaled_dot_product_attention)."""
    cache, _, _ = filled(rng, helpers, [4], hkv=1, E=8)
    q = np.ones((1, 1, 1, 8), np.float32)
    with pytest.raises(TypeError, match=f"^decode_attention sets {name} itself"):
        pyattn.decode_attention(q, cache, **{name: value})


def test_decode_attention_names_itself_for_an_unknown_keyword(rng, helpers):
    cache, _, _ = filled(rng, helpers, [4], hkv=1, E=8)
    q = np.ones((1, 1, 1, 8), np.float32)
    with pytest.raises(TypeError, match=r"^decode_attention\(\) got an unexpected keyword "
                                        r"argument 'windw'"):
        pyattn.decode_attention(q, cache, windw=3)
    # what it passes on still reaches scaled_dot_product_attention
    out, lse = pyattn.decode_attention(q, cache, window=(2, 0), return_lse=True)
    assert out.shape == (1, 1, 1, 8) and lse.shape == (1, 1, 1)
