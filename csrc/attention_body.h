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
 *   KV        optional: the element type of k and v when it is not STORE;
 *             KV_SCALED 1 for quantized rows with float16 scales per group
 *             (q and out are then REAL), int8 or, with KV_FP8 1,
 *             float8_e4m3fn bits, dequantized as they are loaded (simd.h's
 *             vload_kv).
 *
 * Vectors are GCC vector extensions, so the same text compiles to SSE2, AVX2
 * or AVX-512 depending on the target the including file selects.
 *
 * Structure, the BLIS way:
 *   products      S = scale Q K^T (K = E) and O += P V (K = keys) on packed
 *                 panels, from a products header: products_exact.h (the
 *                 MR x NR register micro-kernel in REAL) or, with
 *                 BF16_PRODUCTS, products_bf16.h (bfloat16 products on
 *                 AVX512-BF16 or AMX tiles, float32 accumulation).
 *   macro-kernel  attend_tiled(): walks the key tiles of K^T / V panels
 *                 (packed once per head and thread, see workspace), masks,
 *                 and keeps the online softmax state per query row.
 *   decode path   attend_direct(): fewer than DIRECT_BELOW query rows read K
 *                 and V in place, one dot product per score, always exact.
 * attend() packs the Q block, picks the path, and normalises.  The L x S
 * score matrix never exists: only one BLOCK_M x BLOCK_N tile does.
 *
 * The template's parts: simd.h (vectors, loads, 2^x, reductions),
 * micro_kernel.h (the direct path's register kernels), the products header,
 * score_modifiers.h (windows, soft-capping, ALiBi, masks, sinks) and
 * workspace.h (the per-thread scratch); this file holds the online softmax
 * and the two paths.
 */
#include <float.h>
#include <math.h>
#include <string.h>

#include "simd.h"
#include "micro_kernel.h"
#include "score_modifiers.h"

/* The regions that grow with E and Ev hold what the problem can use, not
 * whole blocks: a block's query rows (at most BLOCK_M, whole micro-tiles) and
 * a key tile's columns (at most BLOCK_N, whole NR; the row stride of packed
 * K^T).  A zero-stride view may claim E = 2^22 features with L = S = 1, and
 * BLOCK_M x E would then be gigabytes.  A set that defines BF16_WHOLE_BLOCKS
 * keeps whole blocks for its bfloat16 products (see kernels_amx.c). */
#if defined(BF16_PRODUCTS) && BF16_PRODUCTS && defined(BF16_WHOLE_BLOCKS)
static inline int64_t FN(block_rows)(const pyattn_problem *p) { (void)p; return BLOCK_M; }
static inline int64_t FN(tile_cols)(const pyattn_problem *p) { (void)p; return BLOCK_N; }
#else
static inline int64_t FN(block_rows)(const pyattn_problem *p)
{
    return p->L < BLOCK_M ? FN(round_up)(p->L, MR) : BLOCK_M;
}

static inline int64_t FN(tile_cols)(const pyattn_problem *p)
{
    return p->S < BLOCK_N ? FN(round_up)(p->S, NR) : BLOCK_N;
}
#endif

#if defined(BF16_PRODUCTS) && BF16_PRODUCTS
#include "products_bf16.h"
#else
#include "products_exact.h"
#endif

#include "workspace.h"

/* The running max moves only when a tile beats it by more than this: weights
 * then stay below e^LAZY_RESCALE = 2^8, far from overflow, and most tiles
 * skip both the exp of the correction and the rescaling of the output.  Any
 * shift gives the same softmax; this one is just cheaper. */
#define LAZY_RESCALE ((REAL)5.545177444479562) /* 8 ln 2 */

/* One online-softmax step for one query row and one key tile: the scores s
 * become unnormalised weights e^(s - m), stored where the products read
 * them (see store_weights: in s, or rounded into `rounded`, by an exp just
 * as exact as the rounding: weights_exp2), and when the
 * running max m moves, the sum l and the output row are rescaled by
 * e^(m_old - m_new). */
static void FN(softmax_step)(REAL *s, PANEL *rounded, int64_t cols_pad, REAL *m, REAL *l,
                             REAL *o_row, int64_t evp)
{
    /* Tile max; a row that is masked so far keeps max = -inf.  Four running
     * maxima, so that the loads are not serialised by vmax's latency. */
    VEC vm[4];
    for (int i = 0; i < 4; i++) vm[i] = FN(vsplat)(-(REAL)INFINITY);
    int64_t c = 0;
    for (; c + 4 * LANES <= cols_pad; c += 4 * LANES)
        for (int i = 0; i < 4; i++) vm[i] = FN(vmax)(FN(vload)(s + c + i * LANES), vm[i]);
    for (; c < cols_pad; c += LANES) vm[0] = FN(vmax)(FN(vload)(s + c), vm[0]);
    const REAL tile_max = FN(hmax)(FN(vmax)(FN(vmax)(vm[0], vm[1]), FN(vmax)(vm[2], vm[3])));
    const REAL m_new = tile_max > *m + LAZY_RESCALE ? tile_max : *m;
    /* Shift by 0 while everything is masked, so 2^(-inf - shift) = 0, not NaN. */
    const REAL shift = m_new == -(REAL)INFINITY ? 0 : m_new;
    /* p = e^(s - shift) and its sum; the difference is never +inf (s <= its
     * tile max), and -inf when it overflows, which is the limit. */
    const VEC vshift = FN(vsplat)(shift), log2e = FN(vsplat)(LOG2E);
    VEC vsum[2] = {FN(vsplat)(0), FN(vsplat)(0)}; /* two chains of adds */
    for (c = 0; c < cols_pad; c += LANES) {
        const VEC x = (FN(vload)(s + c) - vshift) * log2e;
#if WEIGHTS_ROUNDED
        const VEC pv = rounded ? FN(weights_exp2)(x) : FN(vexp2)(x);
#else
        const VEC pv = FN(vexp2)(x);
#endif
        FN(store_weights)(s, rounded, c, pv);
        vsum[(c / LANES) & 1] += pv;
    }
    if (m_new != *m) {
        /* The old state weighs e^(m_old - shift): 0 for an empty past. */
        const REAL alpha = FN(vexp2)(FN(vsplat)((*m - shift) * LOG2E))[0];
        const VEC va = FN(vsplat)(alpha);
        for (int64_t c = 0; c < evp; c += LANES) FN(vstore)(o_row + c, FN(vload)(o_row + c) * va);
        *l *= alpha;
        *m = m_new;
    }
    *l += FN(hsum)(vsum[0] + vsum[1]);
}

/*
 * Few query rows (decode): no transposed panels and no padding to MR rows.
 * Key and value rows are read where they lie (copied only when their own
 * elements are not contiguous), each score is one dot product, and P V is
 * accumulated key by key, for up to ROW_GROUP rows per load of a key or value
 * row (micro_kernel.h's direct_scores and direct_values).  Same masking and
 * online softmax as the tiled path.
 */
static void FN(attend_direct)(const pyattn_problem *p, const KV *k, const KV *v,
                              const void *mask, const pyattn_block *blk, const REAL *qs,
                              void *kbuf, void *vbuf, REAL *sc, REAL *acc, REAL *mrow,
                              REAL *lrow)
{
    const int64_t E = p->E, Ev = p->Ev, evp = FN(round_up)(Ev, NR);
    const int64_t row0 = blk->row0, nrows = blk->nrows;
    const VEC vscale = FN(vsplat)((REAL)p->scale);
    int64_t kv_begin, kv_end;
    FN(key_range)(p, blk, &kv_begin, &kv_end);
    for (int64_t j0 = kv_begin; j0 < kv_end; j0 += BLOCK_N) {
        const int64_t nb = kv_end - j0 < BLOCK_N ? kv_end - j0 : BLOCK_N;
        const int64_t cols_pad = FN(round_up)(nb, LANES);
        /* Rows are read in place when their elements are contiguous, else
         * gathered into the (otherwise unused) panels first; their scales
         * stay where they are. */
        const KV *kr = k + j0 * p->k_row, *vr = v + j0 * p->v_row;
        const void *ks = FN(scale_row)(blk->k_scales, p->ks_row, j0);
        const void *vs = FN(scale_row)(blk->v_scales, p->vs_row, j0);
        int64_t k_stride = p->k_row, v_stride = p->v_row;
        if (p->k_col != 1) {
            KV *kb = (KV *)kbuf;
            for (int64_t c = 0; c < nb; c++)
                for (int64_t e = 0; e < E; e++) kb[c * E + e] = kr[c * p->k_row + e * p->k_col];
            kr = kb, k_stride = E;
        }
        if (p->v_col != 1) {
            KV *vb = (KV *)vbuf;
            for (int64_t c = 0; c < nb; c++)
                for (int64_t x = 0; x < Ev; x++) vb[c * Ev + x] = vr[c * p->v_row + x * p->v_col];
            vr = vb, v_stride = Ev;
        }
        FN(direct_scores)(p, qs, nrows, kr, k_stride, ks, vr, v_stride, nb, sc);
        for (int64_t r = 0; r < nrows; r++) {
            REAL *s = sc + r * BLOCK_N;
            for (int64_t c = nb; c < cols_pad; c++) s[c] = 0; /* read by softcap_row */
            for (int64_t c = 0; c < cols_pad; c += LANES) FN(vstore)(s + c, FN(vload)(s + c) * vscale);
            if (FN(row_needs_finish)(p, blk, row0 + r, j0, nb, cols_pad))
                FN(finish_row)(p, blk, mask, s, row0 + r, j0, nb, cols_pad);
            FN(softmax_step)(s, NULL, cols_pad, mrow + r, lrow + r, acc + r * evp, evp);
        }
        FN(direct_values)(p, sc, nrows, vr, v_stride, vs, nb, acc);
    }
}

/* The columns [*c0, *c1) of the tile [j0, j0 + nb) that rows [r, r + n) of
 * the block can see, widened to whole RANGE_COLS (and never past the padded
 * tile); 0 when they see none of it. */
static int FN(group_columns)(const pyattn_problem *p, const pyattn_block *blk, int64_t r,
                             int64_t n, int64_t j0, int64_t nb, int64_t *c0, int64_t *c1)
{
    const int64_t cols_pad = FN(round_up)(nb, NR);
    /* The first row sees the lowest keys, the last one the highest. */
    const int64_t lo = FN(row_lo)(p, blk, blk->row0 + r) - j0;
    const int64_t hi = FN(row_hi)(p, blk, blk->row0 + r + n - 1) - j0;
    if (hi <= 0 || lo >= nb) return 0;
    *c0 = lo > 0 ? lo / RANGE_COLS * RANGE_COLS : 0;
    *c1 = hi < nb ? FN(round_up)(hi, RANGE_COLS) : cols_pad;
    if (*c1 > cols_pad) *c1 = cols_pad;
    return 1;
}

/* A row group of one key tile and the columns it computes (c0 == c1: none). */
typedef struct {
    int64_t r, n, c0, c1;
} FN(group);

#define MAX_GROUPS ((BLOCK_M + RANGE_ROWS - 1) / RANGE_ROWS)

/* Scores of one key tile for the block's rows, finished (see finish_row) in
 * w->scores, group by group: groups[0 .. return value) say which rows and
 * columns hold them (whole MR groups; groups whose windows miss the tile are
 * left out: causality hides the tile from early rows, a sliding window from
 * late ones).  *vp points at the tile's V, packed or in place (see
 * v_in_place). */
static int FN(tile_scores)(const pyattn_problem *p, const KV *k, const KV *v,
                           const void *mask, const pyattn_block *blk, int64_t rows_pad,
                           const FN(workspace) *w, int64_t j0, int64_t nb, const PANEL **vp,
                           FN(group) *groups)
{
    const int64_t row0 = blk->row0, nrows = blk->nrows;
    /* Rows r see the tile iff row_hi(r) > j0 and row_lo(r) < j0 + nb. */
    int64_t first = 0, last = nrows;
    if (p->window_right >= 0) first = j0 - blk->diag - p->window_right - row0;
    if (p->window_left >= 0) last = j0 + nb - blk->diag + p->window_left - row0;
    first = first > 0 ? first / MR * MR : 0;
    last = last < nrows ? FN(round_up)(last, MR) : rows_pad;
    if (last <= first) return 0;

    const PANEL *kt = w->kt_panel;
    *vp = w->v_panel;
    if (w->whole_head) {
        const size_t tile = (size_t)(j0 / BLOCK_N);
        kt += tile * FN(kt_tile_elems)(p), *vp += tile * FN(v_tile_elems)(p);
    } else {
        FN(pack_tile)(p, blk, k, v, j0, nb, w->kt_panel, w->v_panel);
    }
    if (FN(v_in_place)(p)) *vp = (const PANEL *)(v + j0 * p->v_row);
    int count = 0;
    for (int64_t r = first; r < last; r += RANGE_ROWS) {
        FN(group) g = {r, last - r < RANGE_ROWS ? last - r : RANGE_ROWS, 0, 0};
        if (!FN(group_columns)(p, blk, g.r, g.n, j0, nb, &g.c0, &g.c1)) continue;
        groups[count++] = g;
        FN(score_product)(p, g.n, g.c1 - g.c0, w->q_block + g.r * FN(q_width)(p->E),
                          FN(kt_column)(kt, g.c0), w->scale_left, w->scores + g.r * BLOCK_N + g.c0);
        /* The group's columns are a narrower tile starting at key j0 + c0. */
        const int64_t keys = (nb < g.c1 ? nb : g.c1) - g.c0;
        for (int64_t i = g.r; i < g.r + g.n && i < nrows; i++)
            if (FN(row_needs_finish)(p, blk, row0 + i, j0 + g.c0, keys, g.c1 - g.c0))
                FN(finish_row)(p, blk, mask, w->scores + i * BLOCK_N + g.c0, row0 + i,
                               j0 + g.c0, keys, g.c1 - g.c0);
    }
    return count;
}

/* One row group of a tile into the online softmax, then O += P V. */
static void FN(accumulate_group)(const pyattn_problem *p, const pyattn_block *blk,
                                 const FN(workspace) *w, const FN(group) *g, int64_t nb,
                                 const PANEL *vp, int64_t ldv)
{
    const int64_t evp = FN(round_up)(p->Ev, NR);
    REAL *sc = w->scores + g->r * BLOCK_N + g->c0;
    PANEL *rounded = w->p_block + g->r * BLOCK_N + g->c0;
    for (int64_t i = 0; i < g->n && g->r + i < blk->nrows; i++)
        FN(softmax_step)(sc + i * BLOCK_N, WEIGHTS_ROUNDED ? rounded + i * BLOCK_N : NULL,
                         g->c1 - g->c0, w->row_max + g->r + i, w->row_sum + g->r + i,
                         w->acc + (g->r + i) * evp, evp);
    /* O += P V (padding rows hold P = 0: zero Q rows, or a zeroed p_block).
     * Key c of V is c * ldv panel elements in, in both layouts (a bfloat16
     * word row holds two keys' pairs). */
    FN(value_product)(g->n, (nb < g->c1 ? nb : g->c1) - g->c0, evp, sc, vp + g->c0 * ldv, ldv,
                      w->acc + g->r * evp, rounded);
}

/* Attention weights of one row group of the tile at j0, once every row's max
 * m and sum l are final: the probabilities the output used, e^(s - m) / l,
 * added times w_factor into the zeroed blk->weights (factor 1 writes one head;
 * 1/H for every head in turn averages them).  Keys a row never sees keep
 * their 0, and so do rows with no key at all (l == 0). */
static void FN(add_group_weights)(const pyattn_problem *p, const pyattn_block *blk,
                                  const FN(workspace) *w, const FN(group) *g, int64_t j0,
                                  int64_t nb)
{
    const int64_t keys = (nb < g->c1 ? nb : g->c1) - g->c0;
    for (int64_t r = g->r; r < g->r + g->n && r < blk->nrows; r++) {
        if (w->row_sum[r] == 0) continue;
        REAL *s = w->scores + r * BLOCK_N + g->c0;
        const VEC shift = FN(vsplat)(w->row_max[r]), log2e = FN(vsplat)(LOG2E);
        const VEC coef = FN(vsplat)((REAL)(p->w_factor / w->row_sum[r]));
        for (int64_t c = 0; c < keys; c += LANES)
            FN(vstore)(s + c, FN(vexp2)((FN(vload)(s + c) - shift) * log2e) * coef);
        REAL *dst = (REAL *)blk->weights + (blk->row0 + r) * p->w_row + j0 + g->c0;
        for (int64_t c = 0; c < keys; c++) dst[c] += s[c];
    }
}

/* One sweep over the key tiles the block sees, scoring each tile by row
 * groups: the first accumulates the output; with `weights`, a second sweep
 * after it recomputes the same scores for the attention weights. */
static void FN(sweep_tiles)(const pyattn_problem *p, const KV *k, const KV *v,
                            const void *mask, const pyattn_block *blk, int64_t rows_pad,
                            const FN(workspace) *w, int weights)
{
    const int64_t ldv = FN(v_in_place)(p) ? p->v_row : FN(round_up)(p->Ev, NR);
    int64_t kv_begin, kv_end;
    FN(key_range)(p, blk, &kv_begin, &kv_end);
    for (int64_t j0 = kv_begin; j0 < kv_end; j0 += BLOCK_N) {
        const int64_t nb = kv_end - j0 < BLOCK_N ? kv_end - j0 : BLOCK_N;
        const PANEL *vp;
        FN(group) groups[MAX_GROUPS];
        const int count = FN(tile_scores)(p, k, v, mask, blk, rows_pad, w, j0, nb, &vp, groups);
        for (int gi = 0; gi < count; gi++) {
            if (weights) FN(add_group_weights)(p, blk, w, &groups[gi], j0, nb);
            else FN(accumulate_group)(p, blk, w, &groups[gi], nb, vp, ldv);
        }
    }
}

/* The block's sink into each row's softmax state, once the keys are in:
 * counted once, with the first keys (key0 == 0), in the compute type, where
 * a sink beyond its range is -inf (the validation refuses +inf). */
static void FN(add_row_sinks)(const pyattn_problem *p, const pyattn_block *blk,
                              const FN(workspace) *w)
{
    const REAL sink = (REAL)blk->sink;
    if (blk->key0 != 0 || !(sink > -(REAL)INFINITY)) return;
    const int64_t evp = FN(round_up)(p->Ev, NR);
    for (int64_t r = 0; r < blk->nrows; r++) {
        /* A row that saw no key has output 0; its accumulator may hold
         * 0 * inf from a value row no key of it could weigh. */
        if (w->row_max[r] == -(REAL)INFINITY)
            memset(w->acc + r * evp, 0, sizeof(REAL) * (size_t)evp);
        FN(add_sink)(sink, w->row_max + r, w->row_sum + r, w->acc + r * evp, evp);
    }
}

/* Many query rows: the GEMM-shaped path on packed tiles (see the top). */
static void FN(attend_tiled)(const pyattn_problem *p, const KV *k, const KV *v,
                             const void *mask, const pyattn_block *blk, int64_t rows_pad,
                             pyattn_scratch_header *tag, const FN(workspace) *w)
{
    if (w->whole_head && (tag->k != k || tag->v != v)) {
        for (int64_t j0 = 0; j0 < p->S; j0 += BLOCK_N) {
            const size_t tile = (size_t)(j0 / BLOCK_N);
            FN(pack_tile)(p, blk, k, v, j0, p->S - j0 < BLOCK_N ? p->S - j0 : BLOCK_N,
                          w->kt_panel + tile * FN(kt_tile_elems)(p),
                          w->v_panel + tile * FN(v_tile_elems)(p));
        }
        tag->k = k, tag->v = v;
    }
    FN(sweep_tiles)(p, k, v, mask, blk, rows_pad, w, 0);
    FN(add_row_sinks)(p, blk, w); /* before the weights: their denominator has it */
    if (blk->weights) FN(sweep_tiles)(p, k, v, mask, blk, rows_pad, w, 1);
}

static void FN(attend)(const pyattn_problem *p, const void *q_, const void *k_,
                       const void *v_, const void *mask, void *out_,
                       const pyattn_block *blk, void *scratch)
{
    const int64_t row0 = blk->row0, nrows = blk->nrows;
    const STORE *q = q_;
    const KV *k = k_, *v = v_;
    STORE *out = out_;
    const int64_t Ev = p->Ev, evp = FN(round_up)(Ev, NR);
    const int64_t rows_pad = FN(round_up)(nrows, MR);
    FN(workspace) w = FN(carve)(p, scratch);
    for (int64_t r = 0; r < rows_pad; r++) w.row_max[r] = -(REAL)INFINITY, w.row_sum[r] = 0;
    memset(w.acc, 0, sizeof(REAL) * (size_t)(rows_pad * evp));

    pyattn_scratch_header *tag = scratch;
    if (nrows < DIRECT_BELOW && !blk->weights) {
        /* Q as REAL rows, unscaled: the scores are scaled as computed. */
        FN(load_q_rows)(p, q, row0, nrows, w.q_real);
        if (p->k_col != 1 || p->v_col != 1)
            tag->k = tag->v = NULL; /* the decode path copies rows into the panels */
        FN(attend_direct)(p, k, v, mask, blk, w.q_real, w.kt_panel, w.v_panel, w.scores, w.acc,
                          w.row_max, w.row_sum);
        FN(add_row_sinks)(p, blk, &w);
    } else {
        /* Padding rows of Q are zero and never written out. */
        const REAL folded = FN(pack_q)(p, q, row0, nrows, rows_pad, w.q_block);
        w.scale_left = folded == 1 ? (REAL)p->scale : 1;
        if (WEIGHTS_ROUNDED)
            memset(w.p_block + nrows * BLOCK_N, 0,
                   sizeof(PANEL) * (size_t)((rows_pad - nrows) * BLOCK_N));
        FN(products_begin)();
        FN(attend_tiled)(p, k, v, mask, blk, rows_pad, tag, &w);
        FN(products_end)();
    }
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
        /* logsumexp of the scaled, masked scores, or its two parts. */
        if (blk->row_sum) {
            ((REAL *)blk->lse)[r] = l == 0 ? -(REAL)INFINITY : w.row_max[r];
            ((REAL *)blk->row_sum)[r] = l;
        } else if (blk->lse) {
            ((REAL *)blk->lse)[r] = l == 0 ? -(REAL)INFINITY : w.row_max[r] + (REAL)log((double)l);
        }
    }
}

#undef PANEL
#undef MAX_GROUPS
#undef RANGE_ROWS
#undef RANGE_COLS
#undef DIRECT_BELOW
#undef WEIGHTS_ROUNDED
#undef STORE
#undef STORE_KIND
#undef KV
#undef KV_SCALED
#undef KV_FP8
#undef FP8_UNIT
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
