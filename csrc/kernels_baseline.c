/* Portable kernels: 16-byte vectors (SSE2 on x86-64, NEON on arm64, scalar
 * code elsewhere); the set every CPU can run, and the one every other set is
 * tested against. */
#define ISA baseline
#define VBYTES 16
/* block sizes        MR  NV  BLOCK_M  BLOCK_N */
#define F32_MR 4
#define F32_NV 2
#define F32_BLOCK_M 128
#define F32_BLOCK_N 128
#define F64_MR 4
#define F64_NV 2
#define F64_BLOCK_M 64
#define F64_BLOCK_N 128

static int cpu_supports(void) { return 1; }
/* quantized K/V kernels (int8, float8_e4m3fn): run and tested on x86-64 (an AMD EPYC Zen 3), not yet
 * on another architecture's baseline */
#if defined(__x86_64__)
#define QUANTIZED_KV 1
#endif
#include "kernel_set.h"
