# Included by _attention.pyx: the fast entry for the common call.

from libc.float cimport FLT_MAX
from libc.math cimport fabs, isfinite, sqrt

import numpy as np

cimport numpy as cnp

cnp.import_array()

# --------------------------------------------------------------------------
# The fast entry: the common call, checked and launched without Python-level
# array work (inference calls it once per layer and token)
# --------------------------------------------------------------------------

cdef object _plan_module = None  # pyattn._plan, imported on first use (it imports this)
cdef dict _dtype_names = {}  # dtype -> name (NumPy computes dtype.name in Python: slow)


cdef str _kernel_dtype_name(dtype):
    """The name of a native dtype the kernels store as q, k and v, or None."""
    name = _dtype_names.get(dtype)
    if (name is None and dtype.isnative and dtype.name in COMPUTE_ITEMSIZE
            and dtype.name not in KV_ONLY_DTYPES):
        name = _dtype_names[dtype] = dtype.name
    return name


cdef inline bint _typed(cnp.ndarray a, int64_t itemsize):
    """Aligned data and strides in whole elements (C indexes typed pointers)."""
    cdef int i
    if not cnp.PyArray_ISALIGNED(a):
        return False
    for i in range(cnp.PyArray_NDIM(a)):
        if cnp.PyArray_STRIDES(a)[i] % itemsize:
            return False
    return True


