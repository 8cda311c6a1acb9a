/*
 * Generic tiled online-softmax attention ("flash attention") for one block of
 * query rows.  This file is a template: include it once per (dtype, ISA) with
 *
 *   REAL      float or double
 *   UINT      the unsigned integer of REAL's width (uint32_t / uint64_t)
 *   SUFFIX    token naming the instance, e.g. f32_baseline (see FN)
 *   VBYTES    bytes per SIMD vector (16, 32, 64)
 *   MR, NV    micro-tile: MR rows x NV vectors of columns
 *   BLOCK_M   query rows per call (a multiple of MR)
 *   BLOCK_N   keys per tile (a multiple of NV * lanes)
 *   STORE     optional: the element type of q, k, v and out when it is not REAL
 *             (_Float16 or bfloat16's uint16_t), with STORE_KIND naming it and
 *             TO_REAL(x) / FROM_REAL(x) converting one element; elements are
 *             converted where they are loaded and written, and all the
 *             arithmetic stays in REAL.
 *
 * Vectors are GCC vector extensions, so the same text compiles to SSE2, AVX2
 * or AVX-512 depending on the target the including file selects.
 *
 * Structure, the BLIS way:
 *   micro-kernel  C[MR x NR] (+)= A[MR x K] * B[K x NR], B packed row-major;
 *                 used for both S = Q K^T (K = E) and O += P V (K = keys).
 *   macro-kernel  attend_tiled(): walks the key tiles of K^T / V panels
 *                 (packed once per head and thread, see workspace), masks,
 *                 and keeps the online softmax state per query row.
 *   decode path   attend_direct(): fewer than MR query rows read K and V in
 *                 place, one dot product per score.
 * attend() packs the scaled Q block, picks the path, and normalises.  The
 * L x S score matrix never exists: only one BLOCK_M x BLOCK_N tile does.
 */
#include <math.h>
#include <string.h>

#ifndef STORE
#define STORE REAL
#define TO_REAL(x) (x)
#define FROM_REAL(x) (x)
#define STORE_KIND 0
#endif
#define STORE_KIND_F16 1
#define STORE_KIND_BF16 2

#define LANES ((int64_t)(VBYTES / sizeof(REAL)))
#define NR (NV * LANES)

typedef REAL FN(vec) __attribute__((vector_size(VBYTES)));
typedef UINT FN(uvec) __attribute__((vector_size(VBYTES)));
#define VEC FN(vec)
#define UVEC FN(uvec)

