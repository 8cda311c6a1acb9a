/*
 * One kernel set: instantiates the attention template (attention_body.h) on
 * one instruction set for every storage dtype, and publishes the table
 * `pyattn_kernels_<ISA>`, indexed by enum pyattn_dtype.  The including
 * kernels_<ISA>.c defines ISA (a bare token), VBYTES, its block-size table
 * F32_* / F64_* (MR x NV is the micro-tile, BLOCK_M query rows per work item,
 * BLOCK_N keys per tile) and `static int cpu_supports(void)`.  A set whose
 * CPUs multiply bfloat16 also defines BF16_UNIT (see products_bf16.h) and
 * BF16_* block sizes, and gets a second table, bf16_products: the float
 * storage types with Q K^T and P V in bfloat16.
 *
 * A set that has run quantized K/V on a CPU of its own defines QUANTIZED_KV
 * and gets the int8 and float8_e4m3fn kernels (float32 q and out, exact
 * products); the others leave their entries empty and the registry falls
 * back to a set below them (pyattn_kernels_for_dtype).
 *
 * A new storage dtype is one block in float_instances.h (its STORE type and TO_REAL /
 * FROM_REAL, plus a lane-wise load in simd.h's vload_store when the generic
 * one is slow), one entry in the table at the end, and its row in
 * registry.c's pyattn_dtypes.
 */
#include <string.h>

#include "pyattn_kernels.h"

#define PA_CAT2(a, b) a##_##b
#define PA_CAT(a, b) PA_CAT2(a, b)
#define PA_STR2(a) #a
#define PA_STR(a) PA_STR2(a)
#define FN(name) PA_CAT(name, SUFFIX)
/* Before a loop over a register tile's rows or vectors: unrolled early, so
 * that GCC keeps the tile's accumulator array in registers (otherwise it
 * keeps it on the stack, stored and reloaded around every micro-kernel
 * call). */
#define PA_UNROLLED _Pragma("GCC unroll 32")

/* STORE_KIND: how an instance's storage type is loaded (see vload_store). */
#define STORE_KIND_NATIVE 0 /* STORE is REAL */
#define STORE_KIND_F16 1
#define STORE_KIND_BF16 2

/* The table entry of the instance of storage `tag` (f32, ...) and products
 * `kind` (exact, bf16). */
#define PA_INSTANCE(name, tag, kind) PA_CAT(name, PA_CAT(tag, PA_CAT(kind, ISA)))
#define PA_DTYPE_KERNEL(tag, kind, block_m) \
    {PA_INSTANCE(attend, tag, kind), PA_INSTANCE(scratch_bytes, tag, kind), \
     PA_INSTANCE(exp2_array, tag, kind), block_m}
#ifdef __FLT16_MAX__
#define PA_F16_KERNEL(kind, block_m) PA_DTYPE_KERNEL(f16, kind, block_m)
#else
#define PA_F16_KERNEL(kind, block_m) {0} /* this compiler has no _Float16: no float16 kernel */
#endif

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

/* float arithmetic: float32 and the half types, exact products */
#define REAL float
#define UINT uint32_t
#define REAL_IS_DOUBLE 0
#define MR F32_MR
#define NV F32_NV
#define BLOCK_M F32_BLOCK_M
#define BLOCK_N F32_BLOCK_N
#define PRODUCTS_TAG exact
#include "float_instances.h"
/* quantized K/V with float16 scales: int8, float8_e4m3fn */
#ifdef QUANTIZED_KV
#define KV int8_t
#define KV_SCALED 1
#define SUFFIX PA_CAT(i8, PA_CAT(exact, ISA))
#include "attention_body.h"
#undef SUFFIX
#define KV uint8_t
#define KV_SCALED 1
#define KV_FP8 1
#define SUFFIX PA_CAT(f8, PA_CAT(exact, ISA))
#include "attention_body.h"
#undef SUFFIX
#define PA_INT8_KERNEL PA_DTYPE_KERNEL(i8, exact, F32_BLOCK_M)
#define PA_FP8_KERNEL PA_DTYPE_KERNEL(f8, exact, F32_BLOCK_M)
#else
#define PA_INT8_KERNEL {0} /* not run on this set's CPUs yet */
#define PA_FP8_KERNEL {0}
#endif
#undef PRODUCTS_TAG
#undef MR
#undef NV
#undef BLOCK_M
#undef BLOCK_N

/* bfloat16 products, on sets whose CPUs have a bfloat16 unit (BF16_UNIT) */
#ifdef BF16_UNIT
/* Their direct (decode) path is exact: the same bits as the exact kernels,
 * which needs the same key tiles. */
_Static_assert(BF16_BLOCK_N == F32_BLOCK_N, "bf16 and float32 key tiles must agree");
#define BF16_PRODUCTS 1
#define MR BF16_MR
#define NV BF16_NV
#define BLOCK_M BF16_BLOCK_M
#define BLOCK_N BF16_BLOCK_N
#define PRODUCTS_TAG bf16
#include "float_instances.h"
#undef PRODUCTS_TAG
#undef BF16_PRODUCTS
#undef MR
#undef NV
#undef BLOCK_M
#undef BLOCK_N
#define PA_BF16_PRODUCTS                                                  \
    {                                                                     \
        [PYATTN_FLOAT32] = PA_DTYPE_KERNEL(f32, bf16, BF16_BLOCK_M),      \
        [PYATTN_FLOAT16] = PA_F16_KERNEL(bf16, BF16_BLOCK_M),             \
        [PYATTN_BFLOAT16] = PA_DTYPE_KERNEL(bf16, bf16, BF16_BLOCK_M),    \
    }
#else
#define PA_BF16_PRODUCTS {{0}} /* no bfloat16 unit: no such kernels */
#endif
#undef REAL
#undef UINT
#undef REAL_IS_DOUBLE

#define REAL double
#define UINT uint64_t
#define REAL_IS_DOUBLE 1
#define SUFFIX PA_CAT(f64, PA_CAT(exact, ISA))
#define MR F64_MR
#define NV F64_NV
#define BLOCK_M F64_BLOCK_M
#define BLOCK_N F64_BLOCK_N
#include "attention_body.h"

const pyattn_kernels PA_CAT(pyattn_kernels, ISA) = {
    .name = PA_STR(ISA),
    .cpu_supports = cpu_supports,
    .by_dtype = {
        [PYATTN_FLOAT32] = PA_DTYPE_KERNEL(f32, exact, F32_BLOCK_M),
        [PYATTN_FLOAT64] = PA_DTYPE_KERNEL(f64, exact, F64_BLOCK_M),
        [PYATTN_FLOAT16] = PA_F16_KERNEL(exact, F32_BLOCK_M),
        [PYATTN_BFLOAT16] = PA_DTYPE_KERNEL(bf16, exact, F32_BLOCK_M),
        [PYATTN_INT8] = PA_INT8_KERNEL,
        [PYATTN_FLOAT8_E4M3FN] = PA_FP8_KERNEL,
    },
    .bf16_products = PA_BF16_PRODUCTS,
};
