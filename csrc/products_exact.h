/*
 * Exact products of the attention template (see attention_body.h): S = Q K^T
 * and O += P V in the compute type REAL, on the register micro-kernel.
 *
 * Every products header gives the template the same few names:
 *   PANEL            element type of the packed Q block and K/V panels
 *   DIRECT_BELOW     blocks of fewer query rows take the direct (decode) path
 *   q_width(E)       PANEL elements per packed Q row
 *   kt_tile_elems, v_tile_elems   PANEL elements of one packed key tile
 *   p_block_elems    elements of an extra P buffer (0: none)
 *   WEIGHTS_ROUNDED  1: the tiled path's weights go to that buffer, rounded
 *   weights_exp2     with WEIGHTS_ROUNDED, 2^x for the weights that are rounded
 *   store_weights    one vector of weights, where the products read them
 *   pack_q, pack_tile             the packing (pack_q returns the factor
 *                    of `scale` it folded into Q)
 *   v_in_place       whether value_product reads V rows where they lie (at
 *                    the row stride v_row) instead of a packed copy
 *   kt_column(kt, c) packed K^T from key column c of its tile on
 *   score_product    scores = scale * Q K^T for whole MR x NR micro-tiles
 *   value_product    acc += P V, P being the softmax weights in the scores
 *   products_begin/end            per-call set-up of the matrix unit
 *   RANGE_ROWS, RANGE_COLS        the grain of the products' calls: rows go
 *                    in groups of RANGE_ROWS, each group computing only the
 *                    columns its windows can see, in whole RANGE_COLS
 */
#define PANEL REAL
#define DIRECT_BELOW MR
#define WEIGHTS_ROUNDED 0
/* Each micro-tile row group skips the columns it cannot see (the causal
 * diagonal's upper triangle, a window's far side). */
#define RANGE_ROWS MR
#define RANGE_COLS NR

/* C[MR x NR] += A[MR x K] * B[K x NR] when accumulating, else
 * C = alpha * A * B; rows of A at stride lda, of B at ldb, of C at ldc.  The
 * MR x NV accumulators live in registers for the whole K loop. */
static inline void FN(micro_kernel)(int64_t K, const REAL *A, int64_t lda,
                                    const REAL *B, int64_t ldb, REAL *C,
                                    int64_t ldc, int accumulate, REAL alpha)
{
    VEC acc[MR][NV];
    PA_UNROLLED for (int r = 0; r < MR; r++)
        PA_UNROLLED for (int j = 0; j < NV; j++)
            acc[r][j] = accumulate ? FN(vload)(C + r * ldc + j * LANES) : FN(vsplat)(0);
    for (int64_t kk = 0; kk < K; kk++) {
        VEC b[NV];
        PA_UNROLLED for (int j = 0; j < NV; j++) b[j] = FN(vload)(B + kk * ldb + j * LANES);
        PA_UNROLLED for (int r = 0; r < MR; r++) {
            const VEC a = FN(vsplat)(A[r * lda + kk]);
            PA_UNROLLED for (int j = 0; j < NV; j++) acc[r][j] += a * b[j];
        }
    }
    const VEC valpha = FN(vsplat)(accumulate ? 1 : alpha);
    PA_UNROLLED for (int r = 0; r < MR; r++)
        PA_UNROLLED for (int j = 0; j < NV; j++)
            FN(vstore)(C + r * ldc + j * LANES, acc[r][j] * valpha);
}

/* C[rows x cols] += A[rows x K] * B[K x cols] (or C = alpha A B), rows a
 * multiple of MR and cols of NR: the tiling loop around the micro-kernel. */
static void FN(tile_gemm)(int64_t rows, int64_t cols, int64_t K, const REAL *A,
                          int64_t lda, const REAL *B, int64_t ldb, REAL *C,
                          int64_t ldc, int accumulate, REAL alpha)
{
    for (int64_t r0 = 0; r0 < rows; r0 += MR)
        for (int64_t c0 = 0; c0 < cols; c0 += NR)
            FN(micro_kernel)(K, A + r0 * lda, lda, B + c0, ldb, C + r0 * ldc + c0,
                             ldc, accumulate, alpha);
}

static inline int64_t FN(q_width)(int64_t E) { return E; }

static size_t FN(kt_tile_elems)(const pyattn_problem *p)
{
    return pyattn_size_mul((size_t)p->E, (size_t)FN(tile_cols)(p));
}

static size_t FN(v_tile_elems)(const pyattn_problem *p)
{
    return pyattn_size_mul((size_t)FN(tile_cols)(p), (size_t)FN(round_up)(p->Ev, NR));
}

enum { FN(p_block_elems) = 0 };

static inline const REAL *FN(kt_column)(const REAL *kt, int64_t c) { return kt + c; }

/* Weights stay in the scores, where value_product reads them. */
static inline void FN(store_weights)(REAL *s, PANEL *rounded, int64_t c, VEC p)
{
    (void)rounded;
    FN(vstore)(s + c, p);
}

