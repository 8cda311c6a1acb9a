/*
 * bfloat16 products of the attention template (see attention_body.h and the
 * list of names in products_exact.h): S = Q K^T and O += P V as bfloat16 dot
 * products accumulated in float32, the online softmax in float32 as on every
 * other path, and P rounded to bfloat16 for P V (as FlashAttention does).
 * REAL is float.  The including file sets BF16_UNIT:
 *
 *   BF16_UNIT_DPBF16  VDPBF16PS (AVX512-BF16): C[r][n] += a0 b0 + a1 b1 for
 *                     one broadcast pair (a0, a1) of A and a vector of B pairs
 *   BF16_UNIT_AMX     AMX tiles: TDPBF16PS, C[16 x 16] += A[16 x 32] B[32 x 16]
 *
 * Both read one layout, pairs of bfloat16 along the summed dimension packed
 * into 32-bit words (Intel's "VNNI" layout):
 *   Q block  BLOCK_M rows of q_width bf16, zero past E (pairs along E)
 *   K^T      per tile, q_width / 2 rows of tile_cols words: row e2, column c
 *            holds (K[c][2 e2], K[c][2 e2 + 1])
 *   V        per tile, tile_cols / 2 rows of evp words: row c2, column x holds
 *            (V[2 c2][x], V[2 c2 + 1][x]), zero past the last key and past Ev
 *   P        BLOCK_M rows of BLOCK_N bf16: the weights, zero past the last key
 *            (softmax_step rounds them there, see store_weights; their
 *            exponential is weights_exp2, good to bfloat16's precision)
 * Rounding to bfloat16 is to nearest even (VCVTNE2PS2BF16); bfloat16 inputs
 * are packed bit for bit.
 */
#define BF16_UNIT_DPBF16 1
#define BF16_UNIT_AMX 2
_Static_assert(!KV_SCALED, "quantized K/V have exact products only");

#define PANEL uint16_t
#define DIRECT_BELOW 8 /* as the float32 micro-tile: decode rows stay exact */
#define WEIGHTS_ROUNDED 1
#if BF16_UNIT == BF16_UNIT_AMX
#define K_STEP 32 /* bf16 per tile row: the summed dimension goes in steps of 32 */
/* Whole tiles: the tile code has only run on whole key tiles, and a change
 * waits for a CPU with AMX to run it. */
#define RANGE_ROWS BLOCK_M
#define RANGE_COLS BLOCK_N
#else
#define K_STEP 2
/* As the exact products: each micro-tile row group computes only the
 * columns its rows can see. */
#define RANGE_ROWS MR
#define RANGE_COLS NR
#endif

static inline int64_t FN(q_width)(int64_t E) { return FN(round_up)(E, K_STEP); }

static size_t FN(kt_tile_elems)(const pyattn_problem *p)
{
    return pyattn_size_mul((size_t)FN(q_width)(p->E), (size_t)FN(tile_cols)(p));
}

static size_t FN(v_tile_elems)(const pyattn_problem *p)
{
    return pyattn_size_mul((size_t)FN(tile_cols)(p), (size_t)FN(round_up)(p->Ev, NR));
}

enum { FN(p_block_elems) = BLOCK_M * BLOCK_N };

/* Packed K^T from key column c on: a column is one word, a pair of bf16. */
static inline const uint16_t *FN(kt_column)(const uint16_t *kt, int64_t c) { return kt + 2 * c; }

/* x rounded to bfloat16 (to nearest even). */
static inline uint16_t FN(round_bf16)(float x)
{
    return (uint16_t)_mm_extract_epi16((__m128i)_mm_cvtneps_pbh(_mm_set_ss(x)), 0);
}

/* One element as bfloat16 bits: bfloat16 storage as it is, the others
 * rounded. */
static inline uint16_t FN(bf16_bits)(STORE x)
{
#if STORE_KIND == STORE_KIND_BF16
    return x;
#else
    return FN(round_bf16)(TO_REAL(x));
#endif
}

