"""Attention over dask arrays: blocks over batch, heads and queries, key
chunks merged exactly from their (max, sum) softmax states (docs/scale-out.md).

Imported on its own (``import pyattn.dask``) so that ``import pyattn`` never
imports dask.
"""

import itertools
import types
import warnings

import dask
import dask.array as da
import numpy as np
from dask.array import PerformanceWarning

from ._arrays import checked_cast, convert_stored
from ._dtypes import compute_dtype
from ._options import prepare_options
from ._plan import lse_of_state, merge_partials
from ._validation import check_flag, check_mask, check_scale
from .functional import attention, check_precision
from .kv_cache import KVCache

__all__ = ["ShardedKVCache", "scaled_dot_product_attention"]

def _worker_threads():
    """The worker's thread count inside a dask worker, else None (OpenMP's
    default): several workers on one host must not each take every CPU."""
    try:
        from distributed import get_worker
        return get_worker().state.nthreads
    except (ImportError, ValueError):
        return None


def _sides(window, is_causal):
    """(left, right) keys around the diagonal, None for an open side."""
    left, right = window if window is not None else (None, None)
    if is_causal:
        right = 0 if right is None else min(right, 0)
    return left, right


def _live(rows, keys, diag, q_len, kv_len, window, is_causal):
    """Whether any sequence of a batch chunk has a query of [rows) that sees
    a key of [keys), from the bounds alone: row r's visible keys are one
    interval around its diagonal r + diag[b] that moves by one per row."""
    left, right = _sides(window, is_causal)
    if left is not None and right is not None and left + right < 0:
        return False
    r0, c0 = rows[0], keys[0]
    r1, c1 = np.minimum(rows[1], q_len), np.minimum(keys[1], kv_len)
    ok = (r1 > r0) & (c1 > c0)
    if right is not None:
        ok &= r1 - 1 + diag + right >= c0
    if left is not None:
        ok &= r0 + diag - left <= c1 - 1
    return bool(ok.any())


def _pair_mask(rows, keys, diag, pattern, alibi, mask, dtype):
    """The mask of one (query chunk, key chunk) pair in global coordinates,
    (Bc or 1, Hc or 1, Lc, Sc), or None when every key is visible: the
    causal/window pattern and ALiBi depend on global offsets, which the
    kernel cannot be given, so they become a bool mask or an additive float
    mask (ALiBi's bias, -inf where not visible) joined with attn_mask."""
    dist = None  # diagonal minus key: d - j
    if pattern is not None or alibi is not None:
        dist = (np.arange(*rows)[:, None] - np.arange(*keys)[None, :])[None, None]
        dist = dist + diag[:, None, None, None]
    visible = True
    if pattern is not None:
        left, right = _sides(*pattern)
        if left is not None:
            visible = dist <= left
        if right is not None:
            visible = visible & (dist >= -right)
    bias = None
    if alibi is not None:
        bias = -alibi.astype(dtype)[None, :, None, None] * np.abs(dist).astype(dtype)
    if mask is not None:
        if mask.dtype == bool:
            visible = visible & mask
        else:
            # a dask mask's values are seen only here: the narrowing rule, as in-process
            mask = mask if mask.dtype == dtype else checked_cast(mask, dtype, "attn_mask")
            bias = mask if bias is None else bias + mask
    if bias is None:
        return None if np.all(visible) else visible
    return np.where(visible, bias, -np.inf).astype(dtype, copy=False)


def _local_lengths(lengths, start, size):
    """Global lengths of a batch chunk as lengths within [start, start + size),
    None when every sequence fills it."""
    if lengths is None:
        return None
    local = np.clip(lengths - start, 0, size)
    return None if (local == size).all() else local


def _part(q, k, v, mask, **kw):
    """Attention over one key range as a part to merge: (output, max, sum),
    the rows' split-KV state rather than their lse, whose float32 rounding
    would lose the key count of a row scored finfo.min (a padding mask)."""
    out, _, (row_max, row_sum) = attention(q, k, v, mask, return_lse=True, split_state=True,
                                           **kw)
    return out, row_max, row_sum


def _pair(q, k, v, mask, rows, keys, spec, kw, sinks):
    """One (query chunk, key chunk) pair: its part to merge."""
    diag, pattern, alibi, q_len, kv_len = spec
    mask = _pair_mask(rows, keys, diag, pattern, alibi, mask, compute_dtype(q.dtype))
    return _part(q, k, v, mask, sinks=sinks,
                 q_lengths=_local_lengths(q_len, rows[0], rows[1] - rows[0]),
                 kv_lengths=_local_lengths(kv_len, keys[0], keys[1] - keys[0]),
                 num_threads=_worker_threads(), **kw)