static inline int64_t FN(round_up)(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

static inline VEC FN(vload)(const REAL *p) { VEC v; memcpy(&v, p, sizeof v); return v; }
static inline void FN(vstore)(REAL *p, VEC v) { memcpy(p, &v, sizeof v); }
static inline VEC FN(vsplat)(REAL x)
{
    /* Lane 0 shuffled everywhere: one broadcast.  ({0} + x costs an add, since
     * x + 0 is not x for -0; a lane loop becomes masked inserts.) */
    const VEC v = {x};
    return __builtin_shuffle(v, (UVEC){0});
}

/* Lane-wise mask ? a : b, where mask lanes are all-ones or all-zeros. */
static inline VEC FN(vselect)(UVEC mask, VEC a, VEC b)
{
    return (VEC)((mask & (UVEC)a) | (~mask & (UVEC)b));
}

/* Lane-wise a > b ? a : b, which ignores a NaN in `a`: NaN scores must not
 * become the running max (they still reach the output through 2^(NaN - max)).
 * x86's MAXPS/MAXPD compute exactly this in one instruction; GCC does not
 * see it in the generic select. */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#if VBYTES == 64 && REAL_IS_DOUBLE
#define PA_X86_MAX _mm512_max_pd
#elif VBYTES == 64
#define PA_X86_MAX _mm512_max_ps
#elif VBYTES == 32 && REAL_IS_DOUBLE
#define PA_X86_MAX _mm256_max_pd
#elif VBYTES == 32
#define PA_X86_MAX _mm256_max_ps
#elif VBYTES == 16 && REAL_IS_DOUBLE
#define PA_X86_MAX _mm_max_pd
#else
#define PA_X86_MAX _mm_max_ps
#endif
#endif

static inline VEC FN(vmax)(VEC a, VEC b)
{
#ifdef PA_X86_MAX
    return (VEC)PA_X86_MAX(a, b);
#else
    return FN(vselect)((UVEC)(a > b), a, b);
#endif
}
#undef PA_X86_MAX

/*
 * Scores stay in natural units, exactly as the reference computes them: Q is
 * prescaled by `scale` and masks, biases and caps are added as given.  Only
 * the softmax's exponential changes base, e^(s - m) = 2^((s - m) log2(e)),
 * on the difference, which is <= LAZY_RESCALE or -inf or NaN.  (Folding
 * log2(e) into the scores instead would turn finite scores beyond
 * FLT_MAX / log2(e), such as HuggingFace's finfo.min mask, into -inf.)
 *
 * vexp2: 2^x for x < 127 (fp32), vectorised and branch-free, <= 2 ulp
 * (tests/test_kernels.py measures it).  x = n + r with n = round(x) and |r| <= 1/2, exactly; 2^r =
 * e^(r ln2) by its Taylor polynomial (truncation far below half an ulp there);
 * 2^n is built in the exponent bits.  2^-inf = 0 exactly, NaN stays NaN, and
 * results below the smallest normal number flush to 0: they are under 2^-126
 * (fp32) of the row maximum, so they cannot change a softmax.
 */
#if REAL_IS_DOUBLE
#define EXP_MAGIC 6755399441055744.0 /* 1.5 * 2^52: adding it rounds to an integer */
#define EXP_MAGIC_BITS 0x4338000000000000ULL
#define EXP_MANT_BITS 52
#define EXP_BIAS 1023
#define EXP2_LO (-1022.0)
#define LOG2E 1.44269504088896338700e+00
#define EXP_DEGREE 13
#else
#define EXP_MAGIC 12582912.0f /* 1.5 * 2^23 */
#define EXP_MAGIC_BITS 0x4B400000U
#define EXP_MANT_BITS 23
#define EXP_BIAS 127
#define EXP2_LO (-126.0f)
#define LOG2E 1.44269504088896341f
#define EXP_DEGREE 7
#endif

static inline VEC FN(vexp2)(VEC x)
{
    /* n = round(x), read back from the low mantissa bits of t. */
    const VEC t = x + EXP_MAGIC;
    const VEC n = t - EXP_MAGIC;
    const VEC r = x - n;
    /* Horner on sum (r ln2)^k / k!, k = 0..D. */
    static const double coef[] = {
        1.0, 0.6931471805599453, 0.2402265069591007, 0.055504108664821576,
        0.009618129107628477, 0.0013333558146428441, 0.00015403530393381606,
        1.5252733804059838e-05, 1.3215486790144305e-06, 1.0178086009239696e-07,
        7.054911620801121e-09, 4.44553827187081e-10, 2.5678435993488196e-11,
        1.3691488853904124e-12};
    VEC poly = FN(vsplat)((REAL)coef[EXP_DEGREE]);
    for (int kk = EXP_DEGREE - 1; kk >= 0; kk--) poly = poly * r + (REAL)coef[kk];
    const UVEC two_n = (((UVEC)t - EXP_MAGIC_BITS) + EXP_BIAS) << EXP_MANT_BITS;
    const VEC y = poly * (VEC)two_n;
    return FN(vselect)((UVEC)(x < EXP2_LO), FN(vsplat)(0), y);
}

/* y = 2^x over n elements: vexp2 for tests (tail lanes through a buffer). */
static void FN(exp2_array)(const void *x_, void *y_, int64_t n)
{
    const REAL *x = x_;
    REAL *y = y_;
    for (int64_t i = 0; i < n; i += LANES) {
        REAL buf[LANES];
        const int64_t m = n - i < LANES ? n - i : LANES;
        for (int64_t j = 0; j < LANES; j++) buf[j] = j < m ? x[i + j] : 0;
        FN(vstore)(buf, FN(vexp2)(FN(vload)(buf)));
        memcpy(y + i, buf, sizeof(REAL) * (size_t)m);
    }
}

/* v with lanes i and i ^ 2^level swapped: one butterfly stage.  The index
 * vectors are constants (a lane loop would be rebuilt on every call). */
#define PA_XOR_ROW(w) {0 ^ w, 1 ^ w, 2 ^ w, 3 ^ w, 4 ^ w, 5 ^ w, 6 ^ w, 7 ^ w, \
                       8 ^ w, 9 ^ w, 10 ^ w, 11 ^ w, 12 ^ w, 13 ^ w, 14 ^ w, 15 ^ w}
static const UINT FN(xor_lanes)[4][16] = {PA_XOR_ROW(1), PA_XOR_ROW(2), PA_XOR_ROW(4),
                                          PA_XOR_ROW(8)};
#undef PA_XOR_ROW

static inline VEC FN(vswap)(VEC v, int level)
{
    UVEC idx;
    memcpy(&idx, FN(xor_lanes)[level], sizeof idx);
    return __builtin_shuffle(v, idx);
}

/* Horizontal max and sum by butterfly: log2(lanes) shuffles, the same order
 * on every call, so results never depend on where a row is computed. */
static inline REAL FN(hmax)(VEC v)
{
    for (int level = 0; (1 << level) < LANES; level++) v = FN(vmax)(FN(vswap)(v, level), v);
    return v[0];
}

static inline REAL FN(hsum)(VEC v)
{
    for (int level = 0; (1 << level) < LANES; level++) v += FN(vswap)(v, level);
    return v[0];
}

/* C[MR x NR] = (accumulate ? C : 0) + A[MR x K] * B[K x NR]; rows of A at
 * stride lda, of B at ldb, of C at ldc.  The MR x NV accumulators live in
 * registers for the whole K loop. */
static inline void FN(micro_kernel)(int64_t K, const REAL *A, int64_t lda,
                                    const REAL *B, int64_t ldb, REAL *C,
                                    int64_t ldc, int accumulate)
{
    VEC acc[MR][NV];
    for (int r = 0; r < MR; r++)
        for (int j = 0; j < NV; j++)
            acc[r][j] = accumulate ? FN(vload)(C + r * ldc + j * LANES) : FN(vsplat)(0);
    for (int64_t kk = 0; kk < K; kk++) {
        VEC b[NV];
        for (int j = 0; j < NV; j++) b[j] = FN(vload)(B + kk * ldb + j * LANES);
        for (int r = 0; r < MR; r++) {
            const VEC a = FN(vsplat)(A[r * lda + kk]);
            for (int j = 0; j < NV; j++) acc[r][j] += a * b[j];
        }
    }
    for (int r = 0; r < MR; r++)
        for (int j = 0; j < NV; j++) FN(vstore)(C + r * ldc + j * LANES, acc[r][j]);
}

