/*
 * Instantiates the attention body for float and double on one instruction set,
 * and for float16 and bfloat16 storage computed in float, and publishes them
 * as `pyattn_kernels_<ISA>`.  The including file defines
 * ISA (a bare token), VBYTES, and the block-size table F32_* / F64_*:
 * MR x NV is the micro-tile, BLOCK_M query rows per work item, BLOCK_N keys
 * per tile.
 */
#include <string.h>

#include "pyattn_kernels.h"

#define PA_CAT2(a, b) a##_##b
#define PA_CAT(a, b) PA_CAT2(a, b)
#define PA_STR2(a) #a
#define PA_STR(a) PA_STR2(a)
#define FN(name) PA_CAT(name, SUFFIX)

/* float arithmetic: float32, and the half types' storage below */
#define REAL float
#define UINT uint32_t
#define REAL_IS_DOUBLE 0
#define MR F32_MR
#define NV F32_NV
#define BLOCK_M F32_BLOCK_M
#define BLOCK_N F32_BLOCK_N
#define SUFFIX PA_CAT(f32, ISA)
#include "attention_body.h"
#undef SUFFIX

/* bfloat16 is the top half of a float: widening is a shift, narrowing
 * rounds to nearest even (NaN kept quiet).  Plain integer code, which the
 * compiler vectorises on every ISA. */
static inline float PA_CAT(bf16_to_float, ISA)(uint16_t h)
{
    const uint32_t bits = (uint32_t)h << 16;
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

static inline uint16_t PA_CAT(float_to_bf16, ISA)(float x)
{
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1)) >> 16);
}

#define STORE uint16_t
#define STORE_KIND 2
#define TO_REAL(x) PA_CAT(bf16_to_float, ISA)(x)
#define FROM_REAL(x) PA_CAT(float_to_bf16, ISA)(x)
#define SUFFIX PA_CAT(bf16, ISA)
#include "attention_body.h"
#undef SUFFIX

/* float16 through the compiler's _Float16: F16C instructions where the
 * target has them, libgcc's conversions otherwise. */
#ifdef __FLT16_MAX__
#define STORE _Float16
#define TO_REAL(x) ((float)(x))
#define FROM_REAL(x) ((_Float16)(x))
#define STORE_KIND 1
#define SUFFIX PA_CAT(f16, ISA)
#include "attention_body.h"
#define PA_F16(name) PA_CAT(name, PA_CAT(f16, ISA))
#define PA_F16_KERNEL {PA_F16(attend), PA_F16(scratch_bytes), PA_F16(exp2_array), F32_BLOCK_M}
#else
#define PA_F16_KERNEL {0, 0, 0, 0} /* this compiler has no _Float16: no float16 kernel */
#endif
#undef SUFFIX
#undef REAL
#undef UINT
#undef REAL_IS_DOUBLE
#undef MR
#undef NV
#undef BLOCK_M
#undef BLOCK_N

#define REAL double
#define UINT uint64_t
#define REAL_IS_DOUBLE 1
#define SUFFIX PA_CAT(f64, ISA)
#define MR F64_MR
#define NV F64_NV
#define BLOCK_M F64_BLOCK_M
#define BLOCK_N F64_BLOCK_N
#include "attention_body.h"

const pyattn_kernels PA_CAT(pyattn_kernels, ISA) = {
    PA_STR(ISA),
    {PA_CAT(attend, PA_CAT(f32, ISA)), PA_CAT(scratch_bytes, PA_CAT(f32, ISA)),
     PA_CAT(exp2_array, PA_CAT(f32, ISA)), F32_BLOCK_M},
    {PA_CAT(attend, PA_CAT(f64, ISA)), PA_CAT(scratch_bytes, PA_CAT(f64, ISA)),
     PA_CAT(exp2_array, PA_CAT(f64, ISA)), F64_BLOCK_M},
    PA_F16_KERNEL,
    {PA_CAT(attend, PA_CAT(bf16, ISA)), PA_CAT(scratch_bytes, PA_CAT(bf16, ISA)),
     PA_CAT(exp2_array, PA_CAT(bf16, ISA)), F32_BLOCK_M},
};