def _merge(*parts):
    """Fixed-order merge of parts into one part: the same bits whatever
    order the tasks finished in."""
    outs, maxes, sums = (np.stack(a) for a in zip(*parts))
    return merge_partials(outs, maxes, sums=sums, lse_out=np.empty_like(maxes[0]),
                          sum_out=np.empty_like(sums[0]))


def _finish(part, dtype):
    """A merged part as (output in `dtype`, lse)."""
    out, row_max, row_sum = part
    return out.astype(dtype, copy=False), lse_of_state(row_max, row_sum)


def _tree(parts):
    """A balanced binary tree of merges over parts, in key order."""
    while len(parts) > 1:
        parts = [dask.delayed(_merge, pure=True)(*parts[i:i + 2]) if i + 1 < len(parts)
                 else parts[i] for i in range(0, len(parts), 2)]
    return parts[0]


def _as_dask(x, name):
    if isinstance(x, da.Array):
        if any(np.isnan(c) for axis in x.chunks for c in axis):
            # from boolean indexing, say: the pairs' positions would be unknown
            raise ValueError(f"{name} has unknown chunk sizes {x.chunks}; call "
                             f"{name}.compute_chunk_sizes() first")
        return x
    if isinstance(x, np.ndarray):
        return da.from_array(x, chunks=x.shape)
    raise TypeError(f"{name} must be a dask or NumPy array; got {type(x).__name__}")


def _bounds(chunks):
    edges = np.concatenate([[0], np.cumsum(chunks)]).astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def _prepare_mask(attn_mask, q, k):
    """attn_mask as a 4-D dask array chunked to match: q's chunks along
    (B, H, L), k's along S, one chunk on a broadcast (length-1) axis."""
    m = _as_dask(attn_mask, "attn_mask")
    full = q.shape[:3] + (k.shape[2],)
    # the in-process checks and messages: on the mask itself when it is in
    # memory (its values too), else on a stand-in of its dtype and shape
    check_mask(np.broadcast_to(np.zeros((), m.dtype), m.shape)
               if isinstance(attn_mask, da.Array) else attn_mask,
               compute_dtype(q.dtype), full, len(full))
    m = m.reshape((1,) * (4 - m.ndim) + m.shape)
    want = tuple((1,) if n == 1 else c
                 for n, c in zip(m.shape, q.chunks[:3] + (k.chunks[2],)))
    if not isinstance(attn_mask, da.Array):  # NumPy: cut to match, no warning
        return da.from_array(np.asarray(attn_mask).reshape(m.shape), chunks=want)
    if m.chunks != want:
        warnings.warn(f"attn_mask is rechunked from {m.chunks} to {want}, to match query's "
                      "(B, H, L) chunks and key's S chunks", PerformanceWarning, stacklevel=3)
        m = m.rechunk(want)
    return m


def _whole_call_options(q_shape, dtype, S, is_causal, scale, precision, **modifiers):
    """The options and scale checked as the in-process call checks them, on a
    stand-in for the whole call's problem (shapes only: nothing is computed);
    returns the ScoreOptions and the window as (left, right), None for an
    open side (causal: right 0)."""
    check_precision(precision)
    if q_shape[3] == 0:  # the in-process message
        raise ValueError(f"the head dimension E must be at least 1; got query {q_shape}")
    cdtype = compute_dtype(dtype)
    check_scale(scale, q_shape[3], cdtype)
    whole = types.SimpleNamespace(q=types.SimpleNamespace(shape=q_shape),
                                  k=types.SimpleNamespace(shape=(S, q_shape[3])),
                                  batch=(q_shape[0],), num_heads=q_shape[1], is_causal=is_causal,
                                  compute_dtype=cdtype)
    opts = prepare_options(whole, **modifiers)
    return opts, tuple(None if side < 0 else side for side in opts.window)


