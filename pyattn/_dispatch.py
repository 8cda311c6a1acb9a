"""Chooses the kernel implementation once, at import.

The best implementation that is both compiled in and supported by this CPU
wins; ``PYATTN_ISA`` may force a lower one.
"""
import os
import warnings

from . import _attention

ENV_VAR = "PYATTN_ISA"


def usable_kernels():
    """Kernel sets this binary holds (in the registry's order, best first) and
    this CPU can run."""
    return [n for n in _attention.kernel_names() if _attention.cpu_supports(n)]


def _choose():
    usable = usable_kernels()
    requested = os.environ.get(ENV_VAR, "").strip().lower()
    if not requested:
        return usable[0]
    if requested in usable:
        return requested
    warnings.warn(
        f"{ENV_VAR}={requested!r} is not usable here (usable: {', '.join(usable)}); "
        f"using {usable[0]!r}",
        RuntimeWarning,
        stacklevel=3,
    )
    return usable[0]


KERNEL = _choose()
