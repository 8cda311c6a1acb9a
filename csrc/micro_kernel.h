/*
 * Register kernels of the direct (decode) path of the attention template
 * (see attention_body.h): dot products and weighted row sums that read K and
 * V rows where they lie, for one query row (dots, weighted_rows) or a few
 * that share each load (rows_dots, rows_weighted), and the two tile-level
 * steps built on them (direct_scores, direct_values).  The tiled path's
 * micro-kernels are in the products headers (products_exact.h,
 * products_bf16.h).
 */
/* K and V rows come with their scales (bs: row 0's, lds apart, `group`
 * channels each; see scale_row), which only quantized rows have. */

/* dot(a, b) over n elements: vector body, scalar tail. */
static inline REAL FN(dot)(const REAL *a, const KV *b, const void *bs, int64_t group, int64_t n)
{
    const int64_t nv = n - n % LANES;
    VEC acc = FN(vsplat)(0);
    for (int64_t e = 0; e < nv; e += LANES)
        acc += FN(vload)(a + e) * FN(vload_kv)(b + e, FN(kv_scale)(bs, FN(group_of)(e, group)));
    REAL d = FN(hsum)(acc);
    for (int64_t e = nv; e < n; e++)
        d += a[e] * FN(kv_to_real)(b[e], FN(kv_scale)(bs, FN(group_of)(e, group)));
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
static inline void FN(dots)(const REAL *a, const KV *b, int64_t ldb, const void *bs,
                            int64_t lds, int64_t group, int64_t n, REAL *s)
{
    const int64_t nv = n - n % LANES;
    /* channels of one scale per step (quantized rows), else the whole row */
    const int64_t step = KV_SCALED ? group : nv;
    enum { G = LANES < 4 ? LANES : 4 }; /* rows at once: independent FMA chains */
    VEC acc[LANES];
    for (int j = 0; j < LANES; j += G) {
        VEC sum[G];
        for (int g = 0; g < G; g++) sum[g] = FN(vsplat)(0);
        /* gi counts the groups (e0 / group without a division: a 64-bit
         * divide per group cost as much as the group's products) */
        for (int64_t e0 = 0, gi = 0; e0 < nv; e0 += step, gi++) {
            /* A group's products are summed unscaled, then scaled once. */
            VEC part[G];
            for (int g = 0; g < G; g++) part[g] = FN(vsplat)(0);
            const int64_t e1 = e0 + step < nv ? e0 + step : nv;
            for (int64_t e = e0; e < e1; e += LANES) {
                const VEC av = FN(vload)(a + e);
                for (int g = 0; g < G; g++)
                    part[g] += av * FN(vload_kv_unscaled)(b + (j + g) * ldb + e);
            }
            for (int g = 0; g < G; g++)
                sum[g] = KV_SCALED ? sum[g] + part[g] * FN(vsplat)(FN(kv_scale)(
                                                FN(scale_row)(bs, lds, j + g), gi))
                                 : part[g]; /* one step: the whole row */
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
        for (int j = 0; j < LANES; j++)
            s[j] += a[e] * FN(kv_to_real)(b[j * ldb + e], FN(kv_scale)(FN(scale_row)(bs, lds, j),
                                                                      FN(group_of)(e, group)));
}

/* y[0:n] += sum over keys c < nb of p[c] * x[c * ldx + 0:n], with y's
 * vectors held in registers across the keys (8 at a time). */
static inline void FN(weighted_rows)(const REAL *p, const KV *x, int64_t ldx, const void *xs,
                                     int64_t lds, int64_t group, int64_t nb, REAL *y, int64_t n)
{
    enum { BLOCK = 8 };
    _Static_assert(!KV_SCALED || BLOCK * LANES % PYATTN_GROUP_QUANTUM == 0, "blocks start on a quantum");
    const int64_t nv = n - n % LANES;
    int64_t x0 = 0;
    for (; x0 + BLOCK * LANES <= nv; x0 += BLOCK * LANES) { /* constant trip counts: registers */
        VEC acc[BLOCK];
        int64_t gi[BLOCK];
        for (int i = 0; i < BLOCK; i++) {
            acc[i] = FN(vload)(y + x0 + i * LANES);
            gi[i] = FN(group_of)(x0 + i * LANES, group);
        }
        for (int64_t c = 0; c < nb; c++) {
            const void *sr = FN(scale_row)(xs, lds, c);
            /* The weight times the scale, once per quantum (the unrolled test
             * is constant), not a scale per vector: converting and applying
             * scales was half of int8's work here. */
            REAL w[BLOCK];
            for (int i = 0; i < BLOCK; i++)
                w[i] = i * LANES % PYATTN_GROUP_QUANTUM ? w[i - 1] : p[c] * FN(kv_scale)(sr, gi[i]);
            for (int i = 0; i < BLOCK; i++)
                acc[i] += FN(vsplat)(w[i]) * FN(vload_kv_unscaled)(x + c * ldx + x0 + i * LANES);
        }
        for (int i = 0; i < BLOCK; i++) FN(vstore)(y + x0 + i * LANES, acc[i]);
    }
    for (; x0 < nv; x0 += LANES) {
        VEC acc = FN(vload)(y + x0);
        const int64_t g = FN(group_of)(x0, group);
        for (int64_t c = 0; c < nb; c++)
            acc += FN(vsplat)(p[c]) * FN(vload_kv)(x + c * ldx + x0,
                                                  FN(kv_scale)(FN(scale_row)(xs, lds, c), g));
        FN(vstore)(y + x0, acc);
    }
    for (int64_t e = nv; e < n; e++)
        for (int64_t c = 0; c < nb; c++)
            y[e] += p[c] * FN(kv_to_real)(x[c * ldx + e], FN(kv_scale)(FN(scale_row)(xs, lds, c),
                                                                      FN(group_of)(e, group)));
}


/* Query rows handled together by rows_dots and rows_weighted: each K or V
 * vector is loaded (and, int8, converted and scaled) once for all of them. */
#define ROW_GROUP 4

/* s[r * lds_out + j] = dot(a + r * lda, b + j * ldb) for R rows r (2..ROW_GROUP)
 * and the LANES keys j: accumulators for R rows and two keys at a time, each
 * key vector shared by the rows, then one transposing fold per row as in
 * dots.  The sums run in dots' order, so float rows give its bits; int8
 * rows are scaled per vector here (one multiply shared by R rows). */
static inline __attribute__((always_inline)) void FN(rows_dots)(
    const REAL *a, int64_t lda, int R, const KV *b, int64_t ldb, const void *bs, int64_t lds,
    int64_t group, int64_t n, REAL *s, int64_t lds_out)
{
    const int64_t nv = n - n % LANES;
    const int64_t step = KV_SCALED ? group : nv; /* channels of one scale, or the whole row */
    VEC out[ROW_GROUP][LANES];
    for (int j = 0; j < LANES; j += 2) {
        VEC acc[ROW_GROUP][2];
        for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = FN(vsplat)(0);
        const void *s0 = FN(scale_row)(bs, lds, j), *s1 = FN(scale_row)(bs, lds, j + 1);
        /* one scale per key and step; g counts the groups, as in dots */
        for (int64_t e0 = 0, g = 0; e0 < nv; e0 += step, g++) {
            const int64_t e1 = e0 + step < nv ? e0 + step : nv;
            const REAL c0 = FN(kv_scale)(s0, g), c1 = FN(kv_scale)(s1, g);
            for (int64_t e = e0; e < e1; e += LANES) {
                const VEC b0 = FN(vload_kv)(b + j * ldb + e, c0);
                const VEC b1 = FN(vload_kv)(b + (j + 1) * ldb + e, c1);
                for (int r = 0; r < R; r++) {
                    const VEC av = FN(vload)(a + r * lda + e);
                    acc[r][0] += av * b0;
                    acc[r][1] += av * b1;
                }
            }
        }
        for (int r = 0; r < R; r++) out[r][j] = acc[r][0], out[r][j + 1] = acc[r][1];
    }
    for (int r = 0; r < R; r++) {
#pragma GCC unroll 4
        for (int level = 0; (1 << level) < LANES; level++)
#pragma GCC unroll 8
            for (int i = 0; i < (LANES >> (level + 1)); i++)
                out[r][i] = FN(fold)(out[r][2 * i], out[r][2 * i + 1], level);
        REAL *sr = s + r * lds_out;
        FN(vstore)(sr, out[r][0]);
        for (int64_t e = nv; e < n; e++)
            for (int j = 0; j < LANES; j++)
                sr[j] += a[r * lda + e] * FN(kv_to_real)(b[j * ldb + e],
                                                         FN(kv_scale)(FN(scale_row)(bs, lds, j),
                                                                      FN(group_of)(e, group)));
    }
}

/* y[r * ldy + 0:n] += sum over keys c < nb of p[r * ldp + c] * x[c * ldx + 0:n]
 * for R rows r (2..ROW_GROUP): two vectors of each row's y in registers at a
 * time, each value vector loaded once for the rows (in weighted_rows' order
 * of additions, so float rows give its bits). */
static inline __attribute__((always_inline)) void FN(rows_weighted)(
    const REAL *p, int64_t ldp, int R, const KV *x, int64_t ldx, const void *xs, int64_t lds,
    int64_t group, int64_t nb, REAL *y, int64_t ldy, int64_t n)
{
    const int64_t nv = n - n % LANES;
    int64_t x0 = 0;
    for (; x0 + 2 * LANES <= nv; x0 += 2 * LANES) {
        VEC acc[ROW_GROUP][2];
        for (int r = 0; r < R; r++)
            for (int i = 0; i < 2; i++) acc[r][i] = FN(vload)(y + r * ldy + x0 + i * LANES);
        /* both vectors lie in one group: groups are whole quanta or rows */
        _Static_assert(!KV_SCALED || PYATTN_GROUP_QUANTUM % (2 * LANES) == 0, "one group");
        const int64_t g = FN(group_of)(x0, group);
        for (int64_t c = 0; c < nb; c++) {
            const REAL sc = FN(kv_scale)(FN(scale_row)(xs, lds, c), g);
            const VEC x0v = FN(vload_kv)(x + c * ldx + x0, sc);
            const VEC x1v = FN(vload_kv)(x + c * ldx + x0 + LANES, sc);
            for (int r = 0; r < R; r++) {
                const VEC pr = FN(vsplat)(p[r * ldp + c]);
                acc[r][0] += pr * x0v;
                acc[r][1] += pr * x1v;
            }
        }
        for (int r = 0; r < R; r++)
            for (int i = 0; i < 2; i++) FN(vstore)(y + r * ldy + x0 + i * LANES, acc[r][i]);
    }
    if (x0 < nv) { /* one vector left */
        VEC acc[ROW_GROUP];
        for (int r = 0; r < R; r++) acc[r] = FN(vload)(y + r * ldy + x0);
        const int64_t g = FN(group_of)(x0, group);
        for (int64_t c = 0; c < nb; c++) {
            const VEC xv = FN(vload_kv)(x + c * ldx + x0, FN(kv_scale)(FN(scale_row)(xs, lds, c), g));
            for (int r = 0; r < R; r++) acc[r] += FN(vsplat)(p[r * ldp + c]) * xv;
        }
        for (int r = 0; r < R; r++) FN(vstore)(y + r * ldy + x0, acc[r]);
    }
    for (int r = 0; r < R; r++)
        for (int64_t e = nv; e < n; e++)
            for (int64_t c = 0; c < nb; c++)
                y[r * ldy + e] += p[r * ldp + c] *
                                  FN(kv_to_real)(x[c * ldx + e], FN(kv_scale)(FN(scale_row)(xs, lds, c),
                                                                              FN(group_of)(e, group)));
}

/* The direct path's two products for one key tile, apart from the softmax
 * between them (noinline: inlined into attend_direct, the constants its
 * other loops keep in registers made these spill their accumulators). */

/* Scores s[r * BLOCK_N + c] = q_r . k_c (unscaled) of the tile's nb keys for
 * the nrows query rows qs (E apart), ROW_GROUP rows at a time (GQA heads as
 * rows, a few query rows): each key row is read once per group.  The same
 * keys' value rows are prefetched meanwhile. */
static __attribute__((noinline)) void FN(direct_scores)(
    const pyattn_problem *p, const REAL *qs, int64_t nrows, const KV *kr, int64_t k_stride,
    const void *ks, const KV *vr, int64_t v_stride, int64_t nb, REAL *sc)
{
    const int64_t E = p->E, full = nb - nb % LANES;
    const int64_t v_bytes = p->Ev * (int64_t)sizeof(KV), k_bytes = E * (int64_t)sizeof(KV);
    for (int64_t r0 = 0; r0 < nrows; r0 += ROW_GROUP) {
        const int R = nrows - r0 < ROW_GROUP ? (int)(nrows - r0) : ROW_GROUP;
        const REAL *a = qs + r0 * E;
        REAL *s = sc + r0 * BLOCK_N;
        for (int64_t c = 0; c < full; c += LANES) {
            if (r0 == 0) { /* the first pass over the tile's keys reads them from memory */
                for (int64_t i = c; i < c + LANES; i++) /* these keys' values, into L2 */
                    for (int64_t off = 0; off < v_bytes; off += 64)
                        __builtin_prefetch((const char *)(vr + i * v_stride) + off, 0, 3);
                /* the next keys: their rows' loads stalled the products (perf) */
                for (int64_t i = c + LANES; i < c + 2 * LANES && i < nb; i++)
                    for (int64_t off = 0; off < k_bytes; off += 64)
                        __builtin_prefetch((const char *)(kr + i * k_stride) + off, 0, 3);
            }
            const KV *b = kr + c * k_stride;
            const void *bs = FN(scale_row)(ks, p->ks_row, c);
            const int64_t lds = p->ks_row, g = p->k_group;
            switch (R) { /* constant row counts: accumulators in registers */
            case 4: FN(rows_dots)(a, E, 4, b, k_stride, bs, lds, g, E, s + c, BLOCK_N); break;
            case 3: FN(rows_dots)(a, E, 3, b, k_stride, bs, lds, g, E, s + c, BLOCK_N); break;
            case 2: FN(rows_dots)(a, E, 2, b, k_stride, bs, lds, g, E, s + c, BLOCK_N); break;
            default: FN(dots)(a, b, k_stride, bs, lds, g, E, s + c);
            }
        }
        for (int r = 0; r < R; r++)
            for (int64_t c = full; c < nb; c++)
                s[r * BLOCK_N + c] = FN(dot)(a + r * E, kr + c * k_stride,
                                             FN(scale_row)(ks, p->ks_row, c), p->k_group, E);
    }
}

/* acc[r * evp + 0:Ev] += sum over the tile's keys c of w[r * BLOCK_N + c] * v_c
 * for the nrows rows, ROW_GROUP at a time: each value row read once per group. */
static __attribute__((noinline)) void FN(direct_values)(
    const pyattn_problem *p, const REAL *w, int64_t nrows, const KV *vr, int64_t v_stride,
    const void *vs, int64_t nb, REAL *acc)
{
    const int64_t Ev = p->Ev, evp = FN(round_up)(Ev, NR), lds = p->vs_row, g = p->v_group;
    for (int64_t r0 = 0; r0 < nrows; r0 += ROW_GROUP) {
        const int R = nrows - r0 < ROW_GROUP ? (int)(nrows - r0) : ROW_GROUP;
        const REAL *wr = w + r0 * BLOCK_N;
        REAL *y = acc + r0 * evp;
        switch (R) {
        case 4: FN(rows_weighted)(wr, BLOCK_N, 4, vr, v_stride, vs, lds, g, nb, y, evp, Ev); break;
        case 3: FN(rows_weighted)(wr, BLOCK_N, 3, vr, v_stride, vs, lds, g, nb, y, evp, Ev); break;
        case 2: FN(rows_weighted)(wr, BLOCK_N, 2, vr, v_stride, vs, lds, g, nb, y, evp, Ev); break;
        default: FN(weighted_rows)(wr, vr, v_stride, vs, lds, g, nb, y, Ev);
        }
    }
}

#undef ROW_GROUP