/* 32 contiguous elements as 32 bfloat16 (64 bytes, in order). */
static inline __m512i FN(load_bf16x32)(const STORE *src)
{
#if STORE_KIND == STORE_KIND_BF16
    return _mm512_loadu_si512(src);
#else
    const VEC lo = FN(vload_store)(src), hi = FN(vload_store)(src + LANES);
    return (__m512i)_mm512_cvtne2ps_pbh((__m512)hi, (__m512)lo);
#endif
}

/* The part of `scale` to fold into Q as it is packed, so that the scores need
 * no pass of their own: all of it where that rounds nothing more (float32
 * and float16 Q is rounded to bfloat16 anyway, and a power of two keeps
 * bfloat16 Q exact), and only |scale| <= 1, so that no q * scale overflows
 * where q . k * scale would not.  Otherwise 1, and the scores are scaled. */
static inline REAL FN(q_scale)(const pyattn_problem *p)
{
    int e;
    const double a = fabs(p->scale);
    const int exact = STORE_KIND != STORE_KIND_BF16 || frexp(a, &e) == 0.5;
    return a > 0 && a <= 1 && exact ? (REAL)p->scale : 1;
}

/* Elements [0, n) of a row (element stride `stride`) times mul, as
 * bfloat16, zero from n up to `width`.  Returns 0 when a product fell below
 * float's normal range: the bfloat16 units read it as 0, where q . k * scale
 * may be normal (tiny q against huge k), so Q must be packed unscaled. */
static int FN(row_bf16)(const STORE *src, int64_t stride, int64_t n, int64_t width, REAL mul,
                        uint16_t *dst)
{
    int64_t x = 0;
    int normal = 1;
    if (mul == 1) {
        if (stride == 1)
            for (; x + 2 * LANES <= n; x += 2 * LANES)
                _mm512_storeu_si512(dst + x, FN(load_bf16x32)(src + x));
        for (; x < n; x++) dst[x] = FN(bf16_bits)(src[x * stride]);
    } else {
        const __m512 vmul = _mm512_set1_ps(mul), tiny = _mm512_set1_ps(FLT_MIN);
        __mmask16 flushed = 0;
        if (stride == 1)
            for (; x + LANES <= n; x += LANES) {
                const __m512 y = _mm512_mul_ps((__m512)FN(vload_store)(src + x), vmul);
                const __m512 ay = _mm512_abs_ps(y);
                flushed |= _mm512_cmp_ps_mask(ay, tiny, _CMP_LT_OQ) &
                           _mm512_cmp_ps_mask(ay, _mm512_setzero_ps(), _CMP_NEQ_OQ);
                _mm256_storeu_si256((__m256i *)(dst + x), (__m256i)_mm512_cvtneps_pbh(y));
            }
        normal = flushed == 0;
        for (; x < n; x++) {
            const float y = TO_REAL(src[x * stride]) * mul;
            normal &= !(y != 0 && fabsf(y) < FLT_MIN);
            dst[x] = FN(round_bf16)(y);
        }
    }
    for (; x < width; x++) dst[x] = 0;
    return normal;
}

/* Q rows [row0, row0 + nrows) as bfloat16, then zero rows; returns the
 * factor of `scale` folded in (see q_scale): 1 when a row had to go
 * unscaled. */
static REAL FN(pack_q)(const pyattn_problem *p, const STORE *q, int64_t row0, int64_t nrows,
                       int64_t rows_pad, uint16_t *dst)
{
    const int64_t E = p->E, width = FN(q_width)(E);
    REAL mul = FN(q_scale)(p);
    for (int64_t r = 0; r < nrows; r++)
        if (!FN(row_bf16)(q + (row0 + r) * p->q_row, p->q_col, E, width, mul, dst + r * width)) {
            mul = 1, r = -1; /* start again, unscaled */
        }
    memset(dst + nrows * width, 0, sizeof(uint16_t) * (size_t)((rows_pad - nrows) * width));
    return mul;
}

