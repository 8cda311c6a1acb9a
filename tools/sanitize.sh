#!/usr/bin/env bash
# Build pyattn with AddressSanitizer + UndefinedBehaviorSanitizer in a scratch
# copy of the tree and run the test suite under them, on every kernel the CPU
# supports (the tests parametrize over kernels).  Any report fails the run.
# Usage: tools/sanitize.sh [pytest args...]
# Needs gcc and, in the active Python: numpy, Cython, setuptools, the test extras.
# OpenVINO's tests are left out: it dlopens with RTLD_DEEPBIND, which the
# sanitizer runtime cannot serve.
set -euo pipefail
top="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r "$top/pyattn" "$top/csrc" "$top/tests" "$top/examples" "$top/setup.py" "$top/pyproject.toml" "$work/"
rm -f "$work"/pyattn/*.so "$work"/pyattn/_attention.c
cd "$work"
# A fixed small budget for the differential fuzzer (tests/kernel/test_differential_fuzz.py).
export PYATTN_FUZZ_EXAMPLES=10
PYATTN_EXTRA_CFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -O1" \
    python setup.py build_ext --inplace -q
# The Python binary is not instrumented, so the runtimes are preloaded.
# Leak checking is off: CPython's own allocations would drown the report.
# tests/system/test_memory.py is skipped: ASan's shadow memory inflates RSS by design;
# so is tests/dask/test_robustness.py, whose workers run under a memory limit
# that the shadow memory overruns (their nannies kill them: 4 workers died).
# -s: pytest must not capture fd 2, or a report is lost when ASan aborts.
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
    python -m pytest tests -q -s -p no:cacheprovider --ignore=tests/system/test_memory.py \
    --ignore=tests/dask/test_robustness.py \
    -k "not openvino" "$@"
