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
from libc.string cimport memset

import os

from ._kernels cimport *  # the C boundary, declared once in _kernels.pxd

MASK_NONE, MASK_BOOL, MASK_ADDITIVE = PYATTN_MASK_NONE, PYATTN_MASK_BOOL, PYATTN_MASK_ADDITIVE
KEY_CHUNK = PYATTN_KEY_CHUNK  # split-KV chunks are multiples of this many keys
MAX_POSITIONS = 2**31 - 1  # queries or keys per sequence; claimed sizes beyond are refused
cdef enum:
    MAX_TEAM = 1024  # threads at most: the per-thread tables' size
MAX_THREADS = MAX_TEAM  # beyond this, thread creation fails rather than helps
_cpu_count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
    os.cpu_count() or 1)


# Storage dtypes of q, k, v and out, in the C registry's order; the half
# types compute in float32, which is then the dtype of the mask, the
# logsumexp and the weights.  The kv_only ones (int8, float8_e4m3fn) store K and V only,
# quantized, with q and out in their compute dtype.
DTYPES = tuple(pyattn_dtypes[i].name.decode() for i in range(PYATTN_NUM_DTYPES))
KV_ONLY_DTYPES = tuple(pyattn_dtypes[i].name.decode() for i in range(PYATTN_NUM_DTYPES)
                       if pyattn_dtypes[i].kv_only)
ITEMSIZE = {pyattn_dtypes[i].name.decode(): pyattn_dtypes[i].itemsize
            for i in range(PYATTN_NUM_DTYPES)}
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


cdef const pyattn_kernels *_set_for_dtype(str name, str dtype) except NULL:
    """The kernel set that runs `dtype` when set `name` is chosen: `name`
    itself, or the best usable set below it that has the dtype (the
    registry's rule, pyattn_kernels_for_dtype)."""
    cdef const pyattn_kernels *table = pyattn_kernels_by_name(name.encode())
    if table == NULL:
        raise ValueError(f"no kernels called {name!r} in this build")
    if dtype not in DTYPES:
        raise TypeError(f"no kernels for dtype {dtype}; they exist for {', '.join(DTYPES)}")
    table = pyattn_kernels_for_dtype(table, DTYPES.index(dtype))
    if table == NULL:
        raise TypeError(f"this build has no {dtype} kernels (its compiler lacks _Float16)")
    return table


cdef const pyattn_dtype_kernel *_dtype_kernel(str name, str dtype,
                                              bint bf16_products=False) except NULL:
    """The kernel for `dtype` when set `name` is chosen (see _set_for_dtype);
    with bf16_products, the one whose products run in bfloat16 when the set
    has it (else the exact one: bfloat16 products are a permission, not a
    demand)."""
    cdef const pyattn_kernels *table = _set_for_dtype(name, dtype)
    cdef const pyattn_dtype_kernel *dk = &table.bf16_products[DTYPES.index(dtype)]
    if not bf16_products or dk.attend == NULL:
        dk = &table.by_dtype[DTYPES.index(dtype)]
    return dk


def kernel_for_dtype(str kernel, str dtype):
    """The name of the set that runs `dtype` when `kernel` is chosen, or None
    when no set of this build has it."""
    try:
        return _set_for_dtype(kernel, dtype).name.decode()
    except TypeError:
        return None


def has_dtype(str kernel, str dtype):
    """Whether the set called `kernel` itself has a kernel for `dtype` in this
    build (without falling back to another set)."""
    return kernel_for_dtype(kernel, dtype) == kernel


def has_bf16_products(str kernel, str dtype):
    """Whether set `kernel` has a kernel for `dtype` with bfloat16 products."""
    cdef const pyattn_kernels *table = pyattn_kernels_by_name(kernel.encode())
    return (table != NULL and dtype in DTYPES
            and table.bf16_products[DTYPES.index(dtype)].attend != NULL)


# precision=: None (bfloat16 inputs take bfloat16 products, the others are
# exact), "exact" (every product in the compute type), "bf16" (float32 and
# float16 inputs too); float64 is always exact.
PRECISIONS = (None, "exact", "bf16")


