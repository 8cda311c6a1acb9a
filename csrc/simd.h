/*
 * SIMD layer of the attention template (see attention_body.h for the
 * parameters): the vector types of one (dtype, ISA) instance, loads and
 * stores (storage types widened lane-wise), lane-wise select and max, the
 * vectorised 2^x, and the fixed-order horizontal reductions.
 */
#ifndef STORE
#define STORE REAL
#define TO_REAL(x) (x)
#define FROM_REAL(x) (x)
#define STORE_KIND STORE_KIND_NATIVE
#endif

/* KV: the element type of k and v, STORE unless the instance reads
 * quantized rows (KV_SCALED: one float16 scale per group of channels, see
 * pyattn_problem's k_group), int8 or, with KV_FP8, float8_e4m3fn bits. */
#ifndef KV
#define KV STORE
#define KV_SCALED 0
#endif
#ifndef KV_FP8
#define KV_FP8 0
#endif

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

/* 2^r for |r| <= 1/2: Horner on sum (r ln2)^k / k!, k = 0..D. */
static inline VEC FN(exp2_fraction)(VEC r)
{
    static const double coef[] = {
        1.0, 0.6931471805599453, 0.2402265069591007, 0.055504108664821576,
        0.009618129107628477, 0.0013333558146428441, 0.00015403530393381606,
        1.5252733804059838e-05, 1.3215486790144305e-06, 1.0178086009239696e-07,
        7.054911620801121e-09, 4.44553827187081e-10, 2.5678435993488196e-11,
        1.3691488853904124e-12};
    VEC poly = FN(vsplat)((REAL)coef[EXP_DEGREE]);
    for (int kk = EXP_DEGREE - 1; kk >= 0; kk--) poly = poly * r + (REAL)coef[kk];
    return poly;
}

#if VBYTES == 64 && defined(__AVX512F__)
/* AVX-512: the same n, r and polynomial, so the same bits, in four fewer
 * instructions: VRNDSCALE rounds, VSCALEF applies 2^n (exactly, as the
 * multiply by 2^n does), its zero mask flushes.  x is clamped first so that
 * -inf gives r = 0, not NaN; MAX keeps a NaN x (its second operand). */
#if REAL_IS_DOUBLE
#define PA_EXP_MAX _mm512_max_pd
#define PA_EXP_ROUND _mm512_roundscale_pd
#define PA_EXP_CMP _mm512_cmp_pd_mask
#define PA_EXP_SCALEF _mm512_maskz_scalef_pd
#else
#define PA_EXP_MAX _mm512_max_ps
#define PA_EXP_ROUND _mm512_roundscale_ps
#define PA_EXP_CMP _mm512_cmp_ps_mask
#define PA_EXP_SCALEF _mm512_maskz_scalef_ps
#endif
static inline VEC FN(vexp2)(VEC x)
{
    const VEC xc = (VEC)PA_EXP_MAX(FN(vsplat)(EXP2_LO - 1), x);
    const VEC n = (VEC)PA_EXP_ROUND(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const VEC poly = FN(exp2_fraction)(xc - n);
    /* lanes below EXP2_LO become 0; NaN lanes (unordered) keep their NaN */
    return (VEC)PA_EXP_SCALEF(PA_EXP_CMP(x, FN(vsplat)(EXP2_LO), _CMP_NLT_UQ), poly, n);
}
#undef PA_EXP_MAX
#undef PA_EXP_ROUND
#undef PA_EXP_CMP
#undef PA_EXP_SCALEF
#else
static inline VEC FN(vexp2)(VEC x)
{
    /* n = round(x), read back from the low mantissa bits of t. */
    const VEC t = x + EXP_MAGIC;
    const VEC n = t - EXP_MAGIC;
    const VEC poly = FN(exp2_fraction)(x - n);
    const UVEC two_n = (((UVEC)t - EXP_MAGIC_BITS) + EXP_BIAS) << EXP_MANT_BITS;
    const VEC y = poly * (VEC)two_n;
    return FN(vselect)((UVEC)(x < EXP2_LO), FN(vsplat)(0), y);
}
#endif

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

/* Transpose LANES vectors in place (r[i][x] becomes r[x][i]): log2(LANES)
 * stages, each swapping the off-diagonal d x d blocks of row pairs (i, i + d)
 * with two-input shuffles (one vpermt2ps each on AVX-512).  The shuffle
 * masks are constants: lo keeps a[x] where bit d of x is clear and takes
 * b[x - d] where it is set; hi takes a[x + d], or keeps b[x]. */
#define PA_LO(x, d) (((x) & (d)) ? (x) - (d) + LANES : (x))
#define PA_HI(x, d) (((x) & (d)) ? (x) + LANES : (x) + (d))
#define PA_MASK(f, d) {f(0, d), f(1, d), f(2, d), f(3, d), f(4, d), f(5, d), f(6, d), \
                       f(7, d), f(8, d), f(9, d), f(10, d), f(11, d), f(12, d), f(13, d), \
                       f(14, d), f(15, d)}
