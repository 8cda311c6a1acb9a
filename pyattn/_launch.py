"""Launching the compiled kernel on a validated problem (the general path):
byte offsets and element strides for the driver, and the split-KV partials
and their merge.  The driver itself (pyattn/_attention.pyx) owns the team
size and fork safety."""
import functools

import numpy as np

from . import _attention, _dispatch, _plan
from ._arrays import check_fits, typed_access_ok
from ._options import prepare_options


def _element_strides(arr):
    """Strides of `arr` in elements (its typed access was checked before)."""
    return tuple(s // arr.itemsize for s in arr.strides)


# A launch covers at most this many batch items, so that its per-batch tables
# (byte offsets, diagonals, lengths) stay small whatever batch a broadcast
# view claims: a zero-stride batch of 2**28 would otherwise need 10 GiB.
BATCH_CHUNK = 1 << 16


def _batch_index(batch, start, stop):
    """The index along each batch axis of the flat batch items start..stop-1."""
    return np.unravel_index(np.arange(start, stop), batch or (1,))


def _batch_byte_offsets(arr, batch, index):
    """Byte offset in `arr` (broadcast to `batch`) of each batch item of `index`."""
    nb = len(batch)
    strides = np.broadcast_to(arr, batch + arr.shape[nb:]).strides[:nb]
    return sum((i * st for i, st in zip(index, strides)), np.zeros(index[0].size, np.int64))


def _per_batch(values, batch, index):
    """The per-batch `values` (shape `batch`, often a broadcast view) of the
    batch items of `index`, as the contiguous int64 array the driver reads."""
    if values is None:
        return None
    return np.ascontiguousarray(values.reshape(batch or (1,))[index], dtype=np.int64)


def _address(arr):
    return arr.__array_interface__["data"][0]


def run_kernel(prob, work_out, nthreads, weights=None, average_heads=False, opts=None,
               lse=None, precision=None, row_sum=None):
    """Fill `work_out` (a (*batch, H, L, Ev) view) from a validated problem
    and its ScoreOptions `opts` (None: none).  `weights`, when given, is a
    zeroed C-contiguous array that receives the softmax probabilities:
    (*batch, H, L, S), or (*batch, L, S) averaged over heads with
    `average_heads`; `lse`, a C-contiguous (*batch, H, L) array for the rows'
    logsumexp; `row_sum`, an array like it: then `lse` receives the rows'
    split-KV state, their max score, and `row_sum` their sum of exp(score -
    max), which merges where a logsumexp would round away the key count;
    `precision` one of _attention.PRECISIONS.  Returns the number of threads
    used (at most nthreads)."""
    if opts is None:
        opts = prepare_options(prob)
    dest = work_out  # an `out` C cannot write as typed elements gets a stand-in
    if not typed_access_ok(dest):
        dest = np.empty(work_out.shape, dtype=work_out.dtype)
    q, k, v = prob.q, prob.k, prob.v
    qs, ks, vs, os_ = (_element_strides(a) for a in (q, k, v, dest))
    arrays = [q, k, v, None, dest, prob.k_scales, prob.v_scales]
    scale_rows = tuple(0 if a is None else _element_strides(a)[-2]
                       for a in (prob.k_scales, prob.v_scales))
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
    dtype = prob.kernel_dtype
    bf16_products = _attention.wants_bf16_products(precision, dtype)
    n_qblocks = -(-L // _attention.block_rows(_dispatch.KERNEL, dtype, bf16_products))
    n_items = n_batch * prob.num_heads * n_qblocks
    key_chunk = 0 if weights is not None else _plan.split_keys(n_items, S)
    partial, chunk_lse, chunk_sum = None, lse, row_sum
    if key_chunk:  # each chunk writes its own normalised output and logsumexp
        n_chunks = -(-S // key_chunk)
        check_fits((n_chunks + 1) * dest.size, prob.compute_dtype.itemsize,
                   f"{n_chunks} split-KV partial results of shape {dest.shape}")
        # in the compute dtype: a half result is rounded once, after the merge
        partial = np.empty((n_chunks,) + dest.shape, dtype=prob.compute_dtype)
        chunk_lse = np.empty((n_chunks,) + dest.shape[:-1], dtype=prob.compute_dtype)
        chunk_sum = np.empty_like(chunk_lse)  # with chunk_lse: each chunk's (max, sum)
        arrays[4] = partial[0]
        os_ = _element_strides(partial[0])

    def head_stride(arr):  # bytes; 0 for a broadcast (length-1) head axis
        return 0 if arr is None or arr.shape[-3] == 1 else arr.strides[-3]

    # the split-KV partials' logsumexp spans the whole batch: one launch (they
    # have fewer than SPLIT_TARGET_ITEMS batch items anyway)
    step = n_batch if key_chunk else BATCH_CHUNK
    lse_step = prob.num_heads * L * prob.compute_dtype.itemsize  # bytes per batch item
    weights_step = 0 if weights is None else weights[(0,) * len(batch)].nbytes
    used = 0
    for start in range(0, n_batch, step):
        index = _batch_index(batch, start, min(start + step, n_batch))
        offsets = np.stack([np.zeros(index[0].size, np.int64) if a is None
                            else _batch_byte_offsets(a, batch, index) for a in arrays])
        used = max(used, _attention.attend(
            _dispatch.KERNEL, dtype,
            pointers=tuple(0 if a is None else _address(a) for a in arrays),
            batch_offsets=offsets,
            head_strides=tuple(head_stride(a) for a in arrays),
            num_heads=prob.num_heads, kv_group=prob.kv_group, sizes=(L, S, E, Ev),
            inner_strides=(qs[-2], qs[-1], ks[-2], ks[-1], vs[-2], vs[-1], os_[-2], os_[-1],
                           ms[-2], ms[-1]),
            mask_kind=mask_kind, scale=prob.scale, num_threads=nthreads,
            key_chunk=key_chunk, out_split_stride=0 if partial is None else partial.strides[0],
            lse_address=0 if chunk_lse is None else _address(chunk_lse) + start * lse_step,
            row_sum_address=0 if chunk_sum is None else _address(chunk_sum) + start * lse_step,
            weights_address=0 if weights is None else _address(weights) + start * weights_step,
            weights_batch_stride=weights_step,
            average_heads=average_heads,
            **opts.kernel_keywords(functools.partial(_per_batch, batch=batch, index=index)),
            out_real=partial is not None and partial.dtype != dest.dtype,
            bf16_products=bf16_products, quant_groups=prob.groups, scale_rows=scale_rows,
        ))
    if partial is not None:
        _plan.merge_partials(partial, chunk_lse, out=dest, lse_out=lse, sums=chunk_sum,
                             sum_out=row_sum)
    if dest is not work_out:
        work_out[...] = dest
    return used


