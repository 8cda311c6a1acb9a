# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Parallel driver: runs one C kernel over batch x heads x query blocks x key
chunks.

The Python layer (functional.py) has already validated and normalised every
input; this module only turns its plain numbers into a `prange` with the GIL
released.  Units: `batch_offsets` and `head_strides` are in bytes (NumPy
strides), the inner strides in `problem` are in elements (the kernel indexes
typed pointers).
"""
from cython.parallel cimport parallel, prange, threadid
from libc.math cimport INFINITY
from libc.stdint cimport SIZE_MAX, int64_t, uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

from ._kernels cimport *  # the C boundary, declared once in _kernels.pxd

MASK_NONE, MASK_BOOL, MASK_ADDITIVE = PYATTN_MASK_NONE, PYATTN_MASK_BOOL, PYATTN_MASK_ADDITIVE
KEY_CHUNK = PYATTN_KEY_CHUNK  # split-KV chunks are multiples of this many keys

# Storage dtypes of q, k, v and out, in the C registry's order; the half
# types compute in float32, which is then the dtype of the mask, the
# logsumexp and the weights.
DTYPES = tuple(pyattn_dtypes[i].name.decode() for i in range(PYATTN_NUM_DTYPES))
COMPUTE_ITEMSIZE = {pyattn_dtypes[i].name.decode(): pyattn_dtypes[i].compute_itemsize
                    for i in range(PYATTN_NUM_DTYPES)}


def openmp_enabled():
    """Whether this binary was built with OpenMP."""
    return bool(pyattn_openmp_enabled())


def max_threads():
    """omp_get_max_threads(): honours OMP_NUM_THREADS and threadpoolctl."""
    return pyattn_max_threads()


def physical_memory():
    """Bytes of RAM of this machine (read once)."""
    return pyattn_physical_memory()


def kernel_names():
    """The kernel sets compiled into this binary, best first."""
    return tuple(pyattn_kernel_set(i).name.decode() for i in range(pyattn_num_kernel_sets()))


def has_kernel(str name):
    """Whether the kernels called `name` were compiled into this binary."""
    return pyattn_kernels_by_name(name.encode()) != NULL


def cpu_supports(str name):
    """Whether this CPU can run the kernels called `name` (False when this
    binary has none of that name)."""
    cdef const pyattn_kernels *table = pyattn_kernels_by_name(name.encode())
    return table != NULL and bool(table.cpu_supports())


cdef const pyattn_dtype_kernel *_dtype_kernel(str name, str dtype) except NULL:
    cdef const pyattn_kernels *table = pyattn_kernels_by_name(name.encode())
    cdef const pyattn_dtype_kernel *dk
    if table == NULL:
        raise ValueError(f"no kernels called {name!r} in this build")
    if dtype not in DTYPES:
        raise TypeError(f"no kernels for dtype {dtype}; they exist for {', '.join(DTYPES)}")
    dk = &table.by_dtype[DTYPES.index(dtype)]
    if dk.attend == NULL:
        raise TypeError(f"this build has no {dtype} kernels (its compiler lacks _Float16)")
    return dk


def has_dtype(str kernel, str dtype):
    """Whether the kernels called `kernel` handle `dtype` in this build."""
    try:
        _dtype_kernel(kernel, dtype)
    except TypeError:
        return False
    return True


def block_rows(str kernel, str dtype):
    """Query rows per work item for that kernel and dtype."""
    return _dtype_kernel(kernel, dtype).block_rows


def kernel_exp2(str kernel, x, y):
    """y[:] = 2**x[:] with that kernel's vectorised exp; x, y contiguous 1-D
    arrays of one float dtype.  For testing the exp's accuracy."""
    cdef const unsigned char[::1] xb = x.view("u1")
    cdef unsigned char[::1] yb = y.view("u1")
    if x.shape != y.shape or x.dtype != y.dtype or x.ndim != 1 or x.size == 0:
        raise ValueError("x and y must be non-empty 1-D arrays of one shape and dtype")
    _dtype_kernel(kernel, x.dtype.name).exp2(&xb[0], &yb[0], x.size)


cdef inline pyattn_block _block(int64_t row0, int64_t block, int64_t L, int64_t chunk,
                                int64_t key_chunk, int64_t S) noexcept nogil:
    cdef pyattn_block blk
    memset(&blk, 0, sizeof(blk))
    blk.row0 = row0
    blk.nrows = min(block, L - row0)
    blk.key0 = chunk * key_chunk
    blk.key1 = S if key_chunk == 0 else min(S, blk.key0 + key_chunk)
    blk.sink = -INFINITY
    return blk


cdef void _padding_rows(char *out, char *lse, int64_t r0, int64_t r1, const pyattn_problem *p,
                        int itemsize, int lse_itemsize) noexcept nogil:
    """Rows [r0, r1) past a sequence's length: zeros, and logsumexp -inf."""
    cdef int64_t r, x
    for r in range(r0, r1):
        for x in range(p.Ev):
            memset(out + (r * p.o_row + x * p.o_col) * itemsize, 0, itemsize)
        if lse != NULL:
            if lse_itemsize == 4:
                (<float *>lse)[r] = -INFINITY
            else:
                (<double *>lse)[r] = -INFINITY


