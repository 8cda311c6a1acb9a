/* AMX kernels (Sapphire Rapids and later Xeons): the avx512_bf16 set with
 * bf16_products on the tile unit (TDPBF16PS), 32 x 32 blocks of scores. */
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx512bf16,amx-tile,amx-bf16,avx2,fma,f16c")
#include <sys/syscall.h>
#include <unistd.h>

#define ISA amx
#define BF16_UNIT BF16_UNIT_AMX
#include "avx512_shared.h"
/* bfloat16 block sizes MR NV BLOCK_M BLOCK_N */
#define BF16_MR 32 /* rows of a 2 x 2 block of 16-row tiles */
#define BF16_NV 2
#define BF16_BLOCK_M 128
#define BF16_BLOCK_N 128
/* Scratch in whole blocks whatever L and S (the other sets size it by the
 * problem): the tiles have only run on whole blocks' strides, and the change
 * waits for a CPU with AMX to run it. */
#define BF16_WHOLE_BLOCKS 1

/* CPUID's AMX bits, and the kernel's leave to use the tile state: Linux
 * hands out the 8 KiB of tile data per process on request, once. */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
static int cpu_supports(void)
{
    static int granted = -1; /* asked once; every later call answers the same */
    if (!(avx512_cpu() && __builtin_cpu_supports("avx512bf16") &&
          __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16")))
        return 0;
    if (granted < 0)
        granted = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return granted;
}
#include "kernel_set.h"