/* C[rows x cols] (+)= A[rows x K] * B[K x cols], rows a multiple of MR and
 * cols of NR: the tiling loop around the micro-kernel. */
static void FN(tile_gemm)(int64_t rows, int64_t cols, int64_t K, const REAL *A,
                          int64_t lda, const REAL *B, int64_t ldb, REAL *C,
                          int64_t ldc, int accumulate)
{
    for (int64_t r0 = 0; r0 < rows; r0 += MR)
        for (int64_t c0 = 0; c0 < cols; c0 += NR)
            FN(micro_kernel)(K, A + r0 * lda, lda, B + c0, ldb, C + r0 * ldc + c0,
                             ldc, accumulate);
}

/*
 * Scratch layout, per thread.  The K^T and V panels hold every key tile of one
 * (batch, key/value head) when that fits PANEL_BUDGET, so the head is packed
 * once per thread and reused by all the query blocks the thread takes; a
 * longer sequence gets a one-tile panel, repacked per tile.
 */
#define PANEL_BUDGET ((int64_t)32 << 20) /* bytes per thread */

typedef struct {
    REAL *q_block;         /* BLOCK_M x E, scaled Q */
    REAL *kt_panel;        /* tiles of E x BLOCK_N: K^T, zero past the last key */
    REAL *v_panel;         /* tiles of BLOCK_N x evp: V, zero past Ev */
    REAL *scores;          /* BLOCK_M x BLOCK_N: scores, then weights */
    REAL *acc;             /* BLOCK_M x evp: unnormalised output */
    REAL *row_max, *row_sum; /* BLOCK_M each */
    int whole_head;        /* the panels hold all tiles of the head */
} FN(workspace);

/* Elements of one packed key tile: E x BLOCK_N of K^T and BLOCK_N x evp of V
 * (SIZE_MAX when not representable: sizes are checked, never wrapped). */
static size_t FN(tile_elems)(const pyattn_problem *p)
{
    const size_t evp = pyattn_size_mul(pyattn_size_add((size_t)p->Ev, NR - 1) / NR, NR);
    return pyattn_size_mul(BLOCK_N, pyattn_size_add((size_t)p->E, evp));
}

static int64_t FN(panel_tiles)(const pyattn_problem *p)
{
    const int64_t tiles = (p->S + BLOCK_N - 1) / BLOCK_N;
    const size_t bytes = pyattn_size_mul(pyattn_size_mul(FN(tile_elems)(p), sizeof(REAL)),
                                         (size_t)tiles);
    return bytes <= (size_t)PANEL_BUDGET ? tiles : 1;
}

static size_t FN(scratch_bytes)(const pyattn_problem *p)
{
    const size_t E = (size_t)p->E;
    const size_t evp = pyattn_size_mul(pyattn_size_add((size_t)p->Ev, NR - 1) / NR, NR);
    size_t elems = pyattn_size_mul(BLOCK_M, E); /* q_block */
    elems = pyattn_size_add(elems, pyattn_size_mul((size_t)FN(panel_tiles)(p),
                                                   FN(tile_elems)(p))); /* panels */
    elems = pyattn_size_add(elems, BLOCK_M * BLOCK_N + 2 * BLOCK_M); /* scores, max, sum */
    elems = pyattn_size_add(elems, pyattn_size_mul(BLOCK_M, evp)); /* acc */
    return pyattn_size_add(PYATTN_SCRATCH_HEADER, pyattn_size_mul(elems, sizeof(REAL)));
}

static FN(workspace) FN(carve)(const pyattn_problem *p, void *scratch)
{
    const int64_t E = p->E, evp = FN(round_up)(p->Ev, NR);
    const int64_t tiles = FN(panel_tiles)(p);
    FN(workspace) w;
    REAL *next = (REAL *)((char *)scratch + PYATTN_SCRATCH_HEADER);
    w.q_block = next, next += BLOCK_M * E;
    w.kt_panel = next, next += tiles * E * BLOCK_N;
    w.v_panel = next, next += tiles * BLOCK_N * evp;
    w.scores = next, next += BLOCK_M * BLOCK_N;
    w.acc = next, next += BLOCK_M * evp;
    w.row_max = next, next += BLOCK_M;
    w.row_sum = next;
    w.whole_head = tiles > 1 || p->S <= BLOCK_N;
    return w;
}

/* LANES contiguous STORE elements as a vector of REAL. */
static inline VEC FN(vload_store)(const STORE *p)
{
#if STORE_KIND == 0
    return FN(vload)(p);
#elif STORE_KIND == STORE_KIND_BF16 /* the top half of a float: widen, shift */
    typedef uint16_t FN(hvec) __attribute__((vector_size(VBYTES / 2)));
    FN(hvec) h;
    memcpy(&h, p, sizeof h);
    return (VEC)(__builtin_convertvector(h, UVEC) << 16);
#elif defined(__F16C__) && VBYTES == 64 /* GCC converts _Float16 one by one */
    return (VEC)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#elif defined(__F16C__) && VBYTES == 32
    return (VEC)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    REAL buf[LANES];
    for (int64_t i = 0; i < LANES; i++) buf[i] = TO_REAL(p[i]);
    return FN(vload)(buf);
#endif
}

/* dst[0:n] = src[0:n:stride] as REAL. */
static inline void FN(load_row)(const STORE *src, int64_t stride, int64_t n, REAL *dst)
{
    int64_t x = 0;
    if (stride == 1)
        for (; x + LANES <= n; x += LANES) FN(vstore)(dst + x, FN(vload_store)(src + x));
    for (; x < n; x++) dst[x] = TO_REAL(src[x * stride]);
}

