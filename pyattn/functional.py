"""pyattn's functional API: scaled dot-product attention on NumPy arrays."""
import dataclasses
import math
import os

import numpy as np

from . import _attention, _dispatch
from ._validation import (
    as_float_array,
    check_fits,
    check_flag,
    check_num_threads,
    compute_dtype,
    prepare_attention,
    prepare_options,
    prepare_out,
    typed_access_ok,
)

__all__ = ["merge_attention", "scaled_dot_product_attention"]


def _element_strides(arr):
    """Strides of `arr` in elements (its typed access was checked before)."""
    return tuple(s // arr.itemsize for s in arr.strides)


def _batch_byte_offsets(arr, batch):
    """Byte offset of every flat batch index of `arr` (broadcast to `batch`)."""
    nb = len(batch)
    strides = np.broadcast_to(arr, batch + arr.shape[nb:]).strides[:nb]
    offsets = np.zeros(batch, dtype=np.int64)
    for axis, (n, stride) in enumerate(zip(batch, strides)):
        shape = [1] * nb
        shape[axis] = n
        offsets = offsets + (np.arange(n, dtype=np.int64) * stride).reshape(shape)
    return offsets.reshape(-1)


def _address(arr):
    return arr.__array_interface__["data"][0]


# Fork safety.  libgomp keeps the worker threads of a parallel region as a
# pool of the thread that started it.  A child forked after that inherits the
# pool's bookkeeping but not its threads, and its next parallel region of more
# than one thread waits for them forever.  So a process forked (at any depth)
# from one that ran a multi-threaded region computes on one thread: a region
# of one thread never touches the pool.  spawn and forkserver children are
# fresh processes and use every thread.
_parallel_started = False  # this process may own a libgomp worker pool
_forked_after_parallel = False


def _after_fork_in_child():
    global _forked_after_parallel
    _forked_after_parallel = _forked_after_parallel or _parallel_started


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def scaled_dot_product_attention(query, key, value, attn_mask=None, is_causal=False,
                                 scale=None, enable_gqa=False, *, out=None,
                                 num_threads=None, alignment="top_left", window=None,
                                 alibi_slopes=None, softcap=None, sinks=None,
                                 q_lengths=None, kv_lengths=None, return_lse=False):
    """softmax(query @ key^T * scale + mask) @ value, like PyTorch's
    ``torch.nn.functional.scaled_dot_product_attention`` (without dropout).

    Parameters
    ----------
    query : array_like, (..., Hq, L, E) or (L, E)
    key : array_like, (..., Hkv, S, E)
    value : array_like, (..., Hkv, S, Ev)
        float32 or float64, or float16 / bfloat16 (stored as such, computed
        in float32); one dtype for all three; any strides.  Leading batch
        dimensions broadcast against each other.
    attn_mask : array_like, optional
        Broadcastable to (..., Hq, L, S).  bool: True means the key takes
        part; float: added to the scaled scores (use -inf to exclude).
    is_causal : bool
        Query i sees keys up to its diagonal (see ``alignment``).  Combines
        with ``attn_mask``.
    scale : float, optional
        Multiplies ``query @ key^T``; defaults to ``1 / sqrt(E)``.
    enable_gqa : bool
        Allow Hq to be a multiple of Hkv: query head h uses key/value head
        ``h // (Hq // Hkv)``.
    out : ndarray, optional
        Written in place and returned; must have the result's shape and dtype,
        be writable and not overlap the inputs.
    num_threads : int, optional
        None: OpenMP's default (``OMP_NUM_THREADS``, threadpoolctl).  n > 0:
        exactly n threads.  -1: all CPUs, -2: all but one, ...
    alignment : "top_left" or "lower_right"
        Where query i's diagonal key lies, for ``is_causal``, ``window`` and
        ALiBi: key i (PyTorch's ``is_causal``), or key i + S - L (PyTorch's
        ``causal_lower_right``; per sequence with lengths).
    window : int or (left, right), optional
        Local attention: query i sees keys d - left .. d + right around its
        diagonal key d (None on a side: unbounded; an int w: (w, w)).  Key
        tiles outside every row's window are skipped.
    alibi_slopes : array_like (Hq,), optional
        Adds -slope[h] * |d - j| to the scores of head h.
    softcap : float, optional
        Scores become softcap * tanh(score / softcap), before bias and mask.
    sinks : array_like (Hq,), optional
        One logit per head added to the softmax's denominator (an attention
        sink, as gpt-oss): the weights of a row then sum to less than 1.
    q_lengths, kv_lengths : array_like of ints, broadcastable to the batch
        dimensions, optional
        Valid queries and keys per sequence of a padded batch; the rest costs
        nothing, padded query rows are zeros.
    return_lse : bool
        Also return the logsumexp of each row's scores (natural log, sink
        included; -inf for a row with no key), the input for merge_attention.

    Returns
    -------
    ndarray, (..., Hq, L, Ev), the inputs' dtype.  A query row for which no
    key takes part is zeros.  With return_lse: (output, lse (..., Hq, L)).
    """
    result, _, lse = attention(
        query, key, value, attn_mask, is_causal, scale, enable_gqa, out=out,
        num_threads=num_threads, return_lse=return_lse, alignment=alignment, window=window,
        alibi_slopes=alibi_slopes, softcap=softcap, sinks=sinks, q_lengths=q_lengths,
        kv_lengths=kv_lengths)
    return (result, lse) if return_lse else result


def attention(query, key, value, attn_mask=None, is_causal=False, scale=None,
              enable_gqa=False, *, out=None, num_threads=None, weights=None,
              return_lse=False, **modifiers):
    """scaled_dot_product_attention, optionally with its softmax probabilities:
    `weights` None, "heads" (..., H, L, S) or "mean" (..., L, S), the average
    over heads.  `modifiers` are prepare_options' keywords.  Returns (output,
    weights or None, lse or None)."""
    prob = prepare_attention(query, key, value, attn_mask, is_causal, scale, enable_gqa)
    opts = prepare_options(prob, **modifiers)
    return_lse = check_flag(return_lse, "return_lse")
    nthreads = check_num_threads(num_threads, _attention.max_threads)
    read = {"query": prob.q, "key": prob.k, "value": prob.v, "attn_mask": prob.mask}
    result = prepare_out(out, prob.out_shape, prob.dtype, read)
    L, S = prob.q.shape[-2], prob.k.shape[-2]
    probs = lse = None
    if weights is not None:
        heads = (prob.num_heads,) if weights == "heads" else ()
        check_fits(math.prod(prob.batch + heads + (L, S)), prob.compute_dtype.itemsize,
                   f"the attention weights {prob.batch + heads + (L, S)}")
        probs = np.zeros(prob.batch + heads + (L, S), dtype=prob.compute_dtype)
    if return_lse:
        check_fits(math.prod(prob.work_shape[:-1]), prob.compute_dtype.itemsize,
                   f"the logsumexp, of shape {prob.work_shape[:-1]},")
        lse = np.empty(prob.work_shape[:-1], dtype=prob.compute_dtype)
    work = result
    if work.size == 0 and any(a is not None and a.size for a in (lse, probs)):
        # Ev = 0: no output, but the logsumexp and the weights do not depend
        # on the values: compute them against one zero column, thrown away
        zero_column = np.broadcast_to(np.zeros(1, prob.dtype), prob.v.shape[:-1] + (1,))
        prob = dataclasses.replace(prob, v=zero_column,
                                   work_shape=prob.work_shape[:-1] + (1,))
        work = np.zeros(prob.work_shape, dtype=prob.dtype)
    if work.size and S > 0:
        lifted = work[(np.newaxis,) * (len(prob.work_shape) - work.ndim)]  # a view
        if probs is None and _heads_as_rows(prob, opts):
            prob, lifted, lse_view = _group_query_heads(prob, lifted, lse)
            run_kernel(prob, lifted, nthreads, opts=opts, lse=lse_view)
        else:
            run_kernel(prob, lifted, nthreads, probs, average_heads=weights == "mean",
                       opts=opts, lse=lse)
    elif work.size:  # no keys: every row is "fully masked"
        work[...] = 0
        if lse is not None:
            lse[...] = -np.inf if opts.sinks is None else opts.sinks[:, None]
            if opts.q_lengths is not None:
                padded = np.arange(L) >= opts.q_lengths.reshape(prob.batch + (1, 1))
                lse[np.broadcast_to(padded, lse.shape)] = -np.inf
    if probs is not None:  # back to the caller's batch dims
        probs = probs.reshape(result.shape[:-3 if weights == "mean" else -2] + probs.shape[-2:])
    if lse is not None:
        lse = lse.reshape(result.shape[:-1])
    return result, probs, lse


def _query_group(prob):
    """Query heads per key/value head, counting a single (broadcast) key/value
    head as shared by all (MQA); 1 when the heads do not group."""
    hk, hv = prob.k.shape[-3], prob.v.shape[-3]
    if hk != hv or prob.q.shape[-3] != prob.num_heads:
        return 1
    return prob.num_heads // hk


def _heads_as_rows(prob, opts):
    """Whether a grouped-query (or multi-query) call with one query row can
    run its query heads as the rows of one problem per key/value head: each
    key/value head is then read once for its whole group.  Only when nothing
    depends on the head or on the row's position (the rows would be heads, all
    at position 0): no mask, ALiBi, sinks or lengths of queries, and a window
    that hides no valid key of any sequence."""
    if (_query_group(prob) == 1 or prob.q.shape[-2] != 1 or prob.mask is not None
            or opts.alibi is not None or opts.sinks is not None or opts.q_lengths is not None):
        return False
    left, right = opts.window
    last_key = (prob.k.shape[-2] if opts.kv_lengths is None else opts.kv_lengths) - 1
    return left < 0 and (right < 0 or bool((opts.diag + right >= last_key).all()))


def _group_query_heads(prob, work_out, lse):
    """(problem, output, lse) views with the g query heads of each key/value
    head as g rows: (..., Hkv * g, 1, E) -> (..., Hkv, g, E)."""
    g = _query_group(prob)

    def as_rows(a):  # (..., H, 1, W) -> (..., H / g, g, W)
        head = a.ndim - 3
        hs = a.strides[head]
        return np.lib.stride_tricks.as_strided(
            a, a.shape[:head] + (a.shape[head] // g, g) + a.shape[head + 2:],
            a.strides[:head] + (hs * g, hs) + a.strides[head + 2:])

    q = as_rows(prob.q)
    work_shape = prob.batch + (prob.num_heads // g, g, prob.work_shape[-1])
    grouped = dataclasses.replace(prob, q=q, num_heads=prob.num_heads // g, kv_group=1,
                                  work_shape=work_shape)
    grouped_lse = None if lse is None else as_rows(lse[..., np.newaxis])[..., 0]
    return grouped, as_rows(work_out), grouped_lse


def run_kernel(prob, work_out, nthreads, weights=None, average_heads=False, opts=None,
               lse=None):
    """Fill `work_out` (a (*batch, H, L, Ev) view) from a validated problem
    and its ScoreOptions `opts` (None: none).  `weights`, when given, is a
    zeroed C-contiguous array that receives the softmax probabilities:
    (*batch, H, L, S), or (*batch, L, S) averaged over heads with
    `average_heads`; `lse`, a C-contiguous (*batch, H, L) array for the rows'
    logsumexp.  Returns the number of threads used."""
    global _parallel_started
    if nthreads > 1:
        if _forked_after_parallel:
            nthreads = 1  # see _after_fork_in_child
        else:
            _parallel_started = True  # before the region: another thread may fork
    if opts is None:
        opts = prepare_options(prob)
    dest = work_out  # an `out` C cannot write as typed elements gets a stand-in
    if not typed_access_ok(dest):
        dest = np.empty(work_out.shape, dtype=work_out.dtype)
    q, k, v = prob.q, prob.k, prob.v
    qs, ks, vs, os_ = (_element_strides(a) for a in (q, k, v, dest))
    arrays = [q, k, v, None, dest]
    mask_kind, ms = _attention.MASK_NONE, (0, 0, 0)
    if prob.mask is not None:
        is_bool = prob.mask.dtype == np.bool_
        mask = prob.mask.view(np.uint8) if is_bool else prob.mask
        ms = _element_strides(mask)
        arrays[3] = mask
        mask_kind = _attention.MASK_BOOL if is_bool else _attention.MASK_ADDITIVE

    batch = prob.batch
    n_batch = int(np.prod(batch, dtype=np.int64))
    L, S, E, Ev = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    n_qblocks = -(-L // _attention.block_rows(_dispatch.KERNEL, q.dtype.name))
    key_chunk = 0 if weights is not None else split_keys(n_batch * prob.num_heads * n_qblocks, S)
    partial, chunk_lse = None, lse
    if key_chunk:  # each chunk writes its own normalised output and logsumexp
        n_chunks = -(-S // key_chunk)
        check_fits((n_chunks + 1) * dest.size, prob.compute_dtype.itemsize,
                   f"{n_chunks} split-KV partial results of shape {dest.shape}")
        # in the compute dtype: a half result is rounded once, after the merge
        partial = np.empty((n_chunks,) + dest.shape, dtype=prob.compute_dtype)
        chunk_lse = np.empty((n_chunks,) + dest.shape[:-1], dtype=prob.compute_dtype)
        arrays[4] = partial[0]
        os_ = _element_strides(partial[0])

    offsets = np.zeros((5, n_batch), dtype=np.int64)
    for i, arr in enumerate(arrays):
        if arr is not None:
            offsets[i] = _batch_byte_offsets(arr, batch)

    def head_stride(arr):  # bytes; 0 for a broadcast (length-1) head axis
        return 0 if arr is None or arr.shape[-3] == 1 else arr.strides[-3]

    used = _attention.attend(
        _dispatch.KERNEL, q.dtype.name,
        pointers=tuple(0 if a is None else _address(a) for a in arrays),
        batch_offsets=offsets,
        head_strides=tuple(head_stride(a) for a in arrays),
        num_heads=prob.num_heads, kv_group=prob.kv_group, sizes=(L, S, E, Ev),
        inner_strides=(qs[-2], qs[-1], ks[-2], ks[-1], vs[-2], vs[-1], os_[-2], os_[-1],
                       ms[-2], ms[-1]),
        mask_kind=mask_kind, window=opts.window, scale=prob.scale, num_threads=nthreads,
        key_chunk=key_chunk, out_split_stride=0 if partial is None else partial.strides[0],
        lse_address=0 if chunk_lse is None else _address(chunk_lse),
        weights_address=0 if weights is None else _address(weights),
        weights_batch_stride=0 if weights is None else weights[(0,) * len(batch)].nbytes,
        average_heads=average_heads, softcap=opts.softcap, diag=opts.diag, alibi=opts.alibi,
        sinks=opts.sinks, q_lengths=opts.q_lengths, kv_lengths=opts.kv_lengths,
        out_real=partial is not None and partial.dtype != dest.dtype,
    )
    if partial is not None:
        merge_partials(partial, chunk_lse, out=dest, lse_out=lse)
    if dest is not work_out:
        work_out[...] = dest
    return used


# Split-KV ("flash decoding"): with few (batch, head, query block) items there
# is too little to share among threads, so long key ranges are cut into
# chunks computed in parallel and merged exactly.  The rule looks at the shape
# only, never the thread count, so results stay identical for any num_threads.
SPLIT_TARGET_ITEMS = 16   # aim for at least this many work items
SPLIT_MIN_KEYS = _attention.KEY_CHUNK  # chunk granularity (a multiple of every BLOCK_N)


def split_keys(n_items, S):
    """Keys per chunk for a call with `n_items` work items, or 0 for no split."""
    if n_items >= SPLIT_TARGET_ITEMS or S < 2 * SPLIT_MIN_KEYS:
        return 0
    n_chunks = min(-(-SPLIT_TARGET_ITEMS // n_items), S // SPLIT_MIN_KEYS)
    chunk = -(-S // n_chunks)
    return -(-chunk // SPLIT_MIN_KEYS) * SPLIT_MIN_KEYS


def merge_partials(outputs, lses, out=None, lse_out=None):
    """Combine attention over disjoint key ranges into attention over all of
    them: outputs (n, ..., L, Ev) each normalised over its keys, lses (n, ...,
    L) their logsumexps.  Rows with no key anywhere (all lse -inf) are zeros.
    Returns (output, lse), written into `out` and `lse_out` when given."""
    top = lses.max(axis=0)
    top = np.where(np.isneginf(top), 0, top)  # all -inf: weights 0, not NaN
    weights = np.exp(lses - top)
    total = weights.sum(axis=0)
    merged = np.einsum("n...l,n...le->...le", weights, outputs)
    merged = np.divide(merged, total[..., None], out=np.zeros_like(merged),
                       where=total[..., None] != 0)
    with np.errstate(divide="ignore"):
        lse = (top + np.log(total)).astype(lses.dtype, copy=False)
    if out is not None:
        out[...] = merged
        merged = out
    if lse_out is not None:
        lse_out[...] = lse
        lse = lse_out
    return merged, lse


def merge_attention(outputs, lses, *, out=None):
    """Attention over several disjoint sets of keys, merged into attention
    over their union, exactly: the basis of split-KV decoding and of sharding
    one sequence's keys across processes or machines.

    Parameters
    ----------
    outputs : sequence of arrays (..., L, Ev), or one array (n, ..., L, Ev)
        Each part's attention output, normalised over its own keys.
    lses : sequence of arrays (..., L), or one array (n, ..., L)
        Each part's logsumexp, from ``return_lse=True`` (-inf: no key).
    out : ndarray, optional
        Receives the merged output.

    Returns
    -------
    (output (..., L, Ev) in the outputs' dtype, lse (..., L) in the lses').  Parts in any
    order give the same result up to rounding.
    """
    outs = as_float_array(np.stack(outputs) if isinstance(outputs, (list, tuple)) else outputs,
                          "outputs", min_ndim=3, layout="(n, ..., L, Ev)")
    ls = as_float_array(np.stack(lses) if isinstance(lses, (list, tuple)) else lses,
                        "lses", min_ndim=2, layout="(n, ..., L)")
    if ls.dtype != compute_dtype(outs.dtype):
        raise TypeError(f"lses must have dtype {compute_dtype(outs.dtype)} (as return_lse gives "
                        f"for {outs.dtype} outputs); got {ls.dtype}")
    if outs.shape[:-1] != ls.shape:
        raise ValueError(f"lses must have the outputs' shape without the last axis; got "
                         f"outputs {outs.shape} and lses {ls.shape}")
    if outs.shape[0] == 0:
        raise ValueError("merge_attention needs at least one part; got 0")
    if out is None:  # the outputs' dtype, also for the half types (merged in float32)
        out = np.empty(outs.shape[1:], dtype=outs.dtype)
    else:
        out = prepare_out(out, outs.shape[1:], outs.dtype, {"outputs": outs, "lses": ls})
    return merge_partials(outs, ls, out=out)