cpdef bint wants_bf16_products(precision, str dtype):
    """Whether `precision` asks for bfloat16 products for `dtype` inputs."""
    return precision == "bf16" or (precision is None and dtype == "bfloat16")


def block_rows(str kernel, str dtype, bint bf16_products=False):
    """Query rows per work item for that kernel and dtype."""
    return _dtype_kernel(kernel, dtype, bf16_products).block_rows


def scratch_bytes(str kernel, str dtype, int64_t L, int64_t S, int64_t E, int64_t Ev,
                  bint bf16_products=False):
    """Bytes of one thread's workspace for an L x S problem of widths E, Ev
    (2**64 - 1 when not representable).  For testing its sizing."""
    cdef pyattn_problem prob
    memset(&prob, 0, sizeof(prob))
    prob.L, prob.S, prob.E, prob.Ev = L, S, E, Ev
    return _dtype_kernel(kernel, dtype, bf16_products).scratch_bytes(&prob)


def kernel_exp2(str kernel, x, y):
    """y[:] = 2**x[:] with that kernel's vectorised exp; x, y contiguous 1-D
    arrays of one float dtype.  For testing the exp's accuracy."""
    cdef const unsigned char[::1] xb = x.view("u1")
    cdef unsigned char[::1] yb = y.view("u1")
    if x.shape != y.shape or x.dtype != y.dtype or x.ndim != 1 or x.size == 0:
        raise ValueError("x and y must be non-empty 1-D arrays of one shape and dtype")
    _dtype_kernel(kernel, x.dtype.name).exp2(&xb[0], &yb[0], x.size)


# --------------------------------------------------------------------------
# One launch: a problem, where its operands lie, and its score modifiers
# --------------------------------------------------------------------------

cdef enum:
    N_OPERANDS = 7  # q, k, v, mask, out, k_scales, v_scales


cdef struct launch:
    const pyattn_dtype_kernel *dk
    pyattn_problem prob
    # q, k, v, mask, out, k_scales, v_scales (mask and the scales may be NULL)
    char *base[N_OPERANDS]
    # (N_OPERANDS, n_batch) byte offsets, or NULL: b * batch_stride
    const int64_t *batch_offsets
    int64_t batch_stride[N_OPERANDS]
    int64_t head_stride[N_OPERANDS]  # bytes; 0 = broadcast
    int64_t n_batch, num_heads, kv_group
    int64_t key_chunk, out_split_stride
    char *lse
    char *row_sum                  # with lse: the split-KV state (max, sum), not lse
    char *weights
    int64_t weights_batch_stride
    bint average_heads
    const int64_t *diag            # per batch, or NULL: diag_all for every batch
    int64_t diag_all
    const double *alibi
    const double *sinks
    const int64_t *q_len
    const int64_t *kv_len
    int itemsize, real_size        # of out, and of the compute type (lse, weights)


cdef inline int64_t _batch_offset(const launch *run, int which, int64_t b) noexcept nogil:
    if run.batch_offsets != NULL:
        return run.batch_offsets[which * run.n_batch + b]
    return b * run.batch_stride[which]


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


cdef void _padding_rows(char *out, char *lse, char *row_sum, int64_t r0, int64_t r1,
                        const pyattn_problem *p, int itemsize, int lse_itemsize) noexcept nogil:
    """Rows [r0, r1) past a sequence's length: zeros, logsumexp -inf (max
    -inf and sum 0 for split-KV partials)."""
    cdef int64_t r, x
    for r in range(r0, r1):
        for x in range(p.Ev):
            memset(out + (r * p.o_row + x * p.o_col) * itemsize, 0, itemsize)
        if lse != NULL:
            if lse_itemsize == 4:
                (<float *>lse)[r] = -INFINITY
            else:
                (<double *>lse)[r] = -INFINITY
        if row_sum != NULL:
            memset(row_sum + r * lse_itemsize, 0, lse_itemsize)


cdef inline int64_t _heads_per_item(const launch *run) noexcept nogil:
    # The mean over heads is summed by one thread, in head order: an item then
    # covers every head of its query block.
    return run.num_heads if run.average_heads else 1


cdef inline int64_t _n_chunks(const launch *run) noexcept nogil:
    return 1 if run.key_chunk == 0 else (run.prob.S + run.key_chunk - 1) // run.key_chunk


