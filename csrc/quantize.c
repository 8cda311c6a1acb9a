/* The quantized KV formats of docs/kv-cache.md, computed as pyattn.reference's
 * quantize_int8 and quantize_float8_e4m3fn do (their oracles): per group,
 * scale = float16(max|x| / largest) in float32, with largest the format's
 * (127, 448), then each element x / scale rounded to the format, half to
 * even, saturating at +-largest. */
#include <string.h>

#include "pyattn_kernels.h"

#ifdef __FLT16_MAX__
static const float ROUNDER = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer, half to even */

/* float32 to float8_e4m3fn bits, |x| <= 448 after saturation; NaN stays
 * NaN (0x7f), though the quantizer refuses it before it gets here. */
static uint8_t float_to_e4m3fn(float x)
{
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    const uint8_t sign = (uint8_t)(bits >> 24 & 0x80u);
    bits &= 0x7fffffffu;
    if (bits > 0x7f800000u) return sign | 0x7f;
    float a;
    memcpy(&a, &bits, sizeof a);
    a = a < 448.0f ? a : 448.0f;
    if (a < 0x1p-6f) /* subnormal, m * 2^-9 (m = 8 is the smallest normal, 0x08) */
        return sign | (uint8_t)((a * 512.0f + ROUNDER) - ROUNDER);
    memcpy(&bits, &a, sizeof bits);
    bits += 0x7ffffu + (bits >> 20 & 1u); /* mantissa to 3 bits, half to even (may carry) */
    return sign | (uint8_t)(((bits >> 23) - 120u) << 3 | (bits >> 20 & 7u));
}

/* Quantize n rows of D channels, `group` per scale, to `format`. */
static int quantize(int format, const float *x, int64_t n, int64_t D, int64_t group, void *q,
                    uint16_t *scales)
{
    const float largest = format == PYATTN_INT8 ? 127.0f : 448.0f;
    for (int64_t r = 0; r < n; r++)
        for (int64_t g0 = 0; g0 < D; g0 += group) {
            const float *xg = x + r * D + g0;
            /* max |x| as the bits of |x|: an integer max vectorises, and any
             * NaN or infinity is at least the bits of +inf */
            int32_t top = 0;
            for (int64_t e = 0; e < group; e++) {
                int32_t bits;
                memcpy(&bits, xg + e, sizeof bits);
                bits &= 0x7fffffff;
                top = bits > top ? bits : top;
            }
            if (top >= 0x7f800000) return 1;
            float amax;
            memcpy(&amax, &top, sizeof amax);
            const _Float16 h = (_Float16)(amax / largest);
            const float s = (float)h;
            if (!(s <= 65504.0f)) return 2;
            /* divided by the stored scale, so dequantizing inverts it; a zero
             * scale (all-zero or tiny group) stores zeros */
            if (format == PYATTN_INT8) {
                int8_t *qg = (int8_t *)q + r * D + g0;
                for (int64_t e = 0; e < group; e++) {
                    float v = s > 0 ? xg[e] / s : 0.0f;
                    v = (v + ROUNDER) - ROUNDER;
                    v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
                    qg[e] = (int8_t)v;
                }
            } else {
                uint8_t *qg = (uint8_t *)q + r * D + g0;
                for (int64_t e = 0; e < group; e++) qg[e] = float_to_e4m3fn(s > 0 ? xg[e] / s : 0.0f);
            }
            memcpy(scales + r * (D / group) + g0 / group, &h, sizeof h);
        }
    return 0;
}

int pyattn_quantize(int format, const float *x, int64_t n, int64_t D, int64_t group, void *q,
                    uint16_t *scales)
{
    if (format != PYATTN_INT8 && format != PYATTN_FLOAT8_E4M3FN) return 4;
    return quantize(format, x, n, D, group, q, scales);
}
#else
int pyattn_quantize(int format, const float *x, int64_t n, int64_t D, int64_t group, void *q,
                    uint16_t *scales)
{
    (void)format, (void)x, (void)n, (void)D, (void)group, (void)q, (void)scales;
    return 3; /* no _Float16 to round the scales with (the kernels read K/V without it) */
}
#endif
