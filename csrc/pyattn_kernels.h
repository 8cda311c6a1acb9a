/*
 * The one interface between the Cython driver and the attention kernels.
 *
 * A kernel computes softmax(scale * Q K^T + mask) V for a block of query rows
 * of one (batch, head) pair, over a range of keys.  It takes raw pointers
 * already positioned at that pair, sizes, and element strides; it never
 * validates and never allocates: the caller hands it per-thread scratch of
 * scratch_bytes(problem) bytes, 64-byte aligned, whose first
 * PYATTN_SCRATCH_HEADER bytes are zero before the thread's first call of a run
 * (the kernel caches packed K/V there).
 *
 * Several kernel sets (one per instruction set, each in its own
 * kernels_<isa>.c) fill the same table, indexed by storage dtype, so the
 * driver picks a table once and stays ISA-agnostic.  registry.c lists the
 * sets the build names (PYATTN_KERNEL_SETS, from setup.py), best first.
 */
#ifndef PYATTN_KERNELS_H
#define PYATTN_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* Storage dtypes of q, k, v and out: the index of a kernel set's table. */
enum pyattn_dtype {
    PYATTN_FLOAT32,
    PYATTN_FLOAT64,
    PYATTN_FLOAT16,  /* computed in float32 */
    PYATTN_BFLOAT16, /* computed in float32 */
    PYATTN_INT8,     /* K and V only, with per-group float16 scales (docs/kv-cache.md);
                      * q and out are float32 */
    PYATTN_FLOAT8_E4M3FN, /* K and V only, as int8 */
    PYATTN_NUM_DTYPES
};

/* What Python needs to know of a dtype: its NumPy name, its itemsize and
 * that of the type it is computed in (of q and out when kv_only, of the mask,
 * logsumexp and weights). */
typedef struct pyattn_dtype_info {
    const char *name;
    int itemsize;          /* of the storage type */
    int compute_itemsize;
    int kv_only;           /* 1: a quantized K/V storage, q and out in the compute type */
} pyattn_dtype_info;
extern const pyattn_dtype_info pyattn_dtypes[PYATTN_NUM_DTYPES];

/* Keys per split-KV chunk are a multiple of this, so that every chunk starts
 * on a key tile of every kernel (a multiple of each BLOCK_N). */
#define PYATTN_KEY_CHUNK 1024

enum pyattn_mask_kind {
    PYATTN_MASK_NONE = 0,
    PYATTN_MASK_BOOL = 1,     /* uint8 per score: nonzero = the key takes part */
    PYATTN_MASK_ADDITIVE = 2  /* same dtype as Q, added to the scaled scores */
};

/* Sizes and element strides of one (batch, head) attention problem. */
/* Quantized K/V groups (pyattn_problem's k_group) are multiples of this many
 * channels, or whole rows: loops over channels may fetch a scale per quantum. */
#define PYATTN_GROUP_QUANTUM 32

typedef struct pyattn_problem {
    int64_t L, S, E, Ev;             /* query rows, keys, q/k width, v width */
    int64_t q_row, q_col;            /* strides of Q (L x E) */
    int64_t k_row, k_col;            /* strides of K (S x E) */
    int64_t v_row, v_col;            /* strides of V (S x Ev) */
    int64_t o_row, o_col;            /* strides of the output (L x Ev) */
    int64_t mask_row, mask_col;      /* strides of the mask (L x S); 0 = broadcast */
    int mask_kind;                   /* enum pyattn_mask_kind */
    int64_t window_left, window_right; /* row i sees keys j with i + diag - window_left
                                        * <= j <= i + diag + window_right (-1: no
                                        * bound); causal is window_right = 0 */
    double scale;                    /* multiplies Q K^T before the mask */
    double softcap;                  /* > 0: scores become softcap * tanh(score / softcap) */
    int out_real;                    /* 1: out holds the compute type (float for the
                                      * half types), as split-KV partials do */
    int64_t w_row;                   /* row stride of blk->weights, elements */
    double w_factor;                 /* weights are added times this (1/H: mean) */
    /* Quantized K/V (kv_only dtypes): key j's channel e is k[j, e] times its
     * group's scale, blk->k_scales[j * ks_row + e / k_group] (float16, groups
     * contiguous), and the same for V; 0 for the other dtypes.  A group is
     * a multiple of PYATTN_GROUP_QUANTUM channels or the whole row. */
    int64_t k_group, v_group;        /* channels per scale */
    int64_t ks_row, vs_row;          /* row strides of the scales, elements */
} pyattn_problem;

/* One work item: query rows [row0, row0 + nrows) of one (batch, head), read
 * against keys [key0, key1), with that (batch, head)'s score modifiers.
 * nrows is at most the table's block_rows and key0 a multiple of
 * PYATTN_KEY_CHUNK.  lse, when not NULL, receives each row's logsumexp of its
 * scaled and masked scores (natural log; -inf when no key takes part), nrows
 * contiguous values of the kernel's dtype: with it, outputs over disjoint key
 * ranges merge exactly.  row_sum, when not NULL (split-KV partials), splits
 * that logsumexp in two: lse then receives the rows' max score m and row_sum
 * their sum l of e^(s - m), as lse = m + log l cannot keep log l where m is
 * huge (a finfo.min mask).  weights, when not NULL, points at the (batch, head)
 * origin of a zeroed L x S array (row stride w_row) to which the softmax
 * probabilities are added times w_factor. */
