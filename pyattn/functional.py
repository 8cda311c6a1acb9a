"""pyattn's functional API: scaled dot-product attention on NumPy arrays."""
import dataclasses
import math

import numpy as np

from . import _attention, _dispatch, _launch, _plan
from ._arrays import MAX_NDIM, as_array, as_float_array, check_fits
from ._dtypes import compute_dtype
from ._options import ALIGNMENTS, prepare_options
from ._outputs import prepare_lse, prepare_out
from ._validation import check_flag, check_num_threads, prepare_attention

__all__ = ["merge_attention", "scaled_dot_product_attention"]


def scaled_dot_product_attention(query, key, value, attn_mask=None, is_causal=False,
                                 scale=None, enable_gqa=False, *, out=None,
                                 num_threads=None, alignment="top_left", window=None,
                                 alibi_slopes=None, softcap=None, sinks=None,
                                 q_lengths=None, kv_lengths=None, return_lse=False,
                                 precision=None):
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
        At most this many threads.  None: OpenMP's default
        (``OMP_NUM_THREADS``, threadpoolctl).  n > 0: n.  -1: all CPUs, -2:
        all but one, ...  A call with too little work for a team runs on the
        calling thread (docs/threads.md).
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
    precision : None, "exact" or "bf16"
        Where the CPU multiplies bfloat16 (``show_config()``:
        ``bf16_products``), "bf16" runs Q K^T and P V as bfloat16 products
        accumulated in float32, for float32, float16 and bfloat16 inputs; the
        softmax and the output stay in float32 (docs/precision.md).  None, the
        default, does so for bfloat16 inputs only; "exact" for none.  float64
        is always exact, and so is any CPU without bfloat16 units.

    Returns
    -------
    ndarray, (..., Hq, L, Ev), the inputs' dtype.  A query row for which no
    key takes part is zeros.  With return_lse: (output, lse (..., Hq, L)).
    """
    check_precision(precision)
    if (attn_mask is None and out is None and window is None and alibi_slopes is None
            and softcap is None and sinks is None and q_lengths is None and kv_lengths is None
            and return_lse is False and alignment in ALIGNMENTS):
        # the common call, checked and launched in compiled code (or None)
        result = _attention.simple_attention(query, key, value, is_causal, scale, enable_gqa,
                                             num_threads, _dispatch.KERNEL,
                                             alignment == "lower_right", precision)
        if result is not None:
            return result
    result, _, lse = attention(
        query, key, value, attn_mask, is_causal, scale, enable_gqa, out=out,
        num_threads=num_threads, return_lse=return_lse, alignment=alignment, window=window,
        alibi_slopes=alibi_slopes, softcap=softcap, sinks=sinks, q_lengths=q_lengths,
        kv_lengths=kv_lengths, precision=precision)
    return (result, lse) if return_lse else result


def check_precision(precision):
    """precision= must be one of _attention.PRECISIONS."""
    if precision is not None and (not isinstance(precision, str)
                                  or precision not in _attention.PRECISIONS):
        raise ValueError(f"precision must be None, 'exact' or 'bf16'; got {precision!r}")


def attention(query, key, value, attn_mask=None, is_causal=False, scale=None,
              enable_gqa=False, *, out=None, num_threads=None, weights=None,
              return_lse=False, precision=None, split_state=False, **modifiers):
    """scaled_dot_product_attention, optionally with its softmax probabilities:
    `weights` None, "heads" (..., H, L, S) or "mean" (..., L, S), the average
    over heads.  `modifiers` are prepare_options' keywords.  With
    `split_state` (and return_lse) the lse comes as the rows' split-KV state
    (max, sum), for merges that must keep the key count of a finfo.min row
    (_plan.merge_partials).  Returns (output, weights or None, lse or None)."""
    check_precision(precision)
    prob = prepare_attention(query, key, value, attn_mask, is_causal, scale, enable_gqa)
    opts = prepare_options(prob, **modifiers)
    return_lse = check_flag(return_lse, "return_lse")
    nthreads = check_num_threads(num_threads, _attention.max_threads)
    result = prepare_out(out, prob.out_shape, prob.dtype, prob.inputs)
    L, S = prob.q.shape[-2], prob.k.shape[-2]
    probs = lse = row_sum = None
    if weights is not None:
        heads = (prob.num_heads,) if weights == "heads" else ()
        check_fits(math.prod(prob.batch + heads + (L, S)), prob.compute_dtype.itemsize,
                   f"the attention weights {prob.batch + heads + (L, S)}")
        probs = np.zeros(prob.batch + heads + (L, S), dtype=prob.compute_dtype)
    if return_lse:
        lse = prepare_lse(prob)
        row_sum = np.empty_like(lse) if split_state else None
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
        if probs is None and _plan.heads_as_rows(prob, opts):
            prob, lifted, lse_view, sum_view = _plan.group_query_heads(prob, lifted, lse,
                                                                       row_sum)
            _launch.run_kernel(prob, lifted, nthreads, opts=opts, lse=lse_view,
                               precision=precision, row_sum=sum_view)
        else:
            _launch.run_kernel(prob, lifted, nthreads, probs, average_heads=weights == "mean",
                               opts=opts, lse=lse, precision=precision, row_sum=row_sum)
    elif work.size:  # no keys: every row is "fully masked"
        work[...] = 0
        if lse is not None:
            lse[...] = -np.inf if opts.sinks is None else opts.sinks[:, None]
            if opts.q_lengths is not None:
                padded = np.arange(L) >= opts.q_lengths.reshape(prob.batch + (1, 1))
                lse[np.broadcast_to(padded, lse.shape)] = -np.inf
            if row_sum is not None:  # a sink is a row's only term: (sink, 1)
                row_sum[...] = np.where(np.isneginf(lse), 0, 1)
    if probs is not None:  # back to the caller's batch dims
        probs = probs.reshape(result.shape[:-3 if weights == "mean" else -2] + probs.shape[-2:])
    if lse is not None:
        lse = lse.reshape(result.shape[:-1])
        if row_sum is not None:
            lse = (lse, row_sum.reshape(result.shape[:-1]))
    return result, probs, lse


_NO_PARTS = "merge_attention needs at least one part; got 0"


def _stacked(parts, name):
    """`parts`, a sequence of arrays, as one stacked array (checked to fit
    first: each part may be a broadcast view); any other value as it is."""
    if not isinstance(parts, (list, tuple)):
        return parts
    if not parts:
        raise ValueError(_NO_PARTS)
    arrays = [as_array(p, name) for p in parts]
    check_fits(sum(a.size for a in arrays), max(a.itemsize for a in arrays),
               f"{name}: the {len(arrays)} parts stacked")
    try:
        return np.stack(arrays)
    except ValueError:
        raise ValueError(f"{name} must be parts of one shape; got shapes "
                         f"{[a.shape for a in arrays]}") from None


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
    order give the same result up to rounding.  A row whose every score is
    near finfo.min loses its key counts in float32 lses: the parts then weigh
    alike (docs/api.md, "Exact merging").
    """
    # the parts have at most MAX_NDIM dimensions, and their stack one more
    outs = as_float_array(_stacked(outputs, "outputs"), "outputs", min_ndim=3,
                          layout="(n, ..., L, Ev)", max_ndim=MAX_NDIM + 1)
    ls = as_float_array(_stacked(lses, "lses"), "lses", min_ndim=2, layout="(n, ..., L)",
                        max_ndim=MAX_NDIM + 1)
    if ls.dtype != compute_dtype(outs.dtype):
        raise TypeError(f"lses must have dtype {compute_dtype(outs.dtype)} (as return_lse gives "
                        f"for {outs.dtype} outputs); got {ls.dtype}")
    if outs.shape[:-1] != ls.shape:
        raise ValueError(f"lses must have the outputs' shape without the last axis; got "
                         f"outputs {outs.shape} and lses {ls.shape}")
    if outs.shape[0] == 0:
        raise ValueError(_NO_PARTS)
    # the parts' weights and their sum, and the merged output (the result and
    # a division's) in the compute dtype: claimed sizes are checked first
    merged = math.prod(outs.shape[1:])
    check_fits(2 * ls.size + 3 * merged, ls.itemsize,
               f"merging {outs.shape[0]} outputs of shape {outs.shape[1:]}")
    if out is None:  # the outputs' dtype, also for the half types (merged in float32)
        out = np.empty(outs.shape[1:], dtype=outs.dtype)
    else:
        out = prepare_out(out, outs.shape[1:], outs.dtype, {"outputs": outs, "lses": ls})
    return _plan.merge_partials(outs, ls, out=out)
