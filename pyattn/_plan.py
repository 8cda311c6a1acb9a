"""The work plan of a call, decided from its shape alone (never the thread
count, so results stay bitwise thread-invariant): split-KV chunks and their
exact merge, and grouped-query heads run as the rows of one problem."""
import dataclasses

import numpy as np

from . import _attention
from ._arrays import compact


def _query_group(prob):
    """Query heads per key/value head, counting a single (broadcast) key/value
    head as shared by all (MQA); 1 when the heads do not group."""
    hk, hv = prob.k.shape[-3], prob.v.shape[-3]
    if hk != hv or prob.q.shape[-3] != prob.num_heads:
        return 1
    return prob.num_heads // hk


def heads_as_rows(prob, opts):
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
    last_key = (prob.k.shape[-2] if opts.kv_lengths is None else compact(opts.kv_lengths)) - 1
    return left < 0 and (right < 0 or bool((compact(opts.diag) + right >= last_key).all()))


def group_query_heads(prob, work_out, *per_row):
    """(problem, output, *per_row) views with the g query heads of each
    key/value head as g rows: (..., Hkv * g, 1, E) -> (..., Hkv, g, E);
    `per_row` are (..., H, 1) arrays such as the lse (None stays None)."""
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
    rows = (None if a is None else as_rows(a[..., np.newaxis])[..., 0] for a in per_row)
    return (grouped, as_rows(work_out), *rows)


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


def lse_of_state(row_max, row_sum):
    """The logsumexp of rows whose split-KV state is (max, sum of exp(score -
    max)): -inf where the sum is 0 (no key)."""
    with np.errstate(divide="ignore"):
        return (row_max + np.log(row_sum)).astype(row_max.dtype, copy=False)


def merge_partials(outputs, lses, out=None, lse_out=None, sums=None, sum_out=None):
    """Combine attention over disjoint key ranges into attention over all of
    them: outputs (n, ..., L, Ev) each normalised over its keys, lses (n, ...,
    L) their logsumexps.  With `sums` (the kernel's split-KV partials), lses
    are the parts' max scores and sums their sums of exp(score - max), so that
    a part's key count survives a max as large as finfo.min.  A part with lse
    -inf (no key) adds nothing, even a NaN output (as other libraries give for
    such rows); rows with no key anywhere are zeros.  Returns (output, lse),
    written into `out` and `lse_out` when given; with `sum_out`, the merged
    state instead: (output, max, sum), the max in `lse_out` (which is then
    required) and the sum in `sum_out`, ready for a further merge."""
    row_max = lses.max(axis=0)
    top = np.where(np.isneginf(row_max), 0, row_max)  # all -inf: weights 0, not NaN
    with np.errstate(invalid="ignore"):  # +inf - +inf: NaN rows stay NaN, quietly
        weights = np.exp(lses - top)
    if sums is not None:
        weights = weights * sums
    total = weights.sum(axis=0)
    no_key = np.isneginf(lses)  # such a part adds nothing, whatever its output holds (NaN)
    if no_key.any():
        outputs = np.where(no_key[..., None], 0, outputs)
    merged = np.einsum("n...l,n...le->...le", weights, outputs)
    merged = np.divide(merged, total[..., None], out=np.zeros_like(merged),
                       where=total[..., None] != 0)
    if out is not None:
        out[...] = merged
        merged = out
    if sum_out is not None:
        lse_out[...] = row_max
        sum_out[...] = total  # relative to row_max: top differs only where total is 0
        return merged, lse_out, sum_out
    lse = lse_of_state(top, total)
    if lse_out is not None:
        lse_out[...] = lse
        lse = lse_out
    return merged, lse