def attend(str kernel, str dtype, *, tuple pointers,
           const int64_t[:, ::1] batch_offsets, tuple head_strides,
           int64_t num_heads, int64_t kv_group, tuple sizes,
           tuple inner_strides, int mask_kind, tuple window, double scale,
           int num_threads, int64_t key_chunk=0, int64_t out_split_stride=0,
           uintptr_t lse_address=0, uintptr_t weights_address=0,
           int64_t weights_batch_stride=0, bint average_heads=False,
           double softcap=0, const int64_t[::1] diag=None, const double[::1] alibi=None,
           const double[::1] sinks=None, const int64_t[::1] q_lengths=None,
           const int64_t[::1] kv_lengths=None, bint out_real=False):
    """Run the kernel on every (batch, head, query block, key chunk); every
    argument after the dtype is passed by keyword.

    pointers       data addresses of (q, k, v, mask, out); mask may be 0
    batch_offsets  (5, B) byte offsets of each flat batch index, same order
    head_strides   byte strides of the head axis, same order (0 = broadcast)
    kv_group       query heads per key/value head (GQA); kv head = h // kv_group
    sizes          (L, S, E, Ev)
    inner_strides  element strides (q_row, q_col, k_row, k_col, v_row, v_col,
                   o_row, o_col, mask_row, mask_col)
    window         (left, right): row i sees keys i + diag - left .. i + diag + right;
                   -1 leaves a side open; causal is (-1, 0)
    key_chunk      0: every item reads all S keys.  Otherwise keys are split
                   into chunks of this many (a multiple of KEY_CHUNK); chunk c
                   writes its partial output at out + c * out_split_stride
                   bytes and, at lse_address, the rows' logsumexp as a
                   contiguous (chunks, B, H, L) array of the compute dtype.
    weights_address  0, or a zeroed contiguous array that receives the
                   softmax probabilities: (B, H, L, S), or (B, L, S) with
                   average_heads (the mean over heads).  Needs key_chunk 0.
    weights_batch_stride  its batch stride in bytes.
    softcap        > 0: scores become softcap * tanh(score / softcap)
    diag           per batch: row i's diagonal key is i + diag[b] (None: 0)
    alibi, sinks   per head: ALiBi slope, attention-sink logit (None: none)
    q_lengths, kv_lengths  per batch: valid query rows and keys (None: all);
                   rows past q_lengths[b] are zeros (logsumexp -inf)
    out_real       out holds the compute dtype rather than `dtype` (split-KV
                   partials of the half types)

    Returns the number of threads in the OpenMP team that ran the work.
    """
    if key_chunk % PYATTN_KEY_CHUNK:  # key tiles start on multiples of every BLOCK_N
        raise ValueError(f"key_chunk must be a multiple of {PYATTN_KEY_CHUNK}, got {key_chunk}")
    cdef const pyattn_dtype_kernel *dk = _dtype_kernel(kernel, dtype)
    cdef int real_size = COMPUTE_ITEMSIZE[dtype]  # of the logsumexp and the weights
    cdef int itemsize = real_size if out_real or dtype not in ("float16", "bfloat16") else 2
    cdef pyattn_problem prob
    memset(&prob, 0, sizeof(prob))
    prob.L, prob.S, prob.E, prob.Ev = sizes
    (prob.q_row, prob.q_col, prob.k_row, prob.k_col, prob.v_row, prob.v_col,
     prob.o_row, prob.o_col, prob.mask_row, prob.mask_col) = inner_strides
    prob.mask_kind = mask_kind
    prob.window_left, prob.window_right = window
    prob.scale = scale
    prob.softcap = softcap
    prob.out_real = out_real
    prob.w_row = prob.S
    prob.w_factor = 1.0 / num_heads if average_heads else 1.0

    cdef char *q = <char *><uintptr_t>pointers[0]
    cdef char *k = <char *><uintptr_t>pointers[1]
    cdef char *v = <char *><uintptr_t>pointers[2]
    cdef char *m = <char *><uintptr_t>pointers[3]
    cdef char *o = <char *><uintptr_t>pointers[4]
    cdef int64_t q_hs = head_strides[0], k_hs = head_strides[1]
    cdef int64_t v_hs = head_strides[2], m_hs = head_strides[3]
    cdef int64_t o_hs = head_strides[4]

    cdef char *weights = <char *>weights_address
    cdef const int64_t *diag_p = &diag[0] if diag is not None else NULL
    cdef const double *alibi_p = &alibi[0] if alibi is not None else NULL
    cdef const double *sinks_p = &sinks[0] if sinks is not None else NULL
    cdef const int64_t *q_len_p = &q_lengths[0] if q_lengths is not None else NULL
    cdef const int64_t *kv_len_p = &kv_lengths[0] if kv_lengths is not None else NULL
    cdef int64_t valid_rows
    cdef char *o_item
    cdef char *lse_item
    # The mean over heads is summed by one thread, in head order: an item then
    # covers every head of its query block.
    cdef int64_t heads_per_item = num_heads if average_heads else 1
    cdef int64_t head_items = num_heads // heads_per_item
    cdef int64_t weights_head_stride = 0 if average_heads else prob.L * prob.S * real_size

    cdef int64_t block = dk.block_rows
    cdef int64_t n_qblocks = (prob.L + block - 1) // block
    cdef int64_t per_batch = head_items * n_qblocks
    cdef int64_t n_chunks = 1 if key_chunk == 0 else (prob.S + key_chunk - 1) // key_chunk
    cdef int64_t n_batch = batch_offsets.shape[1]
    cdef int64_t n_items = n_batch * per_batch * n_chunks
    cdef char *lse = <char *>lse_address
    if n_items == 0:
        return 0

    # Per-thread scratch, allocated once here and indexed by thread id.  Each
    # starts with a zeroed header: the kernel's cache of packed K/V is empty.
    # Checked sizes: claimed shapes (zero-stride views) may be absurd.
    cdef size_t scratch_bytes = pyattn_size_add(dk.scratch_bytes(&prob), 63) // 64 * 64
    cdef size_t scratch_total = pyattn_size_mul(scratch_bytes, num_threads)
    if scratch_bytes >= SIZE_MAX - 63 or scratch_total > pyattn_physical_memory():
        raise ValueError(
            f"query/key width E = {prob.E} and value width Ev = {prob.Ev} need a per-thread "
            f"workspace larger than this machine's memory "
            f"({'beyond 2**64' if scratch_bytes >= SIZE_MAX - 63 else scratch_total} bytes "
            f"for {num_threads} threads)")
    cdef char *scratch = <char *>pyattn_aligned_alloc(scratch_total)
    cdef int *team = <int *>malloc(sizeof(int) * num_threads)
    if scratch == NULL or team == NULL:
        pyattn_aligned_free(scratch)
        free(team)
        raise MemoryError(f"cannot allocate {scratch_total} bytes of scratch")
    cdef int64_t item, b, h, hi, qb, chunk
    cdef pyattn_block blk
    cdef int tid
    memset(team, 0, sizeof(int) * num_threads)
    for tid in range(num_threads):
        memset(scratch + tid * scratch_bytes, 0, PYATTN_SCRATCH_HEADER)
    with nogil, parallel(num_threads=num_threads):
        tid = threadid()
        team[tid] = pyattn_team_size()
        # Dynamic schedule: causal blocks differ in cost, and every item is
        # computed the same way whichever thread takes it (thread-invariant).
        for item in prange(n_items, schedule="dynamic"):
            chunk = item % n_chunks
            qb = (item // n_chunks) % n_qblocks
            hi = (item // (n_chunks * n_qblocks)) % head_items
            b = item // (n_chunks * per_batch)
            for h in range(hi * heads_per_item, (hi + 1) * heads_per_item):
                # Assigned whole, so that Cython makes it thread-private.
                blk = _block(qb * block, block, prob.L, chunk, key_chunk, prob.S)
                o_item = o + chunk * out_split_stride + batch_offsets[4, b] + h * o_hs
                lse_item = NULL
                if lse != NULL:
                    lse_item = lse + ((chunk * n_batch + b) * num_heads + h) * prob.L * real_size
                    blk.lse = lse_item + blk.row0 * real_size
                if weights != NULL:
                    blk.weights = weights + b * weights_batch_stride + h * weights_head_stride
                if diag_p != NULL:
                    blk.diag = diag_p[b]
                if alibi_p != NULL:
                    blk.alibi_slope = alibi_p[h]
                if sinks_p != NULL:
                    blk.sink = sinks_p[h]
                if kv_len_p != NULL:
                    blk.key1 = min(blk.key1, kv_len_p[b])
                valid_rows = blk.nrows
                if q_len_p != NULL:
                    valid_rows = max(0, min(blk.nrows, q_len_p[b] - blk.row0))
                    _padding_rows(o_item, lse_item, blk.row0 + valid_rows,
                                  blk.row0 + blk.nrows, &prob, itemsize, real_size)
                    blk.nrows = valid_rows
                if valid_rows == 0:
                    continue
                dk.attend(
                    &prob,
                    q + batch_offsets[0, b] + h * q_hs,
                    k + batch_offsets[1, b] + (h // kv_group) * k_hs,
                    v + batch_offsets[2, b] + (h // kv_group) * v_hs,
                    (m + batch_offsets[3, b] + h * m_hs) if m != NULL else NULL,
                    o_item, &blk, scratch + tid * scratch_bytes)
    cdef int used = 0
    for tid in range(num_threads):
        used = max(used, team[tid])
    pyattn_aligned_free(scratch)
    free(team)
    return used
