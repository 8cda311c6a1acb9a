/* Which kernel implementations this binary holds and which this CPU can run,
 * plus the OpenMP facts the Python layer reports.  The choice itself is made
 * once, in Python (pyattn/_dispatch.py). */
#include <stdlib.h>
#include <string.h>
#include "pyattn_kernels.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#define PYATTN_X86 1
#endif

static const pyattn_kernels *const all_kernels[] = {
#ifdef PYATTN_X86
    &pyattn_kernels_avx512,
    &pyattn_kernels_avx2,
#endif
    &pyattn_kernels_baseline,
};

const pyattn_kernels *pyattn_kernels_by_name(const char *name)
{
    for (size_t i = 0; i < sizeof all_kernels / sizeof all_kernels[0]; i++)
        if (strcmp(all_kernels[i]->name, name) == 0) return all_kernels[i];
    return NULL;
}

/* libgcc's CPUID checks include the OS's XSAVE support for the wider state. */
int pyattn_cpu_supports(const char *name)
{
    if (strcmp(name, "baseline") == 0) return 1;
#ifdef PYATTN_X86
    __builtin_cpu_init();
    if (strcmp(name, "avx2") == 0)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("f16c");
    if (strcmp(name, "avx512") == 0)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
    return 0;
}

int pyattn_openmp_enabled(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int pyattn_max_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

int pyattn_team_size(void)
{
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

void *pyattn_aligned_alloc(size_t nbytes)
{
    void *p = NULL;
    nbytes = pyattn_size_add(nbytes, 63) / 64 * 64;
    if (nbytes == 0 || nbytes == SIZE_MAX / 64 * 64 || posix_memalign(&p, 64, nbytes) != 0)
        return NULL;
    return p;
}

void pyattn_aligned_free(void *p) { free(p); }
