"""The kernels' own building blocks, on every kernel this CPU can run."""
import numpy as np
import pytest

from pyattn import _attention, _dispatch


@pytest.mark.parametrize("kernel", _dispatch.usable_kernels())
@pytest.mark.parametrize("dtype, lowest", [(np.float32, -126.0), (np.float64, -1022.0)])
def test_vectorised_exp2_is_within_2_ulp(kernel, dtype, lowest):
    """The softmax's 2^x over its whole domain (x <= 8, lazy rescaling), against
    long double."""
    rng = np.random.default_rng(1)
    x = np.concatenate([np.linspace(lowest, 8, 400_001), -rng.random(100_003) * 4,
                        [0.0, -0.5, 0.5 - 1, -1e-30, lowest]]).astype(dtype)
    y = np.empty_like(x)
    _attention.kernel_exp2(kernel, x, y)
    exact = np.exp2(x.astype(np.longdouble))
    ulps = np.abs(y - exact) / np.spacing(exact.astype(dtype)).astype(np.longdouble)
    assert float(ulps.max()) <= 2.0


@pytest.mark.parametrize("kernel", _dispatch.usable_kernels())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vectorised_exp2_special_values(kernel, dtype):
    x = np.array([-np.inf, np.nan, 0.0, -5000.0, -1e30, -3.0], dtype)
    y = np.empty_like(x)
    _attention.kernel_exp2(kernel, x, y)
    assert y[0] == 0 and np.isnan(y[1]) and y[2] == 1  # masked -> exactly 0
    assert y[3] == 0 and y[4] == 0 and y[5] == 0.125  # underflow flushes to 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_avx512_exp2_gives_avx2s_bits(dtype):
    """AVX-512's 2^x (VRNDSCALE and VSCALEF) computes the same n, fraction and
    polynomial as the generic one (FMAs on both), so the same bits, flushes
    and NaNs included."""
    usable = _dispatch.usable_kernels()
    wide = [k for k in usable if k.startswith("avx512") or k == "amx"]
    if "avx2" not in usable or not wide:
        pytest.skip(f"needs avx2 and an AVX-512 set; usable: {', '.join(usable)}")
    lowest = float(np.finfo(dtype).minexp) - 3
    special = [-np.inf, np.nan, -0.0, 0.5, -0.5, lowest + 3.5, lowest + 2.5]
    x = np.concatenate([np.linspace(lowest, 8, 200_001), special]).astype(dtype)
    want = np.empty_like(x)
    _attention.kernel_exp2("avx2", x, want)
    for kernel in wide:
        got = np.empty_like(x)
        _attention.kernel_exp2(kernel, x, got)
        assert np.array_equal(got.view(f"u{x.itemsize}"), want.view(f"u{x.itemsize}")), kernel
