"""Broadcast and overlapping views are read where they lie: no call expands a
view to the shape it claims, neither its elements (conversions copy the
memory that exists) nor per-batch bookkeeping (offsets, lengths).

Memory is measured with tracemalloc (support.peak_traced_bytes).
"""
import subprocess

import numpy as np
import pytest
from support import peak_traced_bytes, randn

import pyattn
from pyattn import _attention, _launch
from pyattn import reference as ref
from pyattn.functional import attention

MiB = 1 << 20


def _claim(arr, shape):
    """A zero-stride view of the one element `arr` that claims `shape`."""
    return np.lib.stride_tricks.as_strided(arr, shape, (0,) * len(shape))


def test_broadcast_batch_costs_no_per_batch_tables():
    # 2**22 batch items on the general path (key and value do not share the
    # batch): the result is 8 MiB; the driver's (5, n_batch) int64 offsets
    # once added 160 MiB, and their temporaries as much again.
    n = 2**22
    q = _claim(np.full(1, 0.5, np.float16), (n, 1, 1, 1))
    k = np.ones((1, 1, 1, 1), np.float16)
    v = np.full((1, 1, 1, 1), 3, np.float16)
    out, peak = peak_traced_bytes(lambda: pyattn.scaled_dot_product_attention(q, k, v))
    assert out.shape == (n, 1, 1, 1) and (out == 3).all()
    assert peak < out.nbytes + 16 * MiB, f"{peak / MiB:.0f} MiB for a result of 8 MiB"


def _in_child(helpers, tmp_path, code, timeout=60):
    """Run `code` (after the imports) in a fresh interpreter: a call that
    walks a claimed size element by element fails the test, not hangs it."""
    code = "import numpy as np, pyattn\nfrom pyattn import reference as ref\n" + code
    try:
        return helpers.run_python(code, cwd=tmp_path, timeout=timeout).stdout
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout} s:\n{code}", pytrace=False)


def test_broadcast_batch_with_no_work_allocates_nothing_per_batch(helpers, tmp_path):
    # 2**40 claimed batch items and L = 0: an empty result; the per-batch
    # diagonals (8 TiB of int64) were allocated, the lengths checked one by
    # one, and the reference's matmul looped over every batch item
    out = _in_child(helpers, tmp_path, """
q = np.lib.stride_tricks.as_strided(np.ones(1, np.float32), (2**40, 1, 0, 4), (0,) * 4)
kv = np.ones((1, 1, 3, 4), np.float32)
for fn in (pyattn.scaled_dot_product_attention, ref.scaled_dot_product_attention):
    out, lse = fn(q, kv, kv, alignment="lower_right", kv_lengths=2, return_lse=True)
    print(out.shape, lse.shape)
""")
    assert out.splitlines() == ["(1099511627776, 1, 0, 4) (1099511627776, 1, 0)"] * 2


def test_reference_computes_each_distinct_batch_item_once(rng, helpers):
    # 2**12 claimed batch items over one stored problem: the reference once
    # computed them all (about 1 GiB of score-sized arrays for a 4 MiB result)
    q = np.broadcast_to(randn(rng, (1, 4, 64, 8)), (2**12, 4, 64, 8))
    k, v = randn(rng, (1, 2, 64, 8)), randn(rng, (1, 2, 64, 1))
    mask = np.broadcast_to(rng.random((64, 64)) < 0.8, (2**12, 4, 64, 64))
    got, peak = peak_traced_bytes(lambda: ref.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=True))
    assert peak < got.nbytes + 4 * MiB, f"{peak / MiB:.0f} MiB for a result of 4 MiB"
    one = pyattn.scaled_dot_product_attention(q[:1], k, v, attn_mask=mask[:1], enable_gqa=True)
    helpers.assert_close(got, np.broadcast_to(one, got.shape), np.float32)


