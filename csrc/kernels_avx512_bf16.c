/* AVX-512 kernels with bfloat16 dot products (AVX512-BF16: Zen 4/5, Cooper
 * Lake, Sapphire Rapids and later): the avx512 set, plus bf16_products on
 * VDPBF16PS. */
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx512bf16,avx2,fma,f16c")
#define ISA avx512_bf16
#define BF16_UNIT BF16_UNIT_DPBF16
#include "avx512_shared.h"
/* bfloat16 block sizes MR NV BLOCK_M BLOCK_N */
#define BF16_MR 8
#define BF16_NV 2
#define BF16_BLOCK_M 256
#define BF16_BLOCK_N 128

static int cpu_supports(void)
{
    return avx512_cpu() && __builtin_cpu_supports("avx512bf16");
}
/* quantized K/V kernels (int8, float8_e4m3fn): run and tested on a CPU of this set (an AMD EPYC Zen 4) */
#define QUANTIZED_KV 1
#include "kernel_set.h"
