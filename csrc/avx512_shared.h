/* What every AVX-512 kernel set shares: 64-byte vectors, the float32 and
 * float64 block sizes, and the CPU features of its pragma's list without the
 * set's own extensions, asked of CPUID (libgcc's checks include the OS's
 * XSAVE support for the wider register state).  A set adds its own rows
 * (bfloat16) and its own cpu_supports(). */
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

static int avx512_cpu(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
}
