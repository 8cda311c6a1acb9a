"""Build the pyattn extension: Cython driver + C kernels, with OpenMP if the
compiler has it.  No tuning for the build machine: each ISA's kernels select
their own target in their source file, and the choice between them is made at run time."""
import os
import sys
import tempfile
import textwrap

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


CSRC = [
    "csrc/dispatch.c",
    "csrc/kernels_baseline.c",
    "csrc/kernels_avx2.c",
    "csrc/kernels_avx512.c",
]
extra_cflags = os.environ.get("PYATTN_EXTRA_CFLAGS", "").split()

extensions = [
    Extension(
        "pyattn._attention",
        sources=["pyattn/_attention.pyx", *CSRC],
        include_dirs=["csrc"],
        depends=["csrc/pyattn_kernels.h", "csrc/attention_body.h", "csrc/kernel_instance.h"],
        extra_compile_args=["-O3", "-std=gnu11", *extra_cflags],
        extra_link_args=[*extra_cflags],
    )
]

setup(
    ext_modules=cythonize(extensions, compiler_directives={"language_level": "3"}),
    cmdclass={"build_ext": BuildExt},
)
