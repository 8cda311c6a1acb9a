/* AVX-512 kernels: 64-byte vectors (Skylake-X, Ice Lake, Zen 4/5, ...). */
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,f16c")
#define ISA avx512
#define VBYTES 64
/* block sizes        MR  NV  BLOCK_M  BLOCK_N */
#define F32_MR 8
#define F32_NV 2
#define F32_BLOCK_M 256
#define F32_BLOCK_N 128
#define F64_MR 8
#define F64_NV 2
#define F64_BLOCK_M 128
#define F64_BLOCK_N 128

#include "cpu_avx512.h"
static int cpu_supports(void) { return avx512_cpu(); }
#include "kernel_set.h"