static const UINT FN(transpose_masks)[4][2][16] = {
    {PA_MASK(PA_LO, 1), PA_MASK(PA_HI, 1)}, {PA_MASK(PA_LO, 2), PA_MASK(PA_HI, 2)},
    {PA_MASK(PA_LO, 4), PA_MASK(PA_HI, 4)}, {PA_MASK(PA_LO, 8), PA_MASK(PA_HI, 8)}};
#undef PA_MASK
#undef PA_HI
#undef PA_LO

static inline void FN(transpose)(VEC r[LANES])
{
#pragma GCC unroll 4
    for (int level = 0; (1 << level) < LANES; level++) {
        const int d = 1 << level;
        UVEC lo, hi;
        memcpy(&lo, FN(transpose_masks)[level][0], sizeof lo);
        memcpy(&hi, FN(transpose_masks)[level][1], sizeof hi);
#pragma GCC unroll 16
        for (int i = 0; i < LANES; i++) {
            if (i & d) continue;
            const VEC a = r[i], b = r[i + d];
            r[i] = __builtin_shuffle(a, b, lo);
            r[i + d] = __builtin_shuffle(a, b, hi);
        }
    }
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

/* LANES contiguous STORE elements as a vector of REAL. */
static inline VEC FN(vload_store)(const STORE *p)
{
#if STORE_KIND == STORE_KIND_NATIVE
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

/* The scales of K/V row j (NULL for rows that have none), the group of
 * channel e and its scale: what the loads below multiply by. */
static inline const void *FN(scale_row)(const void *scales, int64_t row_stride, int64_t j)
{
#if KV_SCALED
    return (const uint16_t *)scales + j * row_stride;
#else
    (void)scales, (void)row_stride, (void)j;
    return NULL;
#endif
}

static inline int64_t FN(group_of)(int64_t e, int64_t group)
{
    return KV_SCALED ? e / group : 0; /* unscaled rows have one group, 0 */
}

/* float16 bits as a float: F16C converts in an instruction; elsewhere the
 * exponent is rebased in integer code, and a subnormal, m * 2^-24, is
 * exact in float arithmetic.  Inf and NaN never come here (validated). */
static inline float FN(half_bits_to_float)(uint16_t h)
{
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    const uint32_t m = h & 0x3ffu, e = (h >> 10) & 0x1fu, sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t bits = e ? (e + 112) << 23 | m << 13 : 0;
    float x;
    memcpy(&x, &bits, sizeof x);
    x = e ? x : (float)m * 0x1p-24f;
    memcpy(&bits, &x, sizeof bits);
    bits |= sign;
    memcpy(&x, &bits, sizeof x);
    return x;
#endif
}

/* float8_e4m3fn is read through float16: its bits shifted into float16's
 * (sign to sign, exponent and mantissa 7 places up) are the float16 of the
 * value times 2^-8, subnormals included (float16's range covers them, its
 * exponent bias is 8 more), so F16C converts them and the 2^8 joins the
 * row's scale (kv_scale).  NaN bytes (0x7f, 0xff) never come here:
 * pyattn.QuantizedKV refuses them. */
#define FP8_UNIT 256.0f
static inline uint16_t FN(fp8_as_half_bits)(uint8_t x)
{
    return (uint16_t)((x & 0x80u) << 8 | (x & 0x7fu) << 7);
}

/* The scale of group g of a row's scales srow (float16 bits, finite and
 * >= 0: validated), times FP8_UNIT for float8 rows. */
static inline REAL FN(kv_scale)(const void *srow, int64_t g)
{
#if KV_SCALED
    const REAL s = FN(half_bits_to_float)(((const uint16_t *)srow)[g]);
    return KV_FP8 ? s * FP8_UNIT : s; /* exact: a float16 times 2^8 */
#else
    (void)srow, (void)g;
    return 1;
#endif
}

/* One K/V element as REAL before its scale: int8 as an integer, float8 as
 * its value times 2^-8 (see fp8_as_half_bits). */
static inline REAL FN(kv_unscaled)(KV x)
{
#if KV_FP8
    return FN(half_bits_to_float)(FN(fp8_as_half_bits)(x));
#else
    return (REAL)x;
#endif
}

/* LANES contiguous K/V elements as REAL, unscaled (kv_unscaled), converted
 * in registers right before their use: int8 sign-extended lane-wise (GCC's
 * generic vector conversion goes element by element), float8 through
 * float16.  Loops that can apply a group's scale once per group (to a
 * partial sum or a weight) read with this; vload_kv scales each vector. */
static inline VEC FN(vload_kv_unscaled)(const KV *p)
{
#if KV_FP8 && VBYTES == 32 && defined(__AVX2__) && defined(__F16C__)
    const __m128i x = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)p));
    /* sign-extended, shifted 7 up: sign and the copy in bit 14 set; keep 15, 13..7 */
    const __m128i h = _mm_and_si128(_mm_slli_epi16(x, 7), _mm_set1_epi16((short)0xbf80));
    return (VEC)_mm256_cvtph_ps(h);
