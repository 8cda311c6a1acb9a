#!/usr/bin/env bash
# Run the installed pyattn on emulated x86-64 CPUs that lack this machine's
# instruction sets (qemu user mode: Haswell has AVX2 but no AVX-512, Nehalem
# only SSE4.2).  Each must pick the best kernel its CPUID allows, and every
# usable kernel must match the reference: a stray AVX-512 instruction outside
# the avx512 kernels (or an F16C one in the baseline's float8 reads) would
# fault here.  Needs qemu-user (Debian), installed
# when missing and running as root.
set -euo pipefail
if ! command -v qemu-x86_64 >/dev/null; then
    apt-get update -qq && apt-get install -y -qq qemu-user >/dev/null
fi
python_bin="$(python -c 'import os, sys; print(os.path.realpath(sys.executable))')"
# pyattn's folder, and the one of the packages it needs (numpy, ml_dtypes)
site="$(cd / && python -c 'import os, pyattn, ml_dtypes; print(":".join(os.path.dirname(os.path.dirname(m.__file__)) for m in (pyattn, ml_dtypes)))')"
check="$(mktemp --suffix=.py)"
trap 'rm -f "$check"' EXIT
cat > "$check" <<'PY'
import sys
import numpy as np
import pyattn
from pyattn import _dispatch, reference

expected = sys.argv[1]
assert _dispatch.KERNEL == expected, (_dispatch.KERNEL, expected)
rng = np.random.default_rng(0)
for kernel in _dispatch.usable_kernels():
    _dispatch.KERNEL = kernel
    for dtype in (np.float32, np.float64):
        q = rng.standard_normal((2, 3, 37, 16)).astype(dtype)
        k = rng.standard_normal((2, 3, 70, 16)).astype(dtype)
        v = rng.standard_normal((2, 3, 70, 8)).astype(dtype)
        mask = rng.random((37, 70)) > 0.3
        for kwargs in ({}, {"is_causal": True}, {"attn_mask": mask}):
            got = pyattn.scaled_dot_product_attention(q, k, v, **kwargs)
            want = reference.scaled_dot_product_attention(q, k, v, **kwargs)
            assert np.allclose(got, want, rtol=1e-4, atol=1e-5), (kernel, dtype, kwargs)
    # quantized K/V (decode and a few-row block), against the reference on their dequantized values
    q = rng.standard_normal((2, 6, 3, 64)).astype(np.float32)
    for fmt in ("int8", "float8_e4m3fn"):
        kq, vq = (pyattn.QuantizedKV.quantize(rng.standard_normal((2, 3, 70, 64)), dtype=fmt)
                  for _ in "kv")
        for rows in (q[:, :, :1], q):
            got = pyattn.scaled_dot_product_attention(rows, kq, vq, enable_gqa=True)
            want = reference.scaled_dot_product_attention(rows, kq.dequantize(), vq.dequantize(),
                                                          enable_gqa=True)
            assert np.allclose(got, want, rtol=1e-4, atol=1e-5), (kernel, fmt, rows.shape)
print(f"chose {expected}; usable {', '.join(_dispatch.usable_kernels())}: all match the reference")
PY
for pair in Haswell-v4:avx2 Nehalem:baseline; do
    cpu="${pair%%:*}" kernel="${pair##*:}"
    echo "qemu -cpu $cpu:"
    (cd / && PYTHONPATH="$site" qemu-x86_64 -cpu "$cpu" "$python_bin" "$check" "$kernel")
done