@pytest.mark.parametrize("case", ["plain", "lse", "weights", "lengths", "heads-as-rows"])
def test_launches_split_by_batch_agree_with_the_reference(case, rng, monkeypatch):
    """Batches beyond BATCH_CHUNK items run as several launches, each with its
    slice of offsets, lengths, logsumexp and weights; made small here so that
    a 2-D broadcast batch of 15 items takes 4 launches (the last one short)."""
    monkeypatch.setattr(_launch, "BATCH_CHUNK", 4)
    q = np.broadcast_to(randn(rng, (3, 1, 2, 5, 8)), (3, 5, 2, 5, 8))
    k = randn(rng, (1, 5, 2, 7, 8))
    v = randn(rng, (3, 5, 2, 7, 6))
    kw = {"lse": dict(return_lse=True, alignment="lower_right"),
          "lengths": dict(q_lengths=rng.integers(0, 6, (3, 1)), kv_lengths=rng.integers(0, 8, 5),
                          alignment="lower_right", return_lse=True),
          # one query row per head, 4 per key/value head: the heads run as rows
          "heads-as-rows": dict(enable_gqa=True, return_lse=True, is_causal=True,
                                alignment="lower_right", kv_lengths=rng.integers(1, 8, (3, 5))),
          }.get(case, {})
    if case == "heads-as-rows":
        q = randn(rng, (3, 5, 8, 1, 8))
    problems = []
    _attention.record_problems(problems)
    try:
        if case == "weights":
            got, weights, _ = attention(q, k, v, weights="heads")
        else:
            got = pyattn.scaled_dot_product_attention(q, k, v, **kw)
    finally:
        _attention.record_problems(None)
    assert [p[0] for p in problems] == [4, 4, 4, 3]
    if case == "heads-as-rows":  # (heads, rows) of each launch
        assert {p[1:3] for p in problems} == {(2, 4)}
    expected = ref.scaled_dot_product_attention(q, k, v, **kw)
    if case == "weights":
        scores = np.einsum("...le,...se->...ls", q, k) / np.sqrt(8)
        np.testing.assert_allclose(weights, ref.softmax(scores), rtol=1e-5, atol=1e-6)
    for g, e in zip(*(x if isinstance(x, tuple) else (x,) for x in (got, expected))):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def _sliding(kind, n=4096, window=2048):
    """An overlapping (n - window + 1, window) view that conversion must copy:
    big-endian, misaligned, or big-endian with both strides negative.  It
    claims 16 MiB over 16 KiB of memory."""
    values = np.linspace(-1, 1, n)
    if kind == "misaligned":
        buf = np.zeros(4 * n + 1, np.uint8)[1:].view(np.float32)  # data at an odd address
        buf[...] = values
    else:
        buf = values.astype(">f4")
    view = np.lib.stride_tricks.sliding_window_view(buf, window)
    return view[::-1, ::-1] if kind == "reversed" else view


@pytest.mark.parametrize("kind", ["big-endian", "misaligned", "reversed"])
@pytest.mark.parametrize("arg", ["key-value", "query", "attn_mask"])
def test_overlapping_views_are_converted_once(arg, kind, helpers):
    view = _sliding(kind)
    S, E = view.shape
    args = {"query": np.full((3, E), 0.01, np.float32), "key": view, "value": view}
    if arg == "query":
        args.update(query=view, key=np.linspace(0, 1, 4 * E, dtype=np.float32).reshape(4, E),
                    value=np.arange(4, dtype=np.float32).reshape(4, 1))
    elif arg == "attn_mask":  # (L, S) = (2049, 2048) scores
        args.update(query=np.ones((S, 8), np.float32), key=np.ones((E, 8), np.float32),
                    value=np.eye(E, 8, dtype=np.float32), attn_mask=view)
    got, peak = peak_traced_bytes(lambda: pyattn.scaled_dot_product_attention(**args))
    assert peak < 4 * MiB, f"{peak / MiB:.1f} MiB to convert views of 16 KiB"
    native = {k: np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("=")) for k, a in args.items()}
    helpers.assert_close(got, ref.scaled_dot_product_attention(**native), np.float32)


def test_conversion_that_would_expand_a_view_is_refused_naming_it():
    # float32 elements one byte apart (strides not in whole elements: no
    # span to convert as elements) claim 2**42 distinct elements over 8 MiB
    buf = np.zeros(8 << 20, np.uint8)
    key = np.lib.stride_tricks.as_strided(buf.view(np.float32)[:1], (2**22, 2**20), (1, 4))
    query = np.ones((1, 2**20), np.float32)
    with pytest.raises(ValueError, match=r"a converted copy of key \(4398046511104 distinct "
                                         r"elements\) would need .* GiB, more than"):
        pyattn.scaled_dot_product_attention(query, key, key)


# --------------------------------------------------------------------------
# Quantized K/V views (the second adversarial review)
# --------------------------------------------------------------------------