#elif KV_FP8 && VBYTES == 64 && defined(__AVX512BW__)
    const __m256i x = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
    const __m256i h = _mm256_and_si256(_mm256_slli_epi16(x, 7), _mm256_set1_epi16((short)0xbf80));
    return (VEC)_mm512_cvtph_ps(h);
#elif KV_FP8
    REAL buf[LANES];
    for (int64_t i = 0; i < LANES; i++) buf[i] = FN(kv_unscaled)(p[i]);
    return FN(vload)(buf);
#elif KV_SCALED && VBYTES == 64 && defined(__AVX512F__)
    return (VEC)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif KV_SCALED && VBYTES == 32 && defined(__AVX2__)
    return (VEC)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#elif KV_SCALED && VBYTES == 16 && defined(__SSE2__)
    int32_t w;
    memcpy(&w, p, sizeof w);
    __m128i x = _mm_cvtsi32_si128(w);
    x = _mm_unpacklo_epi8(x, x);
    x = _mm_srai_epi32(_mm_unpacklo_epi16(x, x), 24); /* each byte in the top of a lane */
    return (VEC)_mm_cvtepi32_ps(x);
#elif KV_SCALED
#error "int8 K/V loads exist for AVX-512, AVX2 and SSE2 (the CPUs they ran on)"
#else
    return FN(vload_store)(p);
#endif
}

/* LANES contiguous K/V elements as REAL, all of one group of scale s. */
static inline VEC FN(vload_kv)(const KV *p, REAL s)
{
#if KV_SCALED
    return FN(vload_kv_unscaled)(p) * FN(vsplat)(s);
#else
    (void)s;
    return FN(vload_store)(p);
#endif
}

/* One K/V element as REAL, of scale s. */
static inline REAL FN(kv_to_real)(KV x, REAL s)
{
#if KV_SCALED
    return FN(kv_unscaled)(x) * s;
#else
    (void)s;
    return TO_REAL(x);
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

/* dst[0:n] = K/V row src[0:n:stride] as REAL, its scales at srow. */
static inline void FN(load_kv_row)(const KV *src, int64_t stride, int64_t n, const void *srow,
                                   int64_t group, REAL *dst)
{
    int64_t x = 0;
    if (stride == 1)
        for (; x + LANES <= n; x += LANES)
            FN(vstore)(dst + x, FN(vload_kv)(src + x, FN(kv_scale)(srow, FN(group_of)(x, group))));
    for (; x < n; x++)
        dst[x] = FN(kv_to_real)(src[x * stride], FN(kv_scale)(srow, FN(group_of)(x, group)));
}

/* Q rows [row0, row0 + nrows) of the problem as REAL, unscaled, E apart. */
static inline void FN(load_q_rows)(const pyattn_problem *p, const STORE *q, int64_t row0,
                                   int64_t nrows, REAL *dst)
{
    for (int64_t r = 0; r < nrows; r++)
        FN(load_row)(q + (row0 + r) * p->q_row, p->q_col, p->E, dst + r * p->E);
}