/* Pack keys [j0, j0 + nb) as K^T (E x BLOCK_N, zero columns past nb) and V
 * (nb x evp, zero columns past Ev). */
static void FN(pack_tile)(const pyattn_problem *p, const STORE *k, const STORE *v,
                          int64_t j0, int64_t nb, REAL *kt, REAL *vp)
{
    const int64_t E = p->E, Ev = p->Ev, evp = FN(round_up)(Ev, NR);
    const int64_t cols_pad = FN(round_up)(nb, NR);
    /* Rows of K^T are written contiguously and K is read strided: half the
     * cost of the opposite order (contiguous reads, strided writes). */
    const STORE *src = k + j0 * p->k_row;
    for (int64_t e = 0; e < E; e++) {
        REAL *dst = kt + e * BLOCK_N;
        for (int64_t c = 0; c < nb; c++) dst[c] = TO_REAL(src[c * p->k_row + e * p->k_col]);
        for (int64_t c = nb; c < cols_pad; c++) dst[c] = 0;
    }
    for (int64_t c = 0; c < nb; c++) {
        FN(load_row)(v + (j0 + c) * p->v_row, p->v_col, Ev, vp + c * evp);
        for (int64_t x = Ev; x < evp; x++) vp[c * evp + x] = 0;
    }
}

/* Keys row i may see: [row_lo, row_hi), its window around the diagonal
 * i + diag (causal is window_right = 0); -1 leaves a side unbounded. */
static inline int64_t FN(row_lo)(const pyattn_problem *p, const pyattn_block *blk, int64_t i)
{
    return p->window_left < 0 ? 0 : i + blk->diag - p->window_left;
}

static inline int64_t FN(row_hi)(const pyattn_problem *p, const pyattn_block *blk, int64_t i)
{
    return p->window_right < 0 ? INT64_MAX : i + blk->diag + p->window_right + 1;
}

/* s = c tanh(s / c), lane-wise.  For |x| >= 1/4, tanh|x| = (1 - e) / (1 + e)
 * with e = e^(-2|x|) <= 0.61 (no overflow, at most ~1.4 bits lost to the
 * subtraction); below, where 1 - e would cancel, x times the Taylor series in
 * x^2 (6 terms reach float's precision at 1/4, 13 double's). */
static void FN(softcap_row)(REAL *s, int64_t n, REAL cap)
{
    static const double taylor[] = {
        1.0, -0.3333333333333333, 0.13333333333333333, -0.05396825396825397,
        0.021869488536155203, -0.008863235529902197, 0.003592128036572481,
        -0.0014558343870513183, 0.000590027440945586, -0.00023912911424355248,
        9.691537956929451e-05, -3.927832388331683e-05, 1.5918905069328964e-05};
    const int terms = REAL_IS_DOUBLE ? 13 : 6;
    const VEC vcap = FN(vsplat)(cap), one = FN(vsplat)(1), quarter = FN(vsplat)((REAL)0.25);
    const VEC to_exp2 = FN(vsplat)((REAL)(-2 * LOG2E));
    for (int64_t c = 0; c < n; c += LANES) {
        const VEC x = FN(vload)(s + c) / vcap;
        const UVEC negative = (UVEC)(x < 0);
        const VEC ax = FN(vselect)(negative, -x, x);
        const VEC e = FN(vexp2)(ax * to_exp2);
        const VEC t = (one - e) / (one + e);
        const VEC x2 = x * x;
        VEC poly = FN(vsplat)((REAL)taylor[terms - 1]);
        for (int k = terms - 2; k >= 0; k--) poly = poly * x2 + (REAL)taylor[k];
        const VEC tanh_x = FN(vselect)((UVEC)(ax < quarter), x * poly,
                                       FN(vselect)(negative, -t, t));
        FN(vstore)(s + c, tanh_x * vcap);
    }
}

/* Turn one row of raw tile scores into the scores the softmax sees:
 * soft-capping, then the ALiBi bias -slope |i + diag - j|, then the user's
 * mask, the window (causality) and the padding past the last key, all -inf. */
static void FN(finish_row)(const pyattn_problem *p, const pyattn_block *blk, const void *mask,
                           REAL *s, int64_t i, int64_t j0, int64_t nb, int64_t cols_pad)
{
    const REAL ninf = -(REAL)INFINITY;
    if (p->softcap > 0) FN(softcap_row)(s, nb, (REAL)p->softcap);
    if (blk->alibi_slope != 0) {
        const REAL slope = (REAL)blk->alibi_slope;
        const int64_t d = i + blk->diag - j0; /* column c is |d - c| from the diagonal */
        for (int64_t c = 0; c < nb; c++) s[c] -= slope * (REAL)(d > c ? d - c : c - d);
    }
    if (p->mask_kind == PYATTN_MASK_BOOL) {
        const uint8_t *m = (const uint8_t *)mask + i * p->mask_row + j0 * p->mask_col;
        for (int64_t c = 0; c < nb; c++)
            if (!m[c * p->mask_col]) s[c] = ninf;
    } else if (p->mask_kind == PYATTN_MASK_ADDITIVE) {
        const REAL *m = (const REAL *)mask + i * p->mask_row + j0 * p->mask_col;
        for (int64_t c = 0; c < nb; c++) s[c] += m[c * p->mask_col];
    }
    const int64_t lo = FN(row_lo)(p, blk, i) - j0, hi = FN(row_hi)(p, blk, i) - j0;
    for (int64_t c = 0; c < nb && c < lo; c++) s[c] = ninf;
    for (int64_t c = hi > 0 ? hi : 0; c < nb; c++) s[c] = ninf;
    for (int64_t c = nb; c < cols_pad; c++) s[c] = ninf;
}

