/*
 * Instantiates the attention body for float and double on one instruction set
 * and publishes them as `pyattn_kernels_<ISA>`.  The including file defines
 * ISA (a bare token), VBYTES, and the block-size table F32_* / F64_*:
 * MR x NV is the micro-tile, BLOCK_M query rows per work item, BLOCK_N keys
 * per tile.
 */
#include "pyattn_kernels.h"

#define PA_CAT2(a, b) a##_##b
#define PA_CAT(a, b) PA_CAT2(a, b)
#define PA_STR2(a) #a
#define PA_STR(a) PA_STR2(a)
#define FN(name) PA_CAT(name, SUFFIX)

#define REAL float
#define UINT uint32_t
#define REAL_IS_DOUBLE 0
#define SUFFIX PA_CAT(f32, ISA)
#define MR F32_MR
#define NV F32_NV
#define BLOCK_M F32_BLOCK_M
#define BLOCK_N F32_BLOCK_N
#include "attention_body.h"
#undef REAL
#undef UINT
#undef REAL_IS_DOUBLE
#undef SUFFIX
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
};