typedef struct pyattn_block {
    int64_t row0, nrows;
    int64_t key0, key1;
    void *lse;
    void *row_sum;
    void *weights;
    int64_t diag;        /* row i's diagonal is key i + diag: 0 top-left, S - L lower-right */
    double alibi_slope;  /* 0, or the ALiBi bias -slope * |i + diag - j| is added */
    double sink;         /* -inf, or a logit added to the softmax's denominator */
    /* Quantized K/V: the scales at the (batch, key/value head) origin, as k
     * and v (see pyattn_problem's k_group); NULL for the other dtypes. */
    const void *k_scales, *v_scales;
} pyattn_block;

/* Attend one block.  q, k, v, mask and out point at the (batch, head) origin;
 * mask may be NULL when mask_kind is NONE. */
typedef void (*pyattn_attend_fn)(const pyattn_problem *p, const void *q,
                                 const void *k, const void *v, const void *mask,
                                 void *out, const pyattn_block *blk, void *scratch);

/* Bytes of per-thread scratch a kernel needs for this problem; SIZE_MAX when
 * that is not representable (see pyattn_size_mul). */
typedef size_t (*pyattn_scratch_fn)(const pyattn_problem *p);

/* Checked size arithmetic, saturating at SIZE_MAX, which no allocation can
 * satisfy.  Sizes come from claimed shapes (a zero-stride view claims 2^56
 * features with one element of memory), so they must never wrap. */
static inline size_t pyattn_size_mul(size_t a, size_t b)
{
    size_t r;
    return __builtin_mul_overflow(a, b, &r) ? SIZE_MAX : r;
}

static inline size_t pyattn_size_add(size_t a, size_t b)
{
    size_t r;
    return __builtin_add_overflow(a, b, &r) ? SIZE_MAX : r;
}

/* Start of every thread's scratch: which key/value head its panels hold. */
typedef struct pyattn_scratch_header {
    const void *k, *v;
} pyattn_scratch_header;
#define PYATTN_SCRATCH_HEADER 64 /* bytes, keeps the buffers after it aligned */

/* y = 2^x elementwise with the kernel's own exp (exposed for its tests). */
typedef void (*pyattn_exp2_fn)(const void *x, void *y, int64_t n);

typedef struct pyattn_dtype_kernel {
    pyattn_attend_fn attend;
    pyattn_scratch_fn scratch_bytes;
    pyattn_exp2_fn exp2;
    int64_t block_rows;              /* query rows per work item */
} pyattn_dtype_kernel;

/* One kernel set: an instruction set's kernels for every storage dtype.  An
 * entry whose attend is NULL was not compiled (float16 needs the compiler's
 * _Float16; bf16_products needs a CPU that multiplies bfloat16). */
typedef struct pyattn_kernels {
    const char *name;                /* "baseline", ...: the ISA in kernels_<ISA>.c */
    int (*cpu_supports)(void);       /* this CPU (and OS) can run the set */
    pyattn_dtype_kernel by_dtype[PYATTN_NUM_DTYPES];      /* exact: in the compute type */
    pyattn_dtype_kernel bf16_products[PYATTN_NUM_DTYPES]; /* Q K^T and P V in bfloat16,
                                                           * accumulated in float32 */
} pyattn_kernels;

/* The kernel sets of this build, best first, and their number. */
int pyattn_num_kernel_sets(void);
const pyattn_kernels *pyattn_kernel_set(int index);

/* The set that runs `dtype` (enum pyattn_dtype) when `set` is chosen: `set`
 * itself when its by_dtype entry exists, else the first set after it in the
 * order that this CPU supports and that has one; NULL when none does.  A set
 * enables a dtype only once it has run on a CPU of that set (int8 and
 * float8_e4m3fn: avx2 and baseline), so a better set may leave it out. */
const pyattn_kernels *pyattn_kernels_for_dtype(const pyattn_kernels *set, int dtype);

/* The set called `name`, or NULL when this build has none. */
const pyattn_kernels *pyattn_kernels_by_name(const char *name);

/* Quantize n rows of x (float32, D channels each, contiguous) to `format`
 * (PYATTN_INT8 or PYATTN_FLOAT8_E4M3FN, docs/kv-cache.md), `group`
 * channels per scale, into q (n x D bytes) and scales (n x D / group
 * float16, as bits), both contiguous.  Returns 0; 1 when x holds a
 * non-finite value, 2 when a group's scale overflows float16, 3 when this
 * build has no float16 (no _Float16), 4 for another format: then rows from
 * the first bad one on are left as they were. */
int pyattn_quantize(int format, const float *x, int64_t n, int64_t D, int64_t group, void *q,
                    uint16_t *scales);

/* Bytes of RAM of this machine, read once (every launch checks sizes). */
size_t pyattn_physical_memory(void);

/* 64-byte-aligned memory (NULL when nbytes is 0 or cannot be had), and its
 * release (NULL is fine). */
void *pyattn_aligned_alloc(size_t nbytes);
void pyattn_aligned_free(void *p);

/* OpenMP facts, answered without OpenMP when the build has none. */
int pyattn_openmp_enabled(void);
int pyattn_max_threads(void);
int pyattn_team_size(void);   /* threads in the current parallel region */

#endif