/* Pack keys [j0, j0 + nb) in the pair layout (see the top). */
static void FN(pack_tile)(const pyattn_problem *p, const pyattn_block *blk, const KV *k,
                          const KV *v, int64_t j0, int64_t nb, uint16_t *kt_, uint16_t *vp_)
{
    (void)blk; /* no scales: quantized K/V have no bfloat16 products */
    const int64_t E = p->E, Ev = p->Ev, evp = FN(round_up)(Ev, NR);
    const int64_t pairs = FN(q_width)(E) / 2, cols_pad = FN(round_up)(nb, NR);
    const int64_t ld = FN(tile_cols)(p);
    uint32_t *kt = (uint32_t *)kt_, *vp = (uint32_t *)vp_;
    const STORE *src = k + j0 * p->k_row;
    /* K^T: each key row's pairs are a 32-bit row; LANES x LANES blocks of
     * those are transposed in registers (the float transpose moves bits). */
    const int64_t c_full = p->k_col == 1 ? nb - nb % LANES : 0;
    const int64_t e2_full = p->k_col == 1 ? E / (2 * LANES) * LANES : 0;
    for (int64_t c0 = 0; c0 < c_full; c0 += LANES)
        for (int64_t e2 = 0; e2 < e2_full; e2 += LANES) {
            VEC r[LANES];
            for (int i = 0; i < LANES; i++)
                r[i] = (VEC)FN(load_bf16x32)(src + (c0 + i) * p->k_row + 2 * e2);
            FN(transpose)(r);
            for (int i = 0; i < LANES; i++) memcpy(kt + (e2 + i) * ld + c0, &r[i], sizeof r[i]);
        }
    for (int64_t e2 = 0; e2 < pairs; e2++) {
        uint32_t *dst = kt + e2 * ld;
        const int64_t e = 2 * e2;
        for (int64_t c = e2 < e2_full ? c_full : 0; c < nb; c++) {
            const STORE *row = src + c * p->k_row;
            const uint32_t lo = e < E ? FN(bf16_bits)(row[e * p->k_col]) : 0;
            const uint32_t hi = e + 1 < E ? FN(bf16_bits)(row[(e + 1) * p->k_col]) : 0;
            dst[c] = lo | hi << 16;
        }
        for (int64_t c = nb; c < cols_pad; c++) dst[c] = 0;
    }
    /* V: rows 2 c2 and 2 c2 + 1 interleaved, 32 elements of each at a time. */
    const __m512i lo_pairs = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10,
                                              41, 9, 40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3,
                                              34, 2, 33, 1, 32, 0);
    const __m512i hi_pairs = _mm512_add_epi16(lo_pairs, _mm512_set1_epi16(16));
    const int64_t x_full = p->v_col == 1 ? Ev - Ev % (2 * LANES) : 0;
    for (int64_t c = 0; c < cols_pad; c += 2) {
        uint32_t *dst = vp + (c / 2) * evp;
        const STORE *a = v + (j0 + c) * p->v_row, *b = a + p->v_row;
        const int b_valid = c + 1 < nb;
        if (c >= nb) {
            memset(dst, 0, sizeof(uint32_t) * (size_t)evp);
            continue;
        }
        int64_t x = 0;
        for (; x < x_full; x += 2 * LANES) {
            const __m512i ra = FN(load_bf16x32)(a + x);
            const __m512i rb = b_valid ? FN(load_bf16x32)(b + x) : _mm512_setzero_si512();
            _mm512_storeu_si512(dst + x, _mm512_permutex2var_epi16(ra, lo_pairs, rb));
            _mm512_storeu_si512(dst + x + LANES, _mm512_permutex2var_epi16(ra, hi_pairs, rb));
        }
        for (; x < Ev; x++) {
            const uint32_t hi = b_valid ? FN(bf16_bits)(b[x * p->v_col]) : 0;
            dst[x] = FN(bf16_bits)(a[x * p->v_col]) | hi << 16;
        }
        for (; x < evp; x++) dst[x] = 0;
    }
}