/* Q rows [row0, row0 + nrows) as REAL, then zero rows up to rows_pad;
 * unscaled (the factor of `scale` folded in is 1: the micro-kernel scales). */
static REAL FN(pack_q)(const pyattn_problem *p, const STORE *q, int64_t row0, int64_t nrows,
                       int64_t rows_pad, REAL *dst)
{
    const int64_t E = p->E;
    FN(load_q_rows)(p, q, row0, nrows, dst);
    memset(dst + nrows * E, 0, sizeof(REAL) * (size_t)((rows_pad - nrows) * E));
    return 1;
}

/* Value rows of REAL whose elements are contiguous and fill whole NR
 * vectors: the packed copy would hold the same numbers, so the products read
 * them in place (for few query rows the copy cost as much as the products).
 * Quantized rows must be dequantized, so they are always packed. */
static inline int FN(v_in_place)(const pyattn_problem *p)
{
    return !KV_SCALED && STORE_KIND == STORE_KIND_NATIVE && p->v_col == 1 && p->Ev % NR == 0;
}

/* Pack keys [j0, j0 + nb) as K^T (E x tile_cols, zero columns past nb) and,
 * unless read in place, V (nb x evp, zero columns past Ev), dequantized when
 * they are quantized. */
static void FN(pack_tile)(const pyattn_problem *p, const pyattn_block *blk, const KV *k,
                          const KV *v, int64_t j0, int64_t nb, REAL *kt, REAL *vp)
{
    const int64_t E = p->E, Ev = p->Ev, evp = FN(round_up)(Ev, NR);
    const int64_t cols_pad = FN(round_up)(nb, NR), ld = FN(tile_cols)(p);
    const KV *src = k + j0 * p->k_row;
    const void *ks = FN(scale_row)(blk->k_scales, p->ks_row, j0);
    /* Contiguous key rows: LANES x LANES blocks transposed in registers.
     * What is left (and strided rows) goes element by element, rows of K^T
     * written contiguously and K read strided: half the cost of the
     * opposite order. */
    const int64_t c_full = p->k_col == 1 ? nb - nb % LANES : 0;
    const int64_t e_full = p->k_col == 1 ? E - E % LANES : 0;
    for (int64_t c0 = 0; c0 < c_full; c0 += LANES)
        for (int64_t e0 = 0; e0 < e_full; e0 += LANES) {
            VEC r[LANES];
            const int64_t g = FN(group_of)(e0, p->k_group);
            for (int i = 0; i < LANES; i++)
                r[i] = FN(vload_kv)(src + (c0 + i) * p->k_row + e0,
                                    FN(kv_scale)(FN(scale_row)(ks, p->ks_row, c0 + i), g));
            FN(transpose)(r);
            for (int i = 0; i < LANES; i++) FN(vstore)(kt + (e0 + i) * ld + c0, r[i]);
        }
    for (int64_t e = 0; e < E; e++) {
        REAL *dst = kt + e * ld;
        const int64_t g = FN(group_of)(e, p->k_group);
        for (int64_t c = e < e_full ? c_full : 0; c < nb; c++)
            dst[c] = FN(kv_to_real)(src[c * p->k_row + e * p->k_col],
                                    FN(kv_scale)(FN(scale_row)(ks, p->ks_row, c), g));
        for (int64_t c = nb; c < cols_pad; c++) dst[c] = 0;
    }
    if (FN(v_in_place)(p)) return;
    for (int64_t c = 0; c < nb; c++) {
        FN(load_kv_row)(v + (j0 + c) * p->v_row, p->v_col, Ev,
                        FN(scale_row)(blk->v_scales, p->vs_row, j0 + c), p->v_group, vp + c * evp);
        for (int64_t x = Ev; x < evp; x++) vp[c * evp + x] = 0;
    }
}

/* scores[rows x cols] = scale * Q K^T (row stride BLOCK_N; K^T's is
 * tile_cols), `scale` being what pack_q left out of Q. */
static void FN(score_product)(const pyattn_problem *p, int64_t rows, int64_t cols,
                              const REAL *q, const REAL *kt, REAL scale_left, REAL *scores)
{
    FN(tile_gemm)(rows, cols, p->E, q, p->E, kt, FN(tile_cols)(p), scores, BLOCK_N, 0,
                  scale_left);
}

/* acc[rows x evp] += P[rows x nb] V (P in the scores, row stride BLOCK_N;
 * V's rows at stride ldv). */
static void FN(value_product)(int64_t rows, int64_t nb, int64_t evp, const REAL *scores,
                              const REAL *vp, int64_t ldv, REAL *acc, const PANEL *p_block)
{
    (void)p_block;
    FN(tile_gemm)(rows, evp, nb, scores, BLOCK_N, vp, ldv, acc, evp, 1, 1);
}

static inline void FN(products_begin)(void) {}
static inline void FN(products_end)(void) {}
