/* Which kernel implementations this binary holds and which this CPU can run,
 * plus the OpenMP facts the Python layer reports.  The choice itself is made
 * once, in Python (pyattn/_dispatch.py). */
#include <string.h>
#include "pyattn_kernels.h"
#ifdef _OPENMP
#include <omp.h>
#endif

static const pyattn_kernels *const all_kernels[] = {
    &pyattn_kernels_baseline,
};

const pyattn_kernels *pyattn_kernels_by_name(const char *name)
{
    for (size_t i = 0; i < sizeof all_kernels / sizeof all_kernels[0]; i++)
        if (strcmp(all_kernels[i]->name, name) == 0) return all_kernels[i];
    return NULL;
}

int pyattn_cpu_supports(const char *name)
{
    return strcmp(name, "baseline") == 0;
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