def scaled_dot_product_attention(query, key, value, attn_mask=None, is_causal=False, scale=None,
                                 enable_gqa=False, *, alignment="top_left", window=None,
                                 alibi_slopes=None, softcap=None, sinks=None, q_lengths=None,
                                 kv_lengths=None, precision=None, return_lse=False):
    """``pyattn.scaled_dot_product_attention`` on dask arrays (B, H, L, E).

    Batch, head and query chunks are independent blocks; every (query chunk,
    key chunk) pair that the causal or window pattern, or the lengths, do not
    fully mask is one task, and a query chunk's pairs are merged by a fixed
    binary tree of (max, sum) merges (bitwise reproducible).  ``attn_mask``
    (dask or NumPy, broadcastable to (B, Hq, L, S)) is rechunked, with a
    PerformanceWarning, unless its chunks match query's (B, H, L) and key's
    S.  Returns a dask array (and the lse with ``return_lse``), chunked like
    ``query``.
    """
    is_causal, enable_gqa = check_flag(is_causal, "is_causal"), check_flag(enable_gqa, "enable_gqa")
    q, k, v = (_as_dask(x, n) for x, n in ((query, "query"), (key, "key"), (value, "value")))
    for x, n in ((q, "query"), (k, "key"), (v, "value")):
        if x.ndim != 4:
            raise ValueError(f"{n} must be 4-D (B, H, L, E); got shape {x.shape}")
    (_, Hq, L, _), (_, Hkv, S, _) = q.shape, k.shape
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"key and value must agree on (B, H, S); got {k.shape} and {v.shape}")
    if k.chunks[:3] != v.chunks[:3]:
        raise ValueError("key and value must be chunked alike along (B, H, S); got "
                         f"{k.chunks[:3]} and {v.chunks[:3]}")
    if q.chunks[0] != k.chunks[0]:
        raise ValueError(f"query and key must be chunked alike along the batch; got "
                         f"{q.chunks[0]} and {k.chunks[0]}")
    if len(q.chunks[3]) > 1 or len(k.chunks[3]) > 1 or len(v.chunks[3]) > 1:
        raise ValueError("the channel axis (E, Ev) of query, key and value must be one chunk")
    group = Hq // Hkv if Hkv and Hq % Hkv == 0 else 0
    if Hq != Hkv and not (enable_gqa and group):
        raise ValueError(f"query heads ({Hq}) must equal key heads ({Hkv}), or be a multiple "
                         "of them with enable_gqa=True")
    if Hq == Hkv and q.chunks[1] != k.chunks[1]:
        raise ValueError(f"query and key must be chunked alike along the heads; got "
                         f"{q.chunks[1]} and {k.chunks[1]}")
    if Hq != Hkv and (len(k.chunks[1]) > 1 or any(c % group for c in q.chunks[1])):
        raise ValueError(f"with GQA, key/value heads must be one chunk and query head chunks "
                         f"multiples of the group size {group}; got {q.chunks[1]}")
    opts, window = _whole_call_options(q.shape, q.dtype, S, is_causal, scale, precision,
                                       alignment=alignment, window=window,
                                       alibi_slopes=alibi_slopes, softcap=softcap, sinks=sinks,
                                       q_lengths=q_lengths, kv_lengths=kv_lengths)
    pattern = (window, is_causal) if window != (None, None) else None
    q_len, kv_len = (None if n is None else np.array(n) for n in (opts.q_lengths, opts.kv_lengths))
    diag = np.array(opts.diag)  # row r's diagonal key is r + diag[b]
    alibi, sinks = opts.alibi, opts.sinks
    mb = None if attn_mask is None else _prepare_mask(attn_mask, q, k).to_delayed()
    kw = dict(scale=scale, enable_gqa=enable_gqa, softcap=opts.softcap or None,
              precision=precision)

    qb, kb, vb = q.to_delayed(), k.to_delayed(), v.to_delayed()
    rows_of, keys_of = _bounds(q.chunks[2]), _bounds(k.chunks[2])
    batch_of, heads_of = _bounds(q.chunks[0]), _bounds(q.chunks[1])
    outs = np.empty(qb.shape[:3], dtype=object)
    lses = np.empty(qb.shape[:3], dtype=object)
    for b, h, i in itertools.product(*map(range, qb.shape[:3])):
        hk = h if Hq == Hkv else 0
        bs, hs = slice(*batch_of[b]), slice(*heads_of[h])
        # with GQA, the query chunk's own key/value heads
        kv_heads = slice(hs.start // group, hs.stop // group) if Hq != Hkv else None
        b_diag = diag[bs] if (diag[bs] != diag[bs][:1]).any() else diag[bs][:1]
        b_q = np.full(b_diag.size, L) if q_len is None else q_len[bs]
        b_kv = np.full(b_diag.size, S) if kv_len is None else kv_len[bs]
        spec = (b_diag, pattern, None if alibi is None else alibi[hs],
                None if q_len is None else q_len[bs], None if kv_len is None else kv_len[bs])
        parts = []
        for j, keys in enumerate(keys_of):
            if not _live(rows_of[i], keys, b_diag, b_q, b_kv, window, bool(is_causal)):
                continue  # fully masked: never scheduled
            parts.append(_pair_task(qb, kb, vb, mb, (b, h, i, j), hk, kv_heads, rows_of[i],
                                    keys, spec, kw,
                                    # sinks join the softmax once per row: with the first pair
                                    None if sinks is None or parts else sinks[hs]))
        if not parts:  # no key for any row: the first pair gives zeros and lse -inf (or sinks)
            parts.append(_pair_task(qb, kb, vb, mb, (b, h, i, 0), hk, kv_heads, rows_of[i],
                                    keys_of[0], spec, kw,
                                    None if sinks is None else sinks[hs]))
        res = dask.delayed(_finish, pure=True, nout=2)(_tree(parts), q.dtype)
        shape = (q.chunks[0][b], q.chunks[1][h], q.chunks[2][i])
        outs[b, h, i] = da.from_delayed(res[0], shape + (v.shape[3],), dtype=q.dtype)
        lses[b, h, i] = da.from_delayed(res[1], shape, dtype=compute_dtype(q.dtype))
    out = da.block([[[[o] for o in row] for row in plane] for plane in outs.tolist()])
    if return_lse:
        return out, da.block(lses.tolist())
    return out


def _pair_task(qb, kb, vb, mb, index, hk, kv_heads, rows, keys, spec, kw, sinks):
    """The delayed _pair of query block (b, h, i) against key block j."""
    b, h, i, j = index
    kslice, vslice = kb[b, hk, j, 0], vb[b, hk, j, 0]
    if kv_heads is not None:
        kslice, vslice = kslice[:, kv_heads], vslice[:, kv_heads]
    mask = None
    if mb is not None:
        mask = mb[tuple(x if n > 1 else 0 for x, n in zip((b, h, i, j), mb.shape))]
    return dask.delayed(_pair, pure=True)(qb[b, h, i, 0], kslice, vslice, mask, rows, keys,
                                          spec, kw, sinks)


class _Shard:
    """One shard of a ShardedKVCache: a dask actor holding a KVCache in its
    worker's memory."""

    def __init__(self, batch, num_kv_heads, head_dim, shard_size, dtype, value_dim):
        self.cache = KVCache(batch, num_kv_heads, head_dim, max_len=shard_size, dtype=dtype,
                             value_dim=value_dim)
        # read here, in a task: actor methods run outside the worker's task threads
        self.threads = _worker_threads()

    def append(self, k_new, v_new):
        self.cache.append(k_new, v_new)

    def truncate(self, n):
        self.cache.truncate(n)

    def decode(self, query, keys, total, pattern, alibi, kw, sinks):
        """The part (_part) of query against the shard's positions [keys) of
        a cache of `total` positions, aligned lower-right to the whole cache."""
        L = query.shape[2]
        mask = _pair_mask((0, L), keys, np.array([total - L]), pattern, alibi, None,
                          compute_dtype(query.dtype))
        return _part(query, self.cache.keys, self.cache.values, mask, enable_gqa=True,
                     sinks=sinks, num_threads=self.threads, **kw)


class ShardedKVCache:
    """A KV cache whose positions are split into shards held by dask workers,
    for decoding against a context larger than one machine's memory.

    Each shard is a :class:`pyattn.KVCache` of at most ``shard_size``
    positions living in one worker's memory, held by a dask actor: appends
    and decode steps go from the client to the shard's worker directly, not
    through the scheduler (a round trip of ~2.5 ms instead of ~11 ms on 2
    cores, docs/scale-out.md).  Placement: ``append`` fills the newest shard
    up to ``shard_size`` positions, then opens the next shard on the next
    worker, round-robin over ``workers`` (default: the client's workers at
    construction, sorted).  Every sequence of the batch has the same length.

    ``decode(query)`` sends the query to every shard; each answers its
    partial output and (max, sum) state, computed with its worker's thread
    count, and the client merges them in shard order: the
    same bits whatever order the shards answer in.  A shard lost with its
    worker cannot be recomputed (an actor's state is not in the task graph):
    decode then raises, and the cache is rebuilt from its source.
    """

    def __init__(self, client, batch, num_kv_heads, head_dim, shard_size, *, dtype=np.float32,
                 value_dim=None, workers=None):
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise ValueError(f"shard_size must be a positive int; got {shard_size!r}")
        self.client = client
        self.shard_size = shard_size
        self.workers = sorted(client.scheduler_info()["workers"]) if workers is None \
            else list(workers)
        if not self.workers:
            raise ValueError("workers must name at least one worker; the client has none")
        # checked here, once, by the cache each shard will be
        self._template = KVCache(batch, num_kv_heads, head_dim, max_len=1, dtype=dtype,
                                 value_dim=value_dim)
        self._shards = []  # [actor, worker, start, stop]
        self.length = 0

    @property
    def shards(self):
        """(worker address, first position, end position) of each shard."""
        return [(w, a, b) for _, w, a, b in self._shards]

    def append(self, k_new, v_new):
        """Append n positions to every sequence: k_new (batch, num_kv_heads, n,
        head_dim), v_new (..., value_dim), split across shards as they fill."""
        t = self._template
        k_new, v_new = t._checked_new(k_new, v_new)
        # converted and checked here, once: a value the cache refuses fails
        # before any shard takes a position
        given = np.float32 if t.quantized else t.dtype
        k_new, v_new = (convert_stored(x, name, given) for x, name in ((k_new, "k_new"),
                                                                        (v_new, "v_new")))
        before = (len(self._shards), self._shards[-1][3] if self._shards else 0, self.length)
        try:
            self._append_to_shards(k_new, v_new)
        except BaseException:  # a shard refused its part (or the call was interrupted)
            self._roll_back(*before)
            raise

    def _append_to_shards(self, k_new, v_new):
        t = self._template
        n, done = k_new.shape[2], 0
        while done < n:
            if not self._shards or self._shards[-1][3] - self._shards[-1][2] == self.shard_size:
                worker = self.workers[len(self._shards) % len(self.workers)]
                actor = self.client.submit(
                    _Shard, t.batch, t.num_kv_heads, t.head_dim, self.shard_size, t.dtype,
                    t.value_dim, workers=[worker], allow_other_workers=False,
                    actor=True).result()
                self._shards.append([actor, worker, self.length, self.length])
            shard = self._shards[-1]
            take = min(n - done, self.shard_size - (shard[3] - shard[2]))
            # waited for: the next append or decode must find it there
            shard[0].append(k_new[:, :, done:done + take], v_new[:, :, done:done + take]).result()
            shard[3] += take
            done += take
            self.length += take

    def _roll_back(self, n_shards, last_stop, length):
        """Back to the state before an append that failed part-way: the shards
        it opened are dropped, the last one before it truncated."""
        del self._shards[n_shards:]
        if self._shards and self._shards[-1][3] != last_stop:
            actor, _, start, _ = self._shards[-1]
            actor.truncate(last_stop - start).result()
            self._shards[-1][3] = last_stop
        self.length = length

    def decode(self, query, *, scale=None, window=None, alibi_slopes=None, softcap=None,
               sinks=None, precision=None, return_lse=False):
        """Attention of query (batch, num_heads, L, head_dim) over every
        position, causally aligned to the end (as ``pyattn.decode_attention``):
        query i of L sees the positions up to length - L + i."""
        t = self._template
        q = np.asarray(query)
        if q.ndim != 4 or q.shape[0] != t.batch or q.shape[3] != t.head_dim:
            raise ValueError(f"query must have shape (batch={t.batch}, num_heads, L, "
                             f"head_dim={t.head_dim}); got {q.shape}")
        if not self._shards:
            raise ValueError("the cache is empty: append before decode")
        L = q.shape[2]
        opts, window = _whole_call_options(q.shape, q.dtype, self.length, True, scale, precision,
                                           alignment="lower_right", window=window,
                                           alibi_slopes=alibi_slopes, softcap=softcap,
                                           sinks=sinks)
        alibi, sinks = opts.alibi, opts.sinks
        kw = dict(scale=scale, softcap=opts.softcap or None, precision=precision)
        diag = np.array([self.length - L])
        one = np.ones(1, np.int64)
        calls = []
        for actor, _, start, stop in self._shards:
            if not _live((0, L), (start, stop), diag, one * L, one * self.length, window, True):
                continue  # no query sees this shard (causal, window)
            # all asked before any answer is awaited: the shards work at once;
            # sinks join the softmax once per row, with the first shard asked
            calls.append(actor.decode(q, (start, stop), self.length, (window, True), alibi, kw,
                                      sinks if not calls else None))
        parts = [call.result() for call in calls]
        out, lse = _finish(parts[0] if len(parts) == 1 else _merge(*parts), q.dtype)
        return (out, lse) if return_lse else out

    def __repr__(self):
        t = self._template
        return (f"ShardedKVCache(batch={t.batch}, num_kv_heads={t.num_kv_heads}, "
                f"head_dim={t.head_dim}, length={self.length}, shard_size={self.shard_size}, "
                f"shards={len(self._shards)}, dtype={t.dtype.name})")
