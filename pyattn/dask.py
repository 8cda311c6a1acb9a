"""Attention over dask arrays: blocks over batch, heads and queries, key
chunks merged exactly with ``merge_attention`` (docs/scale-out.md).

Imported on its own (``import pyattn.dask``) so that ``import pyattn`` never
imports dask.
"""

import itertools

import dask
import dask.array as da
import numpy as np

from .functional import merge_attention
from .functional import scaled_dot_product_attention as _sdpa

__all__ = ["scaled_dot_product_attention"]

_UNSUPPORTED = ("attn_mask", "alibi_slopes", "q_lengths", "kv_lengths")


def _worker_threads():
    """The worker's thread count inside a dask worker, else None (OpenMP's
    default): several workers on one host must not each take every CPU."""
    try:
        from distributed import get_worker
        return get_worker().state.nthreads
    except (ImportError, ValueError):
        return None


def _visible(rows, keys, diag_shift, window, is_causal):
    """Boolean (len(rows), len(keys)): key c is visible from global row r.
    Row r's diagonal key is r + diag_shift."""
    d = rows[:, None] + diag_shift
    c = keys[None, :]
    ok = np.ones((rows.size, keys.size), dtype=bool)
    left, right = window if window is not None else (None, None)
    if is_causal:
        right = 0 if right is None else min(right, 0)
    if left is not None:
        ok &= c >= d - left
    if right is not None:
        ok &= c <= d + right
    return ok


def _any_visible(rows, keys, diag_shift, window, is_causal):
    """Whether any row of [rows) sees any key of [keys), from the bounds
    alone: row r's visible keys are one interval that moves by one per row."""
    left, right = window if window is not None else (None, None)
    if is_causal:
        right = 0 if right is None else min(right, 0)
    if left is not None and right is not None and left + right < 0:
        return False
    lo = -np.inf if left is None else rows[0] + diag_shift - left
    hi = np.inf if right is None else rows[1] - 1 + diag_shift + right
    return hi >= keys[0] and lo <= keys[1] - 1


def _pair(q, k, v, rows, keys, pattern, kw, sinks):
    """One (query chunk, key chunk) pair: partial output and lse.  A pair
    that the pattern cuts gets its visibility as a mask; a fully visible one
    runs unmasked."""
    mask = None
    if pattern is not None:
        mask = _visible(np.arange(*rows), np.arange(*keys), *pattern)
        if mask.all():
            mask = None
    return _sdpa(q, k, v, attn_mask=mask, sinks=sinks, return_lse=True,
                 num_threads=_worker_threads(), **kw)


def _merge(*parts):
    """Fixed-order merge of (out, lse) parts: the same bits whatever order
    the tasks finished in."""
    return merge_attention([p[0] for p in parts], [p[1] for p in parts])


def _tree(parts):
    """A balanced binary tree of merges over parts, in key order."""
    while len(parts) > 1:
        parts = [dask.delayed(_merge, pure=True)(*parts[i:i + 2]) if i + 1 < len(parts)
                 else parts[i] for i in range(0, len(parts), 2)]
    return parts[0]


def _as_dask(x, name):
    if isinstance(x, da.Array):
        return x
    if isinstance(x, np.ndarray):
        return da.from_array(x, chunks=x.shape)
    raise TypeError(f"{name} must be a dask or NumPy array; got {type(x).__name__}")


def _bounds(chunks):
    edges = np.concatenate([[0], np.cumsum(chunks)]).astype(int)
    return list(zip(edges[:-1].tolist(), edges[1:].tolist()))


def scaled_dot_product_attention(query, key, value, *, is_causal=False, scale=None,
                                 enable_gqa=False, alignment="top_left", window=None,
                                 softcap=None, sinks=None, precision=None, return_lse=False,
                                 **unsupported):
    """``pyattn.scaled_dot_product_attention`` on dask arrays (B, H, L, E).

    Batch, head and query chunks are independent blocks; every (query chunk,
    key chunk) pair that the causal or window pattern does not fully mask is
    one task, and a query chunk's pairs are merged by a fixed binary tree of
    ``merge_attention`` (bitwise reproducible).  Returns a dask array (and
    the lse with ``return_lse``), chunked like ``query``.
    """
    for name in unsupported:
        if name in _UNSUPPORTED:
            raise ValueError(f"{name} is not supported by pyattn.dask yet")
        raise TypeError(f"scaled_dot_product_attention() got an unexpected argument {name!r}")
    q, k, v = (_as_dask(x, n) for x, n in ((query, "query"), (key, "key"), (value, "value")))
    for x, n in ((q, "query"), (k, "key"), (v, "value")):
        if x.ndim != 4:
            raise ValueError(f"{n} must be 4-D (B, H, L, E); got shape {x.shape}")
    if alignment not in ("top_left", "lower_right"):
        raise ValueError(f"alignment must be 'top_left' or 'lower_right'; got {alignment!r}")
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
    if window is not None and not isinstance(window, tuple):
        window = (window, window)
    pattern = None
    if is_causal or window is not None:
        pattern = (0 if alignment == "top_left" else S - L, window, bool(is_causal))
    sinks = None if sinks is None else np.asarray(sinks)
    kw = dict(scale=scale, enable_gqa=enable_gqa, softcap=softcap, precision=precision)

    qb, kb, vb = q.to_delayed(), k.to_delayed(), v.to_delayed()
    rows_of, keys_of, heads_of = _bounds(q.chunks[2]), _bounds(k.chunks[2]), _bounds(q.chunks[1])
    outs = np.empty(qb.shape[:3], dtype=object)
    lses = np.empty(qb.shape[:3], dtype=object)
    for b, h, i in itertools.product(*map(range, qb.shape[:3])):
        hk = h if Hq == Hkv else 0
        h_sinks = None if sinks is None else sinks[slice(*heads_of[h])]
        parts = []
        for j, keys in enumerate(keys_of):
            if pattern is not None and not _any_visible(rows_of[i], keys, *pattern):
                continue  # fully masked: never scheduled
            kslice, vslice = kb[b, hk, j, 0], vb[b, hk, j, 0]
            if Hq != Hkv:  # the query chunk's own key/value heads
                h0, h1 = heads_of[h]
                sel = slice(h0 // group, h1 // group)
                kslice, vslice = kslice[:, sel], vslice[:, sel]
            # sinks join the softmax once per row: with the first scheduled pair
            parts.append(dask.delayed(_pair, pure=True)(
                qb[b, h, i, 0], kslice, vslice, rows_of[i], keys, pattern, kw,
                h_sinks if not parts else None))
        if not parts:
            raise ValueError(f"query rows {rows_of[i]} see no key under the causal/window "
                             "pattern")
        res = _tree(parts)
        shape = (q.chunks[0][b], q.chunks[1][h], q.chunks[2][i])
        outs[b, h, i] = da.from_delayed(res[0], shape + (v.shape[3],), dtype=q.dtype)
        lses[b, h, i] = da.from_delayed(res[1], shape, dtype=np.result_type(q.dtype, np.float32))
    out = da.block([[[[o] for o in row] for row in plane] for plane in outs.tolist()])
    if return_lse:
        return out, da.block(lses.tolist())
    return out