def simple_attention(query, key, value, is_causal, scale, enable_gqa, num_threads,
                     str kernel, bint lower_right, precision=None):
    """scaled_dot_product_attention for the common call, or None when the call
    is not one: then the general path (functional.py) validates it, and
    raises whatever error it deserves.  Common means NumPy arrays of one
    supported native dtype, aligned, of equal rank 3 or 4 with equal batch
    sizes, nothing empty, no mask, no options beyond is_causal and the
    alignment, scale a float the compute dtype holds, and no split-KV plan.
    Both paths describe the same launch, so their results are bitwise equal.
    """
    global _plan_module
    if not (cnp.PyArray_CheckExact(query) and cnp.PyArray_CheckExact(key)
            and cnp.PyArray_CheckExact(value)):
        return None
    if not ((is_causal is True or is_causal is False)
            and (enable_gqa is True or enable_gqa is False)):
        return None
    cdef cnp.ndarray q = query, k = key, v = value
    cdef int nd = cnp.PyArray_NDIM(q)
    if nd < 3 or nd > 4 or cnp.PyArray_NDIM(k) != nd or cnp.PyArray_NDIM(v) != nd:
        return None
    dtype = <object>cnp.PyArray_DESCR(q)
    if <object>cnp.PyArray_DESCR(k) is not dtype or <object>cnp.PyArray_DESCR(v) is not dtype:
        return None
    cdef str dtype_name = _kernel_dtype_name(dtype)
    if dtype_name is None:
        return None
    cdef int64_t itemsize = dtype.itemsize
    cdef cnp.npy_intp *qd = cnp.PyArray_DIMS(q)
    cdef cnp.npy_intp *kd = cnp.PyArray_DIMS(k)
    cdef cnp.npy_intp *vd = cnp.PyArray_DIMS(v)
    cdef int h = nd - 3  # the head axis
    cdef int64_t B = qd[0] if nd == 4 else 1
    if nd == 4 and (kd[0] != B or vd[0] != B):
        return None
    cdef int64_t hq = qd[h], hk = kd[h], L = qd[h + 1], E = qd[h + 2]
    cdef int64_t S = kd[h + 1], Ev = vd[h + 2]
    if (B < 1 or hq < 1 or hk < 1 or vd[h] != hk or L < 1 or S < 1 or E < 1 or Ev < 1
            or kd[h + 2] != E or vd[h + 1] != S or L > MAX_POSITIONS or S > MAX_POSITIONS):
        return None
    if hq % hk or (hk not in (1, hq) and not enable_gqa):
        return None
    # near or beyond _validation.MAX_WORK (2**60 multiply-adds): the general
    # path counts exactly and refuses
    if <double>B * hq * L * S * (E + Ev) > <double>(<int64_t>1 << 59):
        return None
    if not (_typed(q, itemsize) and _typed(k, itemsize) and _typed(v, itemsize)):
        return None
    cdef double scale_value
    if scale is None:
        scale_value = 1.0 / sqrt(<double>E)
    elif type(scale) is float and isfinite(<double>scale):
        scale_value = scale
        if COMPUTE_ITEMSIZE[dtype_name] == 4 and fabs(scale_value) > FLT_MAX:
            return None
    else:
        return None
    cdef int threads
    if num_threads is None:
        threads = pyattn_max_threads()
    elif type(num_threads) is int and 1 <= num_threads <= MAX_THREADS:
        threads = num_threads
    else:
        return None
    cdef size_t out_bytes = pyattn_size_mul(pyattn_size_mul(pyattn_size_mul(
        pyattn_size_mul(<size_t>B, <size_t>hq), <size_t>L), <size_t>Ev), <size_t>itemsize)
    if out_bytes > pyattn_physical_memory():  # checked: Ev may claim anything
        return None

    cdef launch run
    memset(&run, 0, sizeof(run))
    run.dk = _dtype_kernel(kernel, dtype_name, wants_bf16_products(precision, dtype_name))
    run.real_size = COMPUTE_ITEMSIZE[dtype_name]
    run.itemsize = itemsize
    cdef int64_t g = hq // hk  # query heads per key/value head
    # Heads as rows (see _plan.heads_as_rows): one query row per head, heads
    # grouped on a key/value head, every key visible: the g heads of a group
    # run as the g rows of one problem, so each key/value head is read once.
    cdef bint as_rows = L == 1 and g > 1 and (not is_causal or lower_right or S == 1)
    if _plan_module is None:
        from . import _plan
        _plan_module = _plan
    cdef int64_t rows = g if as_rows else L
    cdef int64_t n_qblocks = (rows + run.dk.block_rows - 1) // run.dk.block_rows
    if _plan_module.split_keys(B * (hk if as_rows else hq) * n_qblocks, S):
        return None  # split-KV partials and their merge: the general path

    if nd == 4:
        out = np.empty((B, hq, L, Ev), dtype)
    else:
        out = np.empty((hq, L, Ev), dtype)
    cdef cnp.ndarray o = out
    cdef pyattn_problem *p = &run.prob
    cdef cnp.npy_intp *qs = cnp.PyArray_STRIDES(q)
    cdef cnp.npy_intp *ks = cnp.PyArray_STRIDES(k)
    cdef cnp.npy_intp *vs = cnp.PyArray_STRIDES(v)
    cdef cnp.npy_intp *os = cnp.PyArray_STRIDES(o)
    p.L, p.S, p.E, p.Ev = rows, S, E, Ev
    p.k_row, p.k_col = ks[h + 1] // itemsize, ks[h + 2] // itemsize
    p.v_row, p.v_col = vs[h + 1] // itemsize, vs[h + 2] // itemsize
    p.q_col, p.o_col = qs[h + 2] // itemsize, os[h + 2] // itemsize
    p.mask_kind = PYATTN_MASK_NONE
    p.scale = scale_value
    p.window_left, p.window_right = -1, -1
    p.w_factor = 1
    run.base[0] = <char *>cnp.PyArray_DATA(q)
    run.base[1] = <char *>cnp.PyArray_DATA(k)
    run.base[2] = <char *>cnp.PyArray_DATA(v)
    run.base[4] = <char *>cnp.PyArray_DATA(o)
    if nd == 4:
        run.batch_stride[0], run.batch_stride[1] = qs[0], ks[0]
        run.batch_stride[2], run.batch_stride[4] = vs[0], os[0]
    run.n_batch = B
    run.head_stride[1] = ks[h] if hk > 1 else 0
    run.head_stride[2] = vs[h] if hk > 1 else 0
    if as_rows:  # (..., Hkv * g, 1, E) read as (..., Hkv, g, E)
        p.q_row, p.o_row = qs[h] // itemsize, os[h] // itemsize
        run.head_stride[0], run.head_stride[4] = qs[h] * g, os[h] * g
        run.num_heads, run.kv_group = hk, 1
    else:
        p.q_row, p.o_row = qs[h + 1] // itemsize, os[h + 1] // itemsize
        run.head_stride[0], run.head_stride[4] = qs[h], os[h]
        run.num_heads, run.kv_group = hq, g
        if is_causal:
            p.window_right = 0
            run.diag_all = S - L if lower_right else 0
    _run(&run, threads)
    return out