/* 2^x for weights about to be rounded to bfloat16: degree-5 Taylor on the
 * fraction (relative error < 3e-6, against bfloat16's 2^-9) and VSCALEFPS
 * for the power of two, which flushes what is below float's range to 0.
 * Half the instructions of vexp2, which the softmax is bound by here. */
static inline VEC FN(weights_exp2)(VEC x)
{
    /* -inf (masked) becomes 2^-200 = 0; max keeps a NaN x (its second operand). */
    const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-200.0f), (__m512)x);
    const __m512 n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_sub_ps(xc, n);
    __m512 poly = _mm512_set1_ps(0.0013333558146428441f);
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(0.009618129107628477f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(0.055504108664821576f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(0.2402265069591007f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(0.6931471805599453f));
    poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(1.0f));
    return (VEC)_mm512_scalef_ps(poly, n);
}

/* The tiled path's weights (rounded != NULL) as bfloat16, for value_product;
 * the direct path's stay float32 in the scores.  The softmax sums them
 * unrounded, so that the logsumexp keeps float32's precision. */
static inline void FN(store_weights)(REAL *s, uint16_t *rounded, int64_t c, VEC p)
{
    if (rounded)
        _mm256_storeu_si256((__m256i *)(rounded + c), (__m256i)_mm512_cvtneps_pbh((__m512)p));
    else
        FN(vstore)(s + c, p);
}

#if BF16_UNIT == BF16_UNIT_AMX
/* Every tile register is 16 rows of 64 bytes: C tiles 0-3 (a 32 x 32 block
 * of float32), A tiles 4-5 (32 rows x 32 bf16), B tiles 6-7 (32 x 32 in
 * pairs).  The configuration is per thread: loaded before a block's
 * products, released after. */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} FN(tile_config);

static inline void FN(products_begin)(void)
{
    FN(tile_config) cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
}

static inline void FN(products_end)(void) { _tile_release(); }

/* C[32 x 32] (row stride ldc floats) = (accumulate ? C : 0) + A B over K
 * (a multiple of 32): A rows at lda bf16, B as K / 2 pair rows at ldb words. */
static inline void FN(tile_block)(int64_t K, const uint16_t *A, int64_t lda, const uint32_t *B,
                                  int64_t ldb, REAL *C, int64_t ldc, int accumulate)
{
    const size_t sa = (size_t)lda * 2, sb = (size_t)ldb * 4, sc = (size_t)ldc * 4;
    if (accumulate) {
        _tile_loadd(0, C, sc);
        _tile_loadd(1, C + 16, sc);
        _tile_loadd(2, C + 16 * ldc, sc);
        _tile_loadd(3, C + 16 * ldc + 16, sc);
    } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int64_t k0 = 0; k0 < K; k0 += 32) {
        _tile_loadd(4, A + k0, sa);
        _tile_loadd(5, A + 16 * lda + k0, sa);
        _tile_loadd(6, B + (k0 / 2) * ldb, sb);
        _tile_loadd(7, B + (k0 / 2) * ldb + 16, sb);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, C, sc);
    _tile_stored(1, C + 16, sc);
    _tile_stored(2, C + 16 * ldc, sc);
    _tile_stored(3, C + 16 * ldc + 16, sc);
}

/* C[rows x cols] (+)= A B: rows a multiple of MR (32), cols of NR (32). */
static void FN(bf16_gemm)(int64_t rows, int64_t cols, int64_t K, const uint16_t *A,
                          int64_t lda, const uint32_t *B, int64_t ldb, REAL *C, int64_t ldc,
                          int accumulate)
{
    for (int64_t r0 = 0; r0 < rows; r0 += 32)
        for (int64_t c0 = 0; c0 < cols; c0 += 32)
            FN(tile_block)(K, A + r0 * lda, lda, B + c0, ldb, C + r0 * ldc + c0, ldc, accumulate);
}
#else
static inline void FN(products_begin)(void) {}
static inline void FN(products_end)(void) {}

