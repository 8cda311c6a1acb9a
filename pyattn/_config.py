"""pyattn.show_config(): what this installation will run."""
import platform
import sys

import numpy as np

from . import _attention, _dispatch
from ._version import __version__


def config():
    """The facts show_config() prints, as a dict."""
    return {
        "version": __version__,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "machine": platform.machine(),
        "openmp": _attention.openmp_enabled(),
        "default_threads": _attention.max_threads(),
        "kernel": _dispatch.KERNEL,
        "bf16_products": _attention.has_bf16_products(_dispatch.KERNEL, "float32"),
        # the set that runs quantized K/V (int8 and float8_e4m3fn, enabled
        # together): this one, or the best usable set below it that has them
        "quantized_kernel": _attention.kernel_for_dtype(_dispatch.KERNEL, "int8"),
        "usable_kernels": _dispatch.usable_kernels(),
        "kernel_env_var": _dispatch.ENV_VAR,
    }


def show_config():
    """Print the version, OpenMP status, default thread count and kernel."""
    for key, value in config().items():
        if isinstance(value, list):
            value = ", ".join(value)
        print(f"{key:>16}: {value}")
