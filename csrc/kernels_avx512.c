/* AVX-512 kernels: 64-byte vectors (Skylake-X, Ice Lake, Zen 4/5, ...). */
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,f16c")
#define ISA avx512
#include "avx512_shared.h"

static int cpu_supports(void) { return avx512_cpu(); }
/* quantized K/V kernels (int8, float8_e4m3fn): run and tested on a CPU of this set (an AMD EPYC Zen 4) */
#define QUANTIZED_KV 1
#include "kernel_set.h"