/* Whether row i of the tile [j0, j0 + nb) needs finish_row at all. */
static inline int FN(row_needs_finish)(const pyattn_problem *p, const pyattn_block *blk,
                                       int64_t i, int64_t j0, int64_t nb, int64_t cols_pad)
{
    return p->mask_kind != PYATTN_MASK_NONE || p->softcap > 0 || blk->alibi_slope != 0 ||
           nb != cols_pad || FN(row_lo)(p, blk, i) > j0 || FN(row_hi)(p, blk, i) < j0 + nb;
}

/* The running max moves only when a tile beats it by more than this: weights
 * then stay below e^LAZY_RESCALE = 2^8, far from overflow, and most tiles
 * skip both the exp of the correction and the rescaling of the output.  Any
 * shift gives the same softmax; this one is just cheaper. */
#define LAZY_RESCALE ((REAL)5.545177444479562) /* 8 ln 2 */

/* One online-softmax step for one query row and one key tile: the scores s
 * become unnormalised weights e^(s - m), and when the running max m moves,
 * the sum l and the output row are rescaled by e^(m_old - m_new). */
static void FN(softmax_step)(REAL *s, int64_t cols_pad, REAL *m, REAL *l,
                             REAL *o_row, int64_t evp)
{
    /* Tile max; a row that is masked so far keeps max = -inf. */
    VEC vm = FN(vsplat)(-(REAL)INFINITY);
    for (int64_t c = 0; c < cols_pad; c += LANES) vm = FN(vmax)(FN(vload)(s + c), vm);
    const REAL tile_max = FN(hmax)(vm);
    const REAL m_new = tile_max > *m + LAZY_RESCALE ? tile_max : *m;
    /* Shift by 0 while everything is masked, so 2^(-inf - shift) = 0, not NaN. */
    const REAL shift = m_new == -(REAL)INFINITY ? 0 : m_new;
    /* p = e^(s - shift) and its sum; the difference is never +inf (s <= its
     * tile max), and -inf when it overflows, which is the limit. */
    const VEC vshift = FN(vsplat)(shift), log2e = FN(vsplat)(LOG2E);
    VEC vsum = FN(vsplat)(0);
    for (int64_t c = 0; c < cols_pad; c += LANES) {
        const VEC pv = FN(vexp2)((FN(vload)(s + c) - vshift) * log2e);
        FN(vstore)(s + c, pv);
        vsum += pv;
    }
    if (m_new != *m) {
        /* The old state weighs e^(m_old - shift): 0 for an empty past. */
        const REAL alpha = FN(vexp2)(FN(vsplat)((*m - shift) * LOG2E))[0];
        const VEC va = FN(vsplat)(alpha);
        for (int64_t c = 0; c < evp; c += LANES) FN(vstore)(o_row + c, FN(vload)(o_row + c) * va);
        *l *= alpha;
        *m = m_new;
    }
    *l += FN(hsum)(vsum);
}

/* dot(a, b) over n elements: vector body, scalar tail. */
static inline REAL FN(dot)(const REAL *a, const STORE *b, int64_t n)
{
    const int64_t nv = n - n % LANES;
    VEC acc = FN(vsplat)(0);
    for (int64_t e = 0; e < nv; e += LANES) acc += FN(vload)(a + e) * FN(vload_store)(b + e);
    REAL d = FN(hsum)(acc);
    for (int64_t e = nv; e < n; e++) d += a[e] * TO_REAL(b[e]);
    return d;
}

/* One stage of a transposing reduction: lanes whose bit `1 << level` is
 * clear get a's pairwise sums across that bit, the others b's. */
