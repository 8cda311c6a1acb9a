/*
 * Register kernels of the direct (decode) path of the attention template
 * (see attention_body.h): dot products and weighted row sums that read K and
 * V rows where they lie.  The tiled path's micro-kernels are in the products
 * headers (products_exact.h, products_bf16.h).
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
    const int64_t step = KV_INT8 ? group : nv;
    enum { G = LANES < 4 ? LANES : 4 }; /* rows at once: independent FMA chains */
    VEC acc[LANES];
    for (int j = 0; j < LANES; j += G) {
        VEC sum[G];
        for (int g = 0; g < G; g++) sum[g] = FN(vsplat)(0);
        for (int64_t e0 = 0; e0 < nv; e0 += step) {
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
                sum[g] = KV_INT8 ? sum[g] + part[g] * FN(vsplat)(FN(kv_scale)(
                                                FN(scale_row)(bs, lds, j + g), FN(group_of)(e0, group)))
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
    _Static_assert(!KV_INT8 || BLOCK * LANES % PYATTN_GROUP_QUANTUM == 0, "blocks start on a quantum");
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

