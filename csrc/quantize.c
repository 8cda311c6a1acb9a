/* The int8 KV format of docs/kv-cache.md, computed as pyattn.reference's
 * quantize_int8 does (its oracle): per group, scale = float16(max|x| / 127)
 * in float32, then q = clip(round_half_even(x / scale), -127, 127). */
#include <string.h>

#include "pyattn_kernels.h"

#ifdef __FLT16_MAX__
int pyattn_quantize_int8(const float *x, int64_t n, int64_t D, int64_t group, int8_t *q,
                         uint16_t *scales)
{
    const float round = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer, half to even */
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
            const _Float16 h = (_Float16)(amax / 127.0f);
            const float s = (float)h;
            if (!(s <= 65504.0f)) return 2;
            int8_t *qg = q + r * D + g0;
            for (int64_t e = 0; e < group; e++) {
                /* divided by the stored scale, so dequantizing inverts it */
                float v = s > 0 ? xg[e] / s : 0.0f;
                v = (v + round) - round;
                v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
                qg[e] = (int8_t)v;
            }
            memcpy(scales + r * (D / group) + g0 / group, &h, sizeof h);
        }
    return 0;
}
#else
int pyattn_quantize_int8(const float *x, int64_t n, int64_t D, int64_t group, int8_t *q,
                         uint16_t *scales)
{
    (void)x, (void)n, (void)D, (void)group, (void)q, (void)scales;
    return 3; /* no _Float16 to round the scales with (the kernels read int8 without it) */
}
#endif
