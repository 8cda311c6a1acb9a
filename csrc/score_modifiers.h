/*
 * Score modifiers of the attention template (see attention_body.h): what
 * turns raw Q K^T tile scores into the scores the softmax sees, row by row.
 * Windows (causality) and the key range they leave, soft-capping, ALiBi, the
 * user's mask, and attention sinks.  A new modifier lives here: one field of
 * pyattn_problem or pyattn_block, its step in finish_row (and its test in
 * row_needs_finish), the Python option list and the reference.
 */
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