@pytest.mark.parametrize("groups,group_size", [(2, 32), (1, 64)])
def test_broadcast_quantized_kv_is_checked_and_read_in_place(groups, group_size):
    """A QuantizedKV of 2 stored bytes that claims 2**22 rows: its checks run
    on the distinct elements and a call reads its scales in place, also with
    one scale per row (group_size = D: a last axis of length 1, any stride)."""
    data = _claim(np.ones(1, np.int8), (2**6, 1, 2**16, 64))
    scales = _claim(np.full(1, 0.01, np.float16), (2**6, 1, 2**16, groups))
    kv, peak = peak_traced_bytes(lambda: pyattn.QuantizedKV(data, scales, group_size))
    assert peak < MiB
    q = np.ones((1, 1, 1, 64), np.float32)
    got, peak = peak_traced_bytes(lambda: pyattn.scaled_dot_product_attention(
        q, kv, kv, kv_lengths=[1]))
    assert peak < MiB and got.shape == (2**6, 1, 1, 64)
    np.testing.assert_allclose(got, 0.01, rtol=1e-3)  # the one key's value, 1 * 0.01


def test_scales_with_a_strided_last_axis_are_copied_by_their_rows():
    """Scales whose groups are strided must be made contiguous for the
    kernel: the copy holds the distinct rows, not the claimed batch."""
    rng = np.random.default_rng(0)
    kv = pyattn.QuantizedKV.quantize(rng.standard_normal((1, 2, 50, 64)))
    every_other = np.repeat(kv.scales, 2, axis=-1)[..., ::2]  # kv's scales, 4 bytes apart
    wide = np.broadcast_to(every_other, (2**12, 2, 50, 2))
    claimed = pyattn.QuantizedKV(np.broadcast_to(kv.data, (2**12, 2, 50, 64)), wide)
    q = rng.standard_normal((1, 2, 1, 64)).astype(np.float32)
    got, peak = peak_traced_bytes(lambda: pyattn.scaled_dot_product_attention(q, claimed, claimed))
    assert peak < 2**12 * 2 * 1 * 64 * 4 + MiB  # the result, and no claimed-size scales
    np.testing.assert_array_equal(got[:1], pyattn.scaled_dot_product_attention(q, kv, kv))


def test_quantizing_counts_its_float32_copy(monkeypatch):
    """The quantizer reads C-contiguous float32 rows: a broadcast (or other)
    x is copied first, and that copy is part of the size check."""
    from pyattn import _arrays

    monkeypatch.setattr(_arrays, "physical_memory", lambda: int(0.9 * 2**30))
    x = _claim(np.ones(1, np.float32), (2**18, 2**10))  # 256 Mi elements: int8 0.27 GiB
    with pytest.raises(ValueError, match="^int8 data and scales of x .*, with x as float32 "
                                         "rows would need 1.266 GiB"):
        pyattn.QuantizedKV.quantize(x)
    # storage for 2**10 positions fits (0.53 GiB), a float32 copy of k_new does not (1 GiB)
    cache = pyattn.KVCache(1, 2**8, 2**10, dtype="int8", max_len=2**10)
    with pytest.raises(ValueError, match="^k_new as float32 rows for the quantizer"):
        cache.append(_claim(np.ones(1), (1, 2**8, 2**10, 2**10)),
                     _claim(np.ones(1), (1, 2**8, 2**10, 2**10)))
    assert cache.lengths.tolist() == [0]


def test_more_batch_dimensions_than_numpy_broadcasts():
    """np.broadcast_shapes stops at 32 dimensions; pyattn takes up to
    MAX_NDIM = 60 (NumPy's 64, less the axes the reference and the merge
    add), and refuses more with an error naming the argument."""
    q = np.random.default_rng(0).standard_normal((2,) + (1,) * 56 + (3, 4, 8)).astype(np.float32)
    assert q.ndim == 60
    mask = np.tril(np.ones((4, 4), bool)).reshape((1,) * 36 + (4, 4))
    got = pyattn.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    np.testing.assert_allclose(got, ref.scaled_dot_product_attention(q, q, q, attn_mask=mask),
                               rtol=1e-5, atol=1e-6)
    wide = q[np.newaxis]  # 61 dimensions
    for call in (pyattn.scaled_dot_product_attention, ref.scaled_dot_product_attention):
        with pytest.raises(ValueError, match="^query has 61 dimensions; pyattn takes at most 60"):
            call(wide, q, q)
    with pytest.raises(ValueError, match="^x has 61 dimensions"):
        pyattn.QuantizedKV.quantize(wide.repeat(4, axis=-1))


