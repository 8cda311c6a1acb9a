"""Build the pyattn extension: Cython driver + C kernels, with OpenMP if the
compiler has it.  No tuning for the build machine: each ISA's kernels select
their own target in their source file, and the choice between them is made at run time."""
import glob
import os
import platform
import sys
import tempfile
import textwrap

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_PROBE = textwrap.dedent(
    """
    #include <omp.h>
    int main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }
    """
)


def compiler_has_openmp(compiler):
    """Compile and link a tiny OpenMP program; True when both succeed."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(OPENMP_PROBE)
        try:
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=["-fopenmp"])
            compiler.link_executable(objs, os.path.join(tmp, "probe"),
                                     extra_postargs=["-fopenmp"])
        except Exception:
            return False
    return True


class BuildExt(build_ext):
    def build_extensions(self):
        if os.environ.get("PYATTN_DISABLE_OPENMP") != "1" and compiler_has_openmp(self.compiler):
            for ext in self.extensions:
                ext.extra_compile_args.append("-fopenmp")
                ext.extra_link_args.append("-fopenmp")
        else:
            msg = ("pyattn: OpenMP not available (or PYATTN_DISABLE_OPENMP=1); "
                   "building a SERIAL extension: num_threads will be ignored")
            sys.stderr.write("\n" + "*" * len(msg) + "\n" + msg + "\n" + "*" * len(msg) + "\n\n")
            self.warn(msg)
        super().build_extensions()


# The kernel sets, best first: one csrc/kernels_<isa>.c each (a new ISA is one
# file plus its name here).  The registry (csrc/registry.c) lists them in this
# order, and pyattn picks the first one the CPU supports.
X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
KERNEL_SETS = ["amx", "avx512_bf16", "avx512", "avx2", "baseline"] if X86 else ["baseline"]
CSRC = ["csrc/registry.c", "csrc/quantize.c", *(f"csrc/kernels_{isa}.c" for isa in KERNEL_SETS)]
extra_cflags = os.environ.get("PYATTN_EXTRA_CFLAGS", "").split()

extensions = [
    Extension(
        "pyattn._attention",
        sources=["pyattn/_attention.pyx", *CSRC],
        include_dirs=["csrc", numpy.get_include()],
        define_macros=[("PYATTN_KERNEL_SETS", "".join(f"PYATTN_SET({isa})" for isa in KERNEL_SETS)),
                       ("NPY_NO_DEPRECATED_API", "NPY_1_22_API_VERSION")],
        depends=glob.glob("csrc/*.h") + glob.glob("pyattn/*.pxi") + ["pyattn/_kernels.pxd"],
        extra_compile_args=["-O3", "-std=gnu11", *extra_cflags],
        extra_link_args=[*extra_cflags],
    )
]

setup(
    ext_modules=cythonize(extensions, compiler_directives={"language_level": "3"}),
    cmdclass={"build_ext": BuildExt},
)
