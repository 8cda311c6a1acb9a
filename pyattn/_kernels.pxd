# The C boundary, declared once: csrc/pyattn_kernels.h as Cython sees it.
# _attention.pyx cimports it; the header's comments say what each field means.
from libc.stdint cimport int8_t, int64_t, uint16_t

cdef extern from "pyattn_kernels.h" nogil:
    enum:  # of enum pyattn_dtype, whose values index pyattn_dtypes and by_dtype
        PYATTN_NUM_DTYPES
    ctypedef struct pyattn_dtype_info:
        const char *name
        int itemsize
        int compute_itemsize
        int kv_only
    const pyattn_dtype_info pyattn_dtypes[]

    enum:
        PYATTN_KEY_CHUNK
        PYATTN_SCRATCH_HEADER
    enum pyattn_mask_kind:
        PYATTN_MASK_NONE
        PYATTN_MASK_BOOL
        PYATTN_MASK_ADDITIVE

    ctypedef struct pyattn_problem:
        int64_t L, S, E, Ev
        int64_t q_row, q_col, k_row, k_col, v_row, v_col
        int64_t o_row, o_col, mask_row, mask_col
        int mask_kind
        int64_t window_left, window_right
        double scale
        double softcap
        int out_real
        int64_t w_row
        double w_factor
        int64_t k_group, v_group, ks_row, vs_row
    ctypedef struct pyattn_block:
        int64_t row0, nrows, key0, key1
        void *lse
        void *row_sum
        void *weights
        int64_t diag
        double alibi_slope
        double sink
        const void *k_scales
        const void *v_scales

    ctypedef void (*pyattn_attend_fn)(
        const pyattn_problem *p, const void *q, const void *k, const void *v,
        const void *mask, void *out, const pyattn_block *blk,
        void *scratch) noexcept nogil
    ctypedef size_t (*pyattn_scratch_fn)(const pyattn_problem *p) noexcept nogil
    ctypedef void (*pyattn_exp2_fn)(const void *x, void *y, int64_t n) noexcept nogil
    ctypedef struct pyattn_dtype_kernel:
        pyattn_attend_fn attend
        pyattn_scratch_fn scratch_bytes
        pyattn_exp2_fn exp2
        int64_t block_rows
    ctypedef struct pyattn_kernels:
        const char *name
        int (*cpu_supports)() noexcept nogil
        pyattn_dtype_kernel by_dtype[]
        pyattn_dtype_kernel bf16_products[]

    int pyattn_num_kernel_sets()
    const pyattn_kernels *pyattn_kernel_set(int index)
    const pyattn_kernels *pyattn_kernels_by_name(const char *name)
    const pyattn_kernels *pyattn_kernels_for_dtype(const pyattn_kernels *set, int dtype)
    int pyattn_quantize(int format, const float *x, int64_t n, int64_t D, int64_t group,
                        void *q, uint16_t *scales)
    size_t pyattn_physical_memory()
    size_t pyattn_size_mul(size_t a, size_t b)
    size_t pyattn_size_add(size_t a, size_t b)
    void *pyattn_aligned_alloc(size_t nbytes)
    void pyattn_aligned_free(void *p)
    int pyattn_openmp_enabled()
    int pyattn_max_threads()
    int pyattn_team_size()
