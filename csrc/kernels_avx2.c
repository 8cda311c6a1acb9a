/* AVX2 + FMA kernels: 32-byte vectors.  The target pragma scopes the ISA to
 * this file, so the rest of the binary still runs on any x86-64 CPU. */
#pragma GCC target("avx2,fma,f16c")
#define ISA avx2
#define VBYTES 32
/* block sizes        MR  NV  BLOCK_M  BLOCK_N */
#define F32_MR 6
#define F32_NV 2
#define F32_BLOCK_M 192
#define F32_BLOCK_N 128
#define F64_MR 6
#define F64_NV 2
#define F64_BLOCK_M 96
#define F64_BLOCK_N 128

/* The target above, asked of CPUID (libgcc's checks include the OS's XSAVE
 * support for the wider register state). */
static int cpu_supports(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
}
/* quantized K/V kernels (int8, float8_e4m3fn): run and tested on a CPU of this set (an AMD EPYC Zen 3) */
#define QUANTIZED_KV 1
#include "kernel_set.h"
