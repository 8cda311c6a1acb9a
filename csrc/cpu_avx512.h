/* The CPU features every AVX-512 kernel set targets (its pragma's list
 * without the set's own extensions), asked of CPUID; libgcc's checks include
 * the OS's XSAVE support for the wider register state. */
static int avx512_cpu(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
}
