/* The registry: which kernel sets this binary holds (best first) and the
 * dtypes they cover, plus the machine and OpenMP facts the Python layer
 * reports.  The choice among the sets is made once, in Python
 * (pyattn/_dispatch.py), from pyattn_kernel_set() and each set's own CPU
 * check. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "pyattn_kernels.h"
#ifdef _OPENMP
#include <omp.h>
#endif

const pyattn_dtype_info pyattn_dtypes[PYATTN_NUM_DTYPES] = {
    [PYATTN_FLOAT32] = {"float32", 4, 4, 0},
    [PYATTN_FLOAT64] = {"float64", 8, 8, 0},
    [PYATTN_FLOAT16] = {"float16", 2, 4, 0},
    [PYATTN_BFLOAT16] = {"bfloat16", 2, 4, 0},
    [PYATTN_INT8] = {"int8", 1, 4, 1},
    [PYATTN_FLOAT8_E4M3FN] = {"float8_e4m3fn", 1, 4, 1},
};

/* setup.py defines PYATTN_KERNEL_SETS as PYATTN_SET(avx512) PYATTN_SET(avx2)
 * ...: one kernels_<isa>.c per entry, best first. */
#ifndef PYATTN_KERNEL_SETS
#error "PYATTN_KERNEL_SETS must list the kernel sets (setup.py defines it)"
#endif
#define PYATTN_SET(isa) extern const pyattn_kernels pyattn_kernels_##isa;
PYATTN_KERNEL_SETS
#undef PYATTN_SET
#define PYATTN_SET(isa) &pyattn_kernels_##isa,
static const pyattn_kernels *const kernel_sets[] = {PYATTN_KERNEL_SETS};
#undef PYATTN_SET

int pyattn_num_kernel_sets(void) { return (int)(sizeof kernel_sets / sizeof kernel_sets[0]); }

const pyattn_kernels *pyattn_kernel_set(int index)
{
    return index >= 0 && index < pyattn_num_kernel_sets() ? kernel_sets[index] : NULL;
}

const pyattn_kernels *pyattn_kernels_by_name(const char *name)
{
    for (int i = 0; i < pyattn_num_kernel_sets(); i++)
        if (strcmp(kernel_sets[i]->name, name) == 0) return kernel_sets[i];
    return NULL;
}

const pyattn_kernels *pyattn_kernels_for_dtype(const pyattn_kernels *set, int dtype)
{
    if (dtype < 0 || dtype >= PYATTN_NUM_DTYPES) return NULL;
    if (set != NULL && set->by_dtype[dtype].attend != NULL) return set;
    int i = 0;
    while (i < pyattn_num_kernel_sets() && kernel_sets[i] != set) i++;
    for (i++; i < pyattn_num_kernel_sets(); i++)
        if (kernel_sets[i]->by_dtype[dtype].attend != NULL && kernel_sets[i]->cpu_supports())
            return kernel_sets[i];
    return NULL;
}

size_t pyattn_physical_memory(void)
{
    static size_t bytes; /* a benign race: every thread computes the same value */
    if (bytes == 0) {
        const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
        bytes = pages > 0 && page > 0 ? pyattn_size_mul((size_t)pages, (size_t)page)
                                      : (size_t)1 << 50;
    }
    return bytes;
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
