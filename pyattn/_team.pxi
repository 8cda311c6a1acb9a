# Included by _attention.pyx: how many threads a launch gets, fork safety
# of the OpenMP pool, and the scratch buffer kept between calls.

from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

# --------------------------------------------------------------------------
# Threads: a work-size cost model, and fork safety
# --------------------------------------------------------------------------

# The team for a launch comes from a cost model: the launch's work on one
# thread, estimated from its FLOPs and the K/V bytes it reads at rates one
# core sustains, against what starting the team costs.  Workers that ran a
# region in the last WARM_WINDOW_NS still spin and start at once; later they
# sleep, and waking them costs tens of microseconds on a busy machine and
# hundreds on an idle VM.  Both start-up costs are measured on every parallel
# launch (the slowest worker's delay to start) and kept as moving averages.
# A launch kept on one thread takes no sample, so an estimate inflated by a
# bad spell (the other core busy with another pool's spinning workers) would
# keep every later launch on one thread: each launch declined that the
# prior estimate would have given the team decays the estimate towards the
# prior, until a team runs again and measures.
THREAD_COST_MODEL = True  # False: num_threads is exact (tests of team sizes)
FLOPS_PER_NS = 60.0   # per thread, the tiled kernel on AVX-512 (measured: 50-100)
BYTES_PER_NS = 12.0   # per thread, K/V read once per key/value head (measured: 12-30)
WARM_WINDOW_NS = 50_000.0  # libgomp's spin at pyattn's GOMP_SPINCOUNT lasts longer
START_DECAY = 0.9  # per declined launch (above)
cdef double _start_ns[2]   # moving averages of team start-up: warm, cold
cdef double _start_prior[2]
_start_prior[0], _start_prior[1] = 5_000.0, 100_000.0
_start_ns[0], _start_ns[1] = _start_prior[0], _start_prior[1]  # until measured
cdef double _last_region_end = -1e18  # monotonic ns


cdef double _now_ns() noexcept nogil:
    cdef timespec t
    clock_gettime(CLOCK_MONOTONIC, &t)
    return t.tv_sec * 1e9 + t.tv_nsec


def thread_start_costs():
    """(warm, cold) moving averages of a team's start-up, in ns."""
    return _start_ns[0], _start_ns[1]


def set_thread_start_costs(warm_ns, cold_ns):
    """Set both estimates (tests of the cost model's recovery)."""
    _start_ns[0], _start_ns[1] = warm_ns, cold_ns


cdef int _team_size(const launch *run, int requested, int64_t n_items):
    """Threads for this launch: 1, or as many as requested and useful (at most
    one per work item), whichever the cost model says is faster.  Only the
    count changes, never the plan: results are bitwise the same either way."""
    # at most MAX_THREADS (the driver's per-thread tables), whatever OpenMP's
    # default says
    cdef int most = <int>min(<int64_t>requested, n_items, <int64_t>MAX_THREADS)
    if most <= 1:
        return 1
    if not THREAD_COST_MODEL:
        return most
    cdef const pyattn_problem *p = &run.prob
    cdef double heads = <double>run.n_batch * run.num_heads
    cdef double flops = 2.0 * heads * p.L * p.S * (p.E + p.Ev)
    cdef double kv_bytes = heads / run.kv_group * p.S * (p.E + p.Ev) * run.itemsize
    cdef double alone = max(flops / FLOPS_PER_NS, kv_bytes / BYTES_PER_NS)
    # more threads than CPUs never run faster, and thousands may not be had
    most = min(most, _cpu_count)
    cdef int kind = 0 if _now_ns() - _last_region_end < WARM_WINDOW_NS else 1  # warm, cold
    if alone / most + _start_ns[kind] < alone:
        return most
    if alone / most + _start_prior[kind] < alone:  # declined for the estimate alone
        _start_ns[kind] = max(_start_prior[kind], _start_ns[kind] * START_DECAY)
    return 1


# libgomp keeps the worker threads of a parallel region as a pool of the
# thread that started it.  A child forked after that inherits the pool's
# bookkeeping but not its threads, and its next parallel region of more than
# one thread waits for them forever.  So a process forked (at any depth) from
# one that ran a multi-threaded region computes on one thread; a single
# thread never touches the pool.  spawn and forkserver children are fresh.
cdef bint _parallel_started = False  # this process may own a libgomp pool
cdef bint _forked_after_parallel = False


def _after_fork_in_child():
    global _forked_after_parallel
    _forked_after_parallel = _forked_after_parallel or _parallel_started


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# --------------------------------------------------------------------------
# Scratch: one buffer kept between calls, so small calls do not map memory
# --------------------------------------------------------------------------

SCRATCH_CACHE_LIMIT = 8 << 20  # bytes; larger calls amortise their allocation
cdef char *_cached_scratch = NULL  # taken and given back under the GIL
cdef size_t _cached_bytes = 0


cdef char *_take_scratch(size_t nbytes):
    global _cached_scratch, _cached_bytes
    cdef char *buf
    if _cached_scratch != NULL and _cached_bytes >= nbytes:
        buf, _cached_scratch = _cached_scratch, NULL
        return buf
    return <char *>pyattn_aligned_alloc(nbytes)


cdef void _give_back_scratch(char *buf, size_t nbytes):
    global _cached_scratch, _cached_bytes
    if nbytes > SCRATCH_CACHE_LIMIT or (_cached_scratch != NULL and _cached_bytes >= nbytes):
        pyattn_aligned_free(buf)
        return
    pyattn_aligned_free(_cached_scratch)
    _cached_scratch, _cached_bytes = buf, nbytes