cdef inline int64_t _n_qblocks(const launch *run) noexcept nogil:
    return (run.prob.L + run.dk.block_rows - 1) // run.dk.block_rows


cdef int64_t _n_items(const launch *run) noexcept nogil:
    return (run.n_batch * (run.num_heads // _heads_per_item(run)) * _n_qblocks(run)
            * _n_chunks(run))


cdef void _run_item(const launch *run, int64_t item, char *scratch) noexcept nogil:
    """Work item `item`: one query block of one (batch, head or all heads),
    against one key chunk."""
    cdef const pyattn_problem *p = &run.prob
    cdef int64_t n_chunks = _n_chunks(run), n_qblocks = _n_qblocks(run)
    cdef int64_t heads_per_item = _heads_per_item(run)
    cdef int64_t head_items = run.num_heads // heads_per_item
    cdef int64_t chunk = item % n_chunks
    cdef int64_t qb = (item // n_chunks) % n_qblocks
    cdef int64_t hi = (item // (n_chunks * n_qblocks)) % head_items
    cdef int64_t b = item // (n_chunks * n_qblocks * head_items)
    cdef int64_t weights_head_stride = 0 if run.average_heads else p.L * p.S * run.real_size
    cdef int64_t h, kvh, valid_rows
    cdef char *o_item
    cdef char *lse_item
    cdef char *sum_item
    cdef pyattn_block blk
    for h in range(hi * heads_per_item, (hi + 1) * heads_per_item):
        blk = _block(qb * run.dk.block_rows, run.dk.block_rows, p.L, chunk, run.key_chunk, p.S)
        o_item = (run.base[4] + chunk * run.out_split_stride + _batch_offset(run, 4, b)
                  + h * run.head_stride[4])
        lse_item = sum_item = NULL
        if run.lse != NULL:
            lse_item = (run.lse + ((chunk * run.n_batch + b) * run.num_heads + h)
                        * p.L * run.real_size)
            blk.lse = lse_item + blk.row0 * run.real_size
            if run.row_sum != NULL:
                sum_item = run.row_sum + (lse_item - run.lse)
                blk.row_sum = sum_item + blk.row0 * run.real_size
        if run.weights != NULL:
            blk.weights = run.weights + b * run.weights_batch_stride + h * weights_head_stride
        blk.diag = run.diag[b] if run.diag != NULL else run.diag_all
        if run.alibi != NULL:
            blk.alibi_slope = run.alibi[h]
        if run.sinks != NULL:
            blk.sink = run.sinks[h]
        if run.kv_len != NULL:
            blk.key1 = min(blk.key1, run.kv_len[b])
        valid_rows = blk.nrows
        if run.q_len != NULL:
            valid_rows = max(0, min(blk.nrows, run.q_len[b] - blk.row0))
            _padding_rows(o_item, lse_item, sum_item, blk.row0 + valid_rows,
                          blk.row0 + blk.nrows, p, run.itemsize, run.real_size)
            blk.nrows = valid_rows
        if valid_rows == 0:
            continue
        kvh = h // run.kv_group
        if run.base[5] != NULL:  # quantized K/V: their scales
            blk.k_scales = run.base[5] + _batch_offset(run, 5, b) + kvh * run.head_stride[5]
            blk.v_scales = run.base[6] + _batch_offset(run, 6, b) + kvh * run.head_stride[6]
        run.dk.attend(
            p,
            run.base[0] + _batch_offset(run, 0, b) + h * run.head_stride[0],
            run.base[1] + _batch_offset(run, 1, b) + kvh * run.head_stride[1],
            run.base[2] + _batch_offset(run, 2, b) + kvh * run.head_stride[2],
            (run.base[3] + _batch_offset(run, 3, b) + h * run.head_stride[3])
            if run.base[3] != NULL else NULL,
            o_item, &blk, scratch)


include "_team.pxi"  # the thread cost model, fork safety, the scratch kept between calls


# Tests observe every launch, whichever entry made it: its team size, and
# the problem it ran, (batch items, heads, query rows, width E).
cdef object _launch_log = None
cdef object _problem_log = None


def record_launches(log):
    """Append the team size of every launch to the list `log` (None: stop)."""
    global _launch_log
    _launch_log = log


def record_problems(log):
    """Append (batch items, heads, rows, E) of every launch to `log` (None: stop)."""
    global _problem_log
    _problem_log = log


cdef int _run(launch *run, int num_threads) except -1:
    """Run every work item of `run` on at most `num_threads` threads; returns
    the number of threads that ran them (0 when there is nothing to do)."""
    global _parallel_started
    cdef int64_t n_items = _n_items(run)
    if n_items == 0:
        return 0
    cdef int threads = _team_size(run, num_threads, n_items)
    if threads > 1:
        if _forked_after_parallel:
            threads = 1
        else:
            _parallel_started = True  # before the region: another thread may fork

    # Per-thread scratch, indexed by thread id; each starts with a zeroed
    # header: the kernel's cache of packed K/V is empty.  Checked sizes:
    # claimed shapes (zero-stride views) may be absurd.
    cdef size_t one = pyattn_size_add(run.dk.scratch_bytes(&run.prob), 63) // 64 * 64
    if one < SIZE_MAX - 63 and threads > 1:  # num_threads is a maximum: fewer that fit
        threads = <int>max(1, min(<size_t>threads, pyattn_physical_memory() // 2 // one))
    cdef size_t total = pyattn_size_mul(one, threads)
    if one >= SIZE_MAX - 63 or total > pyattn_physical_memory():
        raise ValueError(
            f"query/key width E = {run.prob.E} and value width Ev = {run.prob.Ev} need a "
            f"per-thread workspace larger than this machine's memory "
            f"({'beyond 2**64' if one >= SIZE_MAX - 63 else total} bytes for {threads} threads)")
    cdef char *scratch = _take_scratch(total)
    if scratch == NULL:
        raise MemoryError(f"cannot allocate {total} bytes of scratch")
    global _last_region_end
    cdef int tid, used = 1
    cdef int64_t item
    cdef int team[MAX_TEAM]  # num_threads is at most MAX_THREADS (validated)
    cdef double started[MAX_TEAM]  # when each thread began, for the start-up cost
    cdef double t0, latest
    cdef bint warm
    for tid in range(threads):
        memset(scratch + tid * one, 0, PYATTN_SCRATCH_HEADER)
    if threads == 1:  # tiny calls: no parallel region, no team to wake
        with nogil:
            for item in range(n_items):
                _run_item(run, item, scratch)
    else:
        memset(team, 0, sizeof(int) * threads)
        t0 = _now_ns()
        warm = t0 - _last_region_end < WARM_WINDOW_NS
        with nogil, parallel(num_threads=threads):
            tid = threadid()
            started[tid] = _now_ns()
            team[tid] = pyattn_team_size()
            # Dynamic schedule: causal blocks differ in cost, and every item
            # is computed the same way whichever thread takes it.
            for item in prange(n_items, schedule="dynamic"):
                _run_item(run, item, scratch + tid * one)
        used, latest = 0, t0
        for tid in range(threads):
            used = max(used, team[tid])
            if team[tid]:
                latest = max(latest, started[tid])
        # a sample at most 4x the average: one preempted start must not
        # keep every later launch on one thread
        _start_ns[warm == 0] = (0.75 * _start_ns[warm == 0]
                                + 0.25 * min(latest - t0, 4 * _start_ns[warm == 0]))
        _last_region_end = _now_ns()
    _give_back_scratch(scratch, total)
    if _launch_log is not None:
        _launch_log.append(used)
    if _problem_log is not None:
        _problem_log.append((run.n_batch, run.num_heads, run.prob.L, run.prob.E))
    return used


# --------------------------------------------------------------------------
# The general entry: a launch described by the validated Python layer
# --------------------------------------------------------------------------

def attend(str kernel, str dtype, *, tuple pointers,
           const int64_t[:, ::1] batch_offsets, tuple head_strides,
           int64_t num_heads, int64_t kv_group, tuple sizes,
           tuple inner_strides, int mask_kind, tuple window, double scale,
           int num_threads, int64_t key_chunk=0, int64_t out_split_stride=0,
           uintptr_t lse_address=0, uintptr_t row_sum_address=0, uintptr_t weights_address=0,
           int64_t weights_batch_stride=0, bint average_heads=False,
           double softcap=0, const int64_t[::1] diag=None, const double[::1] alibi=None,
           const double[::1] sinks=None, const int64_t[::1] q_lengths=None,
           const int64_t[::1] kv_lengths=None, bint out_real=False,
           bint bf16_products=False, tuple quant_groups=(0, 0), tuple scale_rows=(0, 0)):
    """Run the kernel on every (batch, head, query block, key chunk); every
    argument after the dtype is passed by keyword.

    pointers       data addresses of (q, k, v, mask, out, k_scales, v_scales);
                   mask may be 0, the scales are 0 unless `dtype` is kv_only
    batch_offsets  (7, B) byte offsets of each flat batch index, same order
    head_strides   byte strides of the head axis, same order (0 = broadcast)
    kv_group       query heads per key/value head (GQA); kv head = h // kv_group
    sizes          (L, S, E, Ev)
    inner_strides  element strides (q_row, q_col, k_row, k_col, v_row, v_col,
                   o_row, o_col, mask_row, mask_col)
    window         (left, right): row i sees keys i + diag - left .. i + diag + right;
                   -1 leaves a side open; causal is (-1, 0)
    num_threads    at most this many threads (see _team_size)
    key_chunk      0: every item reads all S keys.  Otherwise keys are split
                   into chunks of this many (a multiple of KEY_CHUNK); chunk c
                   writes its partial output at out + c * out_split_stride
                   bytes and, at lse_address, the rows' logsumexp as a
                   contiguous (chunks, B, H, L) array of the compute dtype.
    row_sum_address  0, or an array like the logsumexp's: then lse_address
                   receives the rows' max score and this their sum of
                   exp(score - max) (the split-KV state that merges exactly).
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
    bf16_products  Q K^T and P V in bfloat16 where the set can (see _dtype_kernel)
    quant_groups, scale_rows  kv_only dtypes: (K, V) channels per scale, and
                   the element row strides of their scales

    Returns the number of threads that ran the work.
    """
    if key_chunk % PYATTN_KEY_CHUNK:  # key tiles start on multiples of every BLOCK_N
        raise ValueError(f"key_chunk must be a multiple of {PYATTN_KEY_CHUNK}, got {key_chunk}")
    cdef launch run
    memset(&run, 0, sizeof(run))
    run.dk = _dtype_kernel(kernel, dtype, bf16_products)
    run.real_size = COMPUTE_ITEMSIZE[dtype]
    # out holds the compute dtype for partials, and for kv_only K/V always
    run.itemsize = run.real_size if out_real or dtype in KV_ONLY_DTYPES else ITEMSIZE[dtype]
    cdef pyattn_problem *prob = &run.prob
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
    prob.k_group, prob.v_group = quant_groups
    prob.ks_row, prob.vs_row = scale_rows
    cdef int i
    for i in range(N_OPERANDS):
        run.base[i] = <char *><uintptr_t>pointers[i]
        run.head_stride[i] = head_strides[i]
    run.n_batch = batch_offsets.shape[1]
    run.batch_offsets = &batch_offsets[0, 0] if run.n_batch > 0 else NULL
    run.num_heads, run.kv_group = num_heads, kv_group
    run.key_chunk, run.out_split_stride = key_chunk, out_split_stride
    run.lse = <char *>lse_address
    run.row_sum = <char *>row_sum_address if lse_address else NULL
    run.weights = <char *>weights_address
    run.weights_batch_stride = weights_batch_stride
    run.average_heads = average_heads
    run.diag = &diag[0] if diag is not None else NULL
    run.alibi = &alibi[0] if alibi is not None else NULL
    run.sinks = &sinks[0] if sinks is not None else NULL
    run.q_len = &q_lengths[0] if q_lengths is not None else NULL
    run.kv_len = &kv_lengths[0] if kv_lengths is not None else NULL
    return _run(&run, num_threads)


include "_quantize.pxi"  # the quantizer's launch: over (batch, head) rows, nogil
include "_fast_path.pxi"  # the common call, checked and launched without Python array work