static inline VEC FN(fold)(VEC a, VEC b, int level)
{
    static const UINT lanes[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    UVEC lane;
    memcpy(&lane, lanes, sizeof lane);
    const UVEC high = (UVEC)((lane & ((UINT)1 << level)) != 0);
    return FN(vselect)(high, b, a) + FN(vswap)(FN(vselect)(high, a, b), level);
}

/* s[j] = dot(a, b + j * ldb) for the LANES rows j: one accumulator per row,
 * then log2(LANES) fold stages sum all of them at once (instead of one
 * horizontal sum per dot product). */
static inline void FN(dots)(const REAL *a, const STORE *b, int64_t ldb, int64_t n, REAL *s)
{
    const int64_t nv = n - n % LANES;
    enum { G = LANES < 4 ? LANES : 4 }; /* rows at once: independent FMA chains */
    VEC acc[LANES];
    for (int j = 0; j < LANES; j += G) {
        VEC sum[G];
        for (int g = 0; g < G; g++) sum[g] = FN(vsplat)(0);
        for (int64_t e = 0; e < nv; e += LANES) {
            const VEC av = FN(vload)(a + e);
            for (int g = 0; g < G; g++) sum[g] += av * FN(vload_store)(b + (j + g) * ldb + e);
        }
        for (int g = 0; g < G; g++) acc[j + g] = sum[g];
    }
    /* Fully unrolled, so that acc stays in registers. */
#pragma GCC unroll 4
    for (int level = 0; (1 << level) < LANES; level++)
#pragma GCC unroll 8
        for (int i = 0; i < (LANES >> (level + 1)); i++)
            acc[i] = FN(fold)(acc[2 * i], acc[2 * i + 1], level);
    FN(vstore)(s, acc[0]);
    for (int64_t e = nv; e < n; e++)
        for (int j = 0; j < LANES; j++) s[j] += a[e] * TO_REAL(b[j * ldb + e]);
}

/* y[0:n] += sum over keys c < nb of p[c] * x[c * ldx + 0:n], with y's
 * vectors held in registers across the keys (8 at a time). */
static inline void FN(weighted_rows)(const REAL *p, const STORE *x, int64_t ldx, int64_t nb,
                                     REAL *y, int64_t n)
{
    enum { BLOCK = 8 };
    const int64_t nv = n - n % LANES;
    int64_t x0 = 0;
    for (; x0 + BLOCK * LANES <= nv; x0 += BLOCK * LANES) { /* constant trip counts: registers */
        VEC acc[BLOCK];
        for (int i = 0; i < BLOCK; i++) acc[i] = FN(vload)(y + x0 + i * LANES);
        for (int64_t c = 0; c < nb; c++) {
            const VEC pc = FN(vsplat)(p[c]);
            for (int i = 0; i < BLOCK; i++) acc[i] += pc * FN(vload_store)(x + c * ldx + x0 + i * LANES);
        }
        for (int i = 0; i < BLOCK; i++) FN(vstore)(y + x0 + i * LANES, acc[i]);
    }
    for (; x0 < nv; x0 += LANES) {
        VEC acc = FN(vload)(y + x0);
        for (int64_t c = 0; c < nb; c++) acc += FN(vsplat)(p[c]) * FN(vload_store)(x + c * ldx + x0);
        FN(vstore)(y + x0, acc);
    }
    for (int64_t e = nv; e < n; e++)
        for (int64_t c = 0; c < nb; c++) y[e] += p[c] * TO_REAL(x[c * ldx + e]);
}

/* Keys the block reads: its key range cut to what its rows' windows can see,
 * starting on a tile boundary (key0 is one). */
static inline void FN(key_range)(const pyattn_problem *p, const pyattn_block *blk,
                                 int64_t *begin, int64_t *end)
{
    const int64_t lo = FN(row_lo)(p, blk, blk->row0);
    const int64_t hi = FN(row_hi)(p, blk, blk->row0 + blk->nrows - 1);
    *begin = lo > blk->key0 ? lo / BLOCK_N * BLOCK_N : blk->key0;
    *end = hi < blk->key1 ? hi : blk->key1;
}

/*
 * Few query rows (decode): no transposed panels and no padding to MR rows.
 * Key and value rows are read where they lie (copied only when their own
 * elements are not contiguous), each score is one dot product, and P V is
 * accumulated key by key.  Same masking and online softmax as the tiled path.
 */
static void FN(attend_direct)(const pyattn_problem *p, const STORE *k, const STORE *v,
                              const void *mask, const pyattn_block *blk, REAL *qs,
                              REAL *kbuf, REAL *vbuf, REAL *sc, REAL *acc, REAL *mrow,
                              REAL *lrow)
{
    const int64_t E = p->E, Ev = p->Ev, evp = FN(round_up)(Ev, NR);
    const int64_t row0 = blk->row0, nrows = blk->nrows;
    int64_t kv_begin, kv_end;
    FN(key_range)(p, blk, &kv_begin, &kv_end);
    for (int64_t j0 = kv_begin; j0 < kv_end; j0 += BLOCK_N) {
        const int64_t nb = kv_end - j0 < BLOCK_N ? kv_end - j0 : BLOCK_N;
        const int64_t cols_pad = FN(round_up)(nb, LANES);
        /* Rows are read in place when their elements are contiguous, else
         * gathered into the (otherwise unused) panels first. */
        const STORE *kr = k + j0 * p->k_row, *vr = v + j0 * p->v_row;
        int64_t k_stride = p->k_row, v_stride = p->v_row;
        if (p->k_col != 1) {
            STORE *kb = (STORE *)kbuf;
            for (int64_t c = 0; c < nb; c++)
                for (int64_t e = 0; e < E; e++) kb[c * E + e] = kr[c * p->k_row + e * p->k_col];
            kr = kb, k_stride = E;
        }
        if (p->v_col != 1) {
            STORE *vb = (STORE *)vbuf;
            for (int64_t c = 0; c < nb; c++)
                for (int64_t x = 0; x < Ev; x++) vb[c * Ev + x] = vr[c * p->v_row + x * p->v_col];
            vr = vb, v_stride = Ev;
        }
        for (int64_t r = 0; r < nrows; r++) {
            REAL *s = sc + r * BLOCK_N;
            const int64_t full = nb - nb % LANES;
            for (int64_t c = 0; c < full; c += LANES)
                FN(dots)(qs + r * E, kr + c * k_stride, k_stride, E, s + c);
            for (int64_t c = full; c < nb; c++) s[c] = FN(dot)(qs + r * E, kr + c * k_stride, E);
            for (int64_t c = nb; c < cols_pad; c++) s[c] = 0; /* read by softcap_row */
            if (FN(row_needs_finish)(p, blk, row0 + r, j0, nb, cols_pad))
                FN(finish_row)(p, blk, mask, s, row0 + r, j0, nb, cols_pad);
            FN(softmax_step)(s, cols_pad, mrow + r, lrow + r, acc + r * evp, evp);
            FN(weighted_rows)(s, vr, v_stride, nb, acc + r * evp, Ev);
        }
    }
}

/* Scores of one key tile for the block's rows [*r_begin, *r_end), finished
 * (see finish_row) in w->scores; *vp points at the tile's packed V.  The rows
 * are whole MR groups: groups whose windows miss the tile are left out
 * (causality hides the tile from early rows, a sliding window from late ones).
 * Returns 0 when no row sees the tile. */
static int FN(tile_scores)(const pyattn_problem *p, const STORE *k, const STORE *v,
                           const void *mask, const pyattn_block *blk, int64_t rows_pad,
                           const FN(workspace) *w, int64_t j0, int64_t nb, const REAL **vp,
                           int64_t *r_begin, int64_t *r_end)
{
    const int64_t E = p->E, evp = FN(round_up)(p->Ev, NR), cols_pad = FN(round_up)(nb, NR);
    const int64_t row0 = blk->row0, nrows = blk->nrows;
    /* Rows r see the tile iff row_hi(r) > j0 and row_lo(r) < j0 + nb. */
    int64_t first = 0, last = nrows;
    if (p->window_right >= 0) first = j0 - blk->diag - p->window_right - row0;
    if (p->window_left >= 0) last = j0 + nb - blk->diag + p->window_left - row0;
    first = first > 0 ? first / MR * MR : 0;
    last = last < nrows ? FN(round_up)(last, MR) : rows_pad;
    if (last <= first) return 0;
    *r_begin = first, *r_end = last;

    const REAL *kt = w->kt_panel;
    *vp = w->v_panel;
    if (w->whole_head) {
        kt += j0 * E, *vp += j0 * evp;
    } else {
        FN(pack_tile)(p, k, v, j0, nb, w->kt_panel, w->v_panel);
    }
    /* S = (scale Q) K^T for the tile. */
    FN(tile_gemm)(last - first, cols_pad, E, w->q_block + first * E, E, kt, BLOCK_N,
                  w->scores + first * BLOCK_N, BLOCK_N, 0);
    for (int64_t r = first; r < last && r < nrows; r++)
        if (FN(row_needs_finish)(p, blk, row0 + r, j0, nb, cols_pad))
            FN(finish_row)(p, blk, mask, w->scores + r * BLOCK_N, row0 + r, j0, nb, cols_pad);
    return 1;
}

/* Many query rows: the GEMM-shaped path on packed tiles (see the top). */
static void FN(attend_tiled)(const pyattn_problem *p, const STORE *k, const STORE *v,
                             const void *mask, const pyattn_block *blk, int64_t rows_pad,
                             pyattn_scratch_header *tag, const FN(workspace) *w)
{
    const int64_t E = p->E, evp = FN(round_up)(p->Ev, NR);
    if (w->whole_head && (tag->k != k || tag->v != v)) {
        for (int64_t j0 = 0; j0 < p->S; j0 += BLOCK_N)
            FN(pack_tile)(p, k, v, j0, p->S - j0 < BLOCK_N ? p->S - j0 : BLOCK_N,
                          w->kt_panel + j0 * E, w->v_panel + j0 * evp);
        tag->k = k, tag->v = v;
    }
    int64_t kv_begin, kv_end;
    FN(key_range)(p, blk, &kv_begin, &kv_end);
    for (int64_t j0 = kv_begin; j0 < kv_end; j0 += BLOCK_N) {
        const int64_t nb = kv_end - j0 < BLOCK_N ? kv_end - j0 : BLOCK_N;
        const REAL *vp;
        int64_t r0, r1;
        if (!FN(tile_scores)(p, k, v, mask, blk, rows_pad, w, j0, nb, &vp, &r0, &r1)) continue;
        REAL *sc = w->scores, *acc = w->acc;
        for (int64_t r = r0; r < r1 && r < blk->nrows; r++)
            FN(softmax_step)(sc + r * BLOCK_N, FN(round_up)(nb, NR), w->row_max + r,
                             w->row_sum + r, acc + r * evp, evp);

        /* O += P V (padding rows hold P = 0 from their zero Q rows). */
        FN(tile_gemm)(r1 - r0, evp, nb, sc + r0 * BLOCK_N, BLOCK_N, vp, evp,
                      acc + r0 * evp, evp, 1);
    }
}

/* Attention weights, after attend_tiled: once every row's max m and sum l are
 * final, the probabilities the output used, e^(s - m) / l, are recomputed tile
 * by tile and added, times w_factor, into the zeroed blk->weights (factor 1
 * writes one head; 1/H for every head in turn averages them).  Keys a row
 * never sees keep their 0, and so do rows with no key at all (l == 0). */
static void FN(add_weights)(const pyattn_problem *p, const STORE *k, const STORE *v,
                            const void *mask, const pyattn_block *blk, int64_t rows_pad,
                            const FN(workspace) *w)
{
    REAL *weights = blk->weights;
    int64_t kv_begin, kv_end;
    FN(key_range)(p, blk, &kv_begin, &kv_end);
    for (int64_t j0 = kv_begin; j0 < kv_end; j0 += BLOCK_N) {
        const int64_t nb = kv_end - j0 < BLOCK_N ? kv_end - j0 : BLOCK_N;
        const REAL *vp;
        int64_t r0, r1;
        if (!FN(tile_scores)(p, k, v, mask, blk, rows_pad, w, j0, nb, &vp, &r0, &r1)) continue;
        for (int64_t r = r0; r < r1 && r < blk->nrows; r++) {
            if (w->row_sum[r] == 0) continue;
            REAL *s = w->scores + r * BLOCK_N;
            const VEC shift = FN(vsplat)(w->row_max[r]), log2e = FN(vsplat)(LOG2E);
            const VEC coef = FN(vsplat)((REAL)(p->w_factor / w->row_sum[r]));
            for (int64_t c = 0; c < nb; c += LANES)
                FN(vstore)(s + c, FN(vexp2)((FN(vload)(s + c) - shift) * log2e) * coef);
            REAL *dst = weights + (blk->row0 + r) * p->w_row + j0;
            for (int64_t c = 0; c < nb; c++) dst[c] += s[c];
        }
    }
}

/* An attention sink: one more logit in the softmax's denominator with no
 * value row, so the row's weights sum to less than 1.  Same state update as
 * softmax_step with a one-key tile that adds nothing to o_row.  The caller
 * skips a sink of -inf (it weighs nothing). */
static void FN(add_sink)(REAL sink, REAL *m, REAL *l, REAL *o_row, int64_t evp)
{
    if (sink > *m) {
        /* The old state weighs e^(m - sink): 0 for an empty past. */
        const REAL alpha = *m == -(REAL)INFINITY
                               ? 0 : FN(vexp2)(FN(vsplat)((*m - sink) * LOG2E))[0];
        const VEC va = FN(vsplat)(alpha);
        for (int64_t c = 0; c < evp; c += LANES) FN(vstore)(o_row + c, FN(vload)(o_row + c) * va);
        *l = *l * alpha + 1;
        *m = sink;
    } else {
        *l += FN(vexp2)(FN(vsplat)((sink - *m) * LOG2E))[0];
    }
}

static void FN(attend)(const pyattn_problem *p, const void *q_, const void *k_,
                       const void *v_, const void *mask, void *out_,
                       const pyattn_block *blk, void *scratch)
{
    const int64_t row0 = blk->row0, nrows = blk->nrows;
    const STORE *q = q_, *k = k_, *v = v_;
    STORE *out = out_;
    const int64_t E = p->E, Ev = p->Ev, evp = FN(round_up)(Ev, NR);
    const int64_t rows_pad = FN(round_up)(nrows, MR);
    const REAL scale = (REAL)p->scale;
    const FN(workspace) w = FN(carve)(p, scratch);
    REAL *qs = w.q_block;

    /* Pack the scaled Q block; padding rows are zero and never written out. */
    for (int64_t r = 0; r < rows_pad; r++) {
        if (r < nrows) {
            const STORE *src = q + (row0 + r) * p->q_row;
            for (int64_t e = 0; e < E; e++) qs[r * E + e] = TO_REAL(src[e * p->q_col]) * scale;
        } else {
            for (int64_t e = 0; e < E; e++) qs[r * E + e] = 0;
        }
        w.row_max[r] = -(REAL)INFINITY;
        w.row_sum[r] = 0;
    }
    memset(w.acc, 0, sizeof(REAL) * (size_t)(rows_pad * evp));

    pyattn_scratch_header *tag = scratch;
    if (nrows < MR && !blk->weights) {
        if (p->k_col != 1 || p->v_col != 1)
            tag->k = tag->v = NULL; /* the decode path copies rows into the panels */
        FN(attend_direct)(p, k, v, mask, blk, qs, w.kt_panel, w.v_panel, w.scores, w.acc,
                          w.row_max, w.row_sum);
    } else {
        FN(attend_tiled)(p, k, v, mask, blk, rows_pad, tag, &w);
    }
    /* Counted once, with the first keys; in the compute type, where a sink
     * beyond its range is -inf (the validation refuses +inf). */
    const REAL sink = (REAL)blk->sink;
    if (blk->key0 == 0 && sink > -(REAL)INFINITY)
        for (int64_t r = 0; r < nrows; r++)
            FN(add_sink)(sink, w.row_max + r, w.row_sum + r, w.acc + r * evp, evp);
    if (blk->weights) FN(add_weights)(p, k, v, mask, blk, rows_pad, &w);

    /* Normalise; a row with no key taking part (l == 0) is zeros, not NaN. */
    for (int64_t r = 0; r < nrows; r++) {
        const REAL l = w.row_sum[r];
        const REAL inv = l == 0 ? 0 : 1 / l;
        if (p->out_real) { /* partials to merge: rounded once, after the merge */
            REAL *dst = (REAL *)out_ + (row0 + r) * p->o_row;
            for (int64_t x = 0; x < Ev; x++) dst[x * p->o_col] = l == 0 ? 0 : w.acc[r * evp + x] * inv;
        } else {
            STORE *dst = out + (row0 + r) * p->o_row;
            for (int64_t x = 0; x < Ev; x++)
                dst[x * p->o_col] = FROM_REAL(l == 0 ? 0 : w.acc[r * evp + x] * inv);
        }
        /* logsumexp of the scaled, masked scores. */
        if (blk->lse)
            ((REAL *)blk->lse)[r] = l == 0 ? -(REAL)INFINITY : w.row_max[r] + (REAL)log((double)l);
    }
}

#undef STORE
#undef STORE_KIND
#undef STORE_KIND_F16
#undef STORE_KIND_BF16
#undef TO_REAL
#undef FROM_REAL
#undef PANEL_BUDGET
#undef LAZY_RESCALE
#undef LANES
#undef NR
#undef VEC
#undef UVEC
#undef EXP_MAGIC
#undef EXP_MAGIC_BITS
#undef EXP_MANT_BITS
#undef EXP_BIAS
#undef LOG2E
#undef EXP2_LO
#undef EXP_DEGREE