/* C[MR x NR] (+)= A B over K (even): one broadcast A pair against NV vectors
 * of B pairs per step, the MR x NV accumulators in registers. */
static inline void FN(dp_micro_kernel)(int64_t K, const uint16_t *A, int64_t lda,
                                       const uint32_t *B, int64_t ldb, REAL *C, int64_t ldc,
                                       int accumulate)
{
    __m512 acc[MR][NV];
    PA_UNROLLED for (int r = 0; r < MR; r++)
        PA_UNROLLED for (int j = 0; j < NV; j++)
            acc[r][j] = accumulate ? _mm512_loadu_ps(C + r * ldc + j * LANES) : _mm512_setzero_ps();
    for (int64_t k2 = 0; k2 < K / 2; k2++) {
        __m512bh b[NV];
        PA_UNROLLED for (int j = 0; j < NV; j++)
            b[j] = (__m512bh)_mm512_loadu_si512(B + k2 * ldb + j * LANES);
        PA_UNROLLED for (int r = 0; r < MR; r++) {
            uint32_t pair;
            memcpy(&pair, A + r * lda + 2 * k2, sizeof pair);
            const __m512bh a = (__m512bh)_mm512_set1_epi32((int)pair);
            PA_UNROLLED for (int j = 0; j < NV; j++)
                acc[r][j] = _mm512_dpbf16_ps(acc[r][j], a, b[j]);
        }
    }
    PA_UNROLLED for (int r = 0; r < MR; r++)
        PA_UNROLLED for (int j = 0; j < NV; j++)
            _mm512_storeu_ps(C + r * ldc + j * LANES, acc[r][j]);
}

static void FN(bf16_gemm)(int64_t rows, int64_t cols, int64_t K, const uint16_t *A,
                          int64_t lda, const uint32_t *B, int64_t ldb, REAL *C, int64_t ldc,
                          int accumulate)
{
    for (int64_t r0 = 0; r0 < rows; r0 += MR)
        for (int64_t c0 = 0; c0 < cols; c0 += NR)
            FN(dp_micro_kernel)(K, A + r0 * lda, lda, B + c0, ldb, C + r0 * ldc + c0, ldc,
                                accumulate);
}
#endif

/* scores[rows x cols] = scale * Q K^T (row stride BLOCK_N; K^T's is
 * tile_cols), `scale` being what pack_q left out of Q, applied to the float32
 * scores. */
static void FN(score_product)(const pyattn_problem *p, int64_t rows, int64_t cols,
                              const uint16_t *q, const uint16_t *kt, REAL scale_left,
                              REAL *scores)
{
    const int64_t width = FN(q_width)(p->E);
    FN(bf16_gemm)(rows, cols, width, q, width, (const uint32_t *)kt, FN(tile_cols)(p), scores,
                  BLOCK_N, 0);
    if (scale_left == 1) return;
    const VEC scale = FN(vsplat)(scale_left);
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c += LANES)
            FN(vstore)(scores + r * BLOCK_N + c, FN(vload)(scores + r * BLOCK_N + c) * scale);
}

/* V is always packed: its pairs of key rows are interleaved. */
static inline int FN(v_in_place)(const pyattn_problem *p)
{
    (void)p;
    return 0;
}

/* acc[rows x evp] += P[rows x nb] V, P the weights softmax_step rounded into
 * p_block (zero past the last key, up to a multiple of NR); V packed (ldv is
 * the exact products' and unused here). */
static void FN(value_product)(int64_t rows, int64_t nb, int64_t evp, const REAL *scores,
                              const uint16_t *vp, int64_t ldv, REAL *acc,
                              const uint16_t *p_block)
{
    (void)scores, (void)ldv;
    const int64_t keys = FN(round_up)(nb, K_STEP);
    FN(bf16_gemm)(rows, evp, keys, p_block, BLOCK_N, (const uint32_t *)vp, evp, acc, evp, 1);
}

#undef K_STEP