def test_scales_shared_by_a_rows_groups_are_read_as_one_per_row():
    """Scales broadcast along the group axis (every group of a row alike)
    are one scale per row: read in place, with the result of the copy."""
    rng = np.random.default_rng(1)
    per_row = (rng.random(1024) * 0.01).astype(np.float16)
    data = _claim(np.ones(1, np.int8), (1024, 2**16))
    kv = pyattn.QuantizedKV(data, np.broadcast_to(per_row[:, None], (1024, 2**11)), 32)
    q = np.ones((1, 2**16), np.float32)
    got, peak = peak_traced_bytes(lambda: pyattn.scaled_dot_product_attention(q, kv, kv))
    assert peak < MiB  # the copy by rows would be 4 MiB for each of key and value
    copied = pyattn.QuantizedKV(data, np.ascontiguousarray(kv.scales), 32)
    np.testing.assert_allclose(got, pyattn.scaled_dot_product_attention(q, copied, copied),
                               rtol=1e-6)


def test_out_may_not_overlap_the_scales():
    """The kernel reads the scales while it writes out: an out that shares
    their memory is refused, as for key and value."""
    rng = np.random.default_rng(2)
    src = pyattn.QuantizedKV.quantize(rng.standard_normal((1, 8, 64, 64)), 64)
    raw = np.zeros(8 * 24 * 64 * 4, np.uint8)
    scales = raw[:src.scales.nbytes].view(np.float16).reshape(src.scales.shape)
    scales[...] = src.scales
    k = pyattn.QuantizedKV(src.data, scales, 64)
    out = raw.view(np.float32).reshape(1, 8, 24, 64)
    q = rng.standard_normal((1, 8, 24, 64)).astype(np.float32)
    with pytest.raises(ValueError, match="^out overlaps key.scales in memory"):
        pyattn.scaled_dot_product_attention(q, k, k, out=out)


def test_out_may_not_overlap_an_input_that_was_converted():
    """`out` is checked against the caller's arrays, not against the copies a
    call makes of them (byte order, strided scales): the copies overlap
    nothing, what they were made from may."""
    rng = np.random.default_rng(3)
    buf = np.zeros(8192, np.uint8)
    q = buf[:2 * 4 * 64 * 4].view(">f4").reshape(2, 4, 64)  # big-endian: converted
    q[...] = rng.standard_normal(q.shape)
    kv = rng.standard_normal((2, 5, 64)).astype(np.float32)
    out = buf[:2 * 4 * 64 * 4].view(np.float32).reshape(2, 4, 64)
    with pytest.raises(ValueError, match="^out overlaps query in memory"):
        pyattn.scaled_dot_product_attention(q, kv, kv, out=out)
    src = pyattn.QuantizedKV.quantize(rng.standard_normal((1, 2, 4, 64)))
    wide = buf[4096:4096 + 64].view(np.float16).reshape(1, 2, 4, 4)
    wide[...] = np.repeat(src.scales, 2, axis=-1)
    k = pyattn.QuantizedKV(src.data, wide[..., ::2])  # strided groups: copied for the kernel
    out = buf[4096:4096 + 512].view(np.float32).reshape(1, 2, 1, 64)
    for call in (pyattn.scaled_dot_product_attention, ref.scaled_dot_product_attention):
        with pytest.raises(ValueError, match="^out overlaps key.scales in memory"):
            call(np.ones((1, 2, 1, 64), np.float32), k, k, out=out)


def test_parts_of_sixty_dimensions_merge():
    """merge_attention stacks its parts: a part may have MAX_NDIM dimensions."""
    q = np.random.default_rng(4).standard_normal((1,) * 57 + (2, 3, 8)).astype(np.float32)
    parts = [pyattn.scaled_dot_product_attention(q, q[..., s, :], q[..., s, :], return_lse=True)
             for s in (slice(0, 1), slice(1, 3))]
    merged, _ = pyattn.merge_attention([o for o, _ in parts], [lse for _, lse in parts])
    np.testing.assert_allclose(merged, pyattn.scaled_dot_product_attention(q, q, q),
                               rtol=1e-5, atol=1e-6)


def test_out_may_not_overlap_a_converted_buffer_or_decode_query():
    """A memoryview that must be converted, and decode_attention's query,
    are checked as the caller gave them."""
    rng = np.random.default_rng(5)
    qb = rng.standard_normal((2, 4, 64)).astype(">f4")
    kv = rng.standard_normal((2, 5, 64)).astype(np.float32)
    with pytest.raises(ValueError, match="^out overlaps query in memory"):
        pyattn.scaled_dot_product_attention(memoryview(qb), kv, kv, out=qb.view(np.float32))
    cache = pyattn.KVCache(1, 2, 64)
    cache.append(rng.standard_normal((1, 2, 5, 64)), rng.standard_normal((1, 2, 5, 64)))
    qd = rng.standard_normal((1, 4, 1, 64)).astype(">f4")
    with pytest.raises(ValueError, match="^out overlaps query in memory"):
        pyattn.decode_attention(qd, cache, out=qd.view(np.float32))
