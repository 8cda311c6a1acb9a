"""Quantized keys and values: int8 with one float16 scale per group of
channels (the format of docs/kv-cache.md), read by the kernels as they are."""
import numbers

import numpy as np

from . import _attention
from ._validation import as_array, as_float_array, check_fits, cpu_count

__all__ = ["QuantizedKV"]

# quantizing fewer elements than this runs on one thread (one token of a
# decode step: 32 heads x 128 channels cost microseconds)
PARALLEL_QUANTIZE = 1 << 20


def check_group_size(group_size, D, name="group_size"):
    """`group_size` as an int: 32, 64 or the whole row D, dividing D."""
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
        raise TypeError(f"{name} must be an int (32, 64 or D = {D}); got {group_size!r}")
    if group_size not in (32, 64, D) or D % group_size:
        raise ValueError(f"{name} must be 32, 64 or D = {D}, and divide D; got {group_size}")
    return int(group_size)


def quantize_rows(x, data, scales, group_size, starts, counts, name):
    """Quantize x (B, H, n, D), any float dtype, in compiled code: rows
    t < counts[b] of x[b, h] go to rows starts[b] + t of data[b, h] and of
    scales[b, h] (C-contiguous int8 and float16 arrays).  `name` is x's
    argument, for the errors."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    threads = cpu_count() if x.size >= PARALLEL_QUANTIZE else 1
    err = _attention.quantize_int8(x, data, scales.view(np.uint16), group_size,
                                   np.ascontiguousarray(starts, np.int64),
                                   np.ascontiguousarray(counts, np.int64), threads)
    if err & 1:
        raise ValueError(f"{name} must be finite to be quantized to int8")
    if err & 2:
        raise ValueError(f"{name} has a group whose scale overflows float16 "
                         f"(|x| > 65504 * 127)")
    if err & 4:
        raise TypeError("this build has no int8 quantizer (its compiler lacks _Float16)")


class QuantizedKV:
    """Keys or values stored as int8 with per-group float16 scales, for
    ``key`` and ``value`` of scaled_dot_product_attention (both quantized,
    with a float32 query) and the storage of ``KVCache(dtype="int8")``.

    Channel e of row (..., j) is ``float32(data[..., j, e]) *
    float32(scales[..., j, e // group_size])``; the kernels compute exactly
    that, in registers, before each product.

    Parameters
    ----------
    data : int8 array (..., S, D)
    scales : float16 array (..., S, D // group_size), finite and >= 0
    group_size : 32, 64 or D
        Channels per scale; it must divide D.

    The arrays are kept as given (no copy) and must not change while a call
    reads them.  ``QuantizedKV.quantize(x)`` makes one from float data.
    """

    __slots__ = ("_data", "_scales", "_group_size")

    def __init__(self, data, scales, group_size=32):
        data = as_array(data, "data", "an int8 array")
        scales = as_array(scales, "scales", "a float16 array")
        if data.dtype != np.int8:
            raise TypeError(f"data must be an int8 array; got dtype {data.dtype}")
        if scales.dtype != np.float16 or not scales.dtype.isnative:
            raise TypeError(f"scales must be a float16 array; got dtype {scales.dtype}")
        if data.ndim < 2 or data.shape[-1] == 0:
            raise ValueError(f"data must have at least 2 dimensions (..., S, D) with D >= 1; "
                             f"got shape {data.shape}")
        D = data.shape[-1]
        group_size = check_group_size(group_size, D)
        want = data.shape[:-1] + (D // group_size,)
        if scales.shape != want:
            raise ValueError(f"scales must have shape {want}, one per group of {group_size} "
                             f"channels of data {data.shape}; got {scales.shape}")
        if not (np.isfinite(scales) & (scales >= 0)).all():
            raise ValueError("scales must be finite and non-negative")
        self._data, self._scales, self._group_size = data, scales, group_size

    @classmethod
    def _trusted(cls, data, scales, group_size):
        """Views of storage that pyattn itself quantized (a KVCache's): no checks."""
        self = cls.__new__(cls)
        self._data, self._scales, self._group_size = data, scales, group_size
        return self

    @classmethod
    def quantize(cls, x, group_size=32):
        """`x` (..., S, D), any float dtype, quantized in compiled code (as
        pyattn.reference.quantize_int8: round half to even, clipped to
        +-127).  Non-finite values, and groups whose scale overflows float16,
        raise ValueError."""
        x = as_float_array(x, "x", layout="(..., S, D)")
        D = x.shape[-1]
        if D == 0:
            raise ValueError(f"x must have at least one channel; got shape {x.shape}")
        group_size = check_group_size(group_size, D)
        check_fits(x.size * (1 + 2 / group_size), 1, f"int8 data and scales of x {x.shape}")
        data = np.empty(x.shape, np.int8)
        scales = np.empty(x.shape[:-1] + (D // group_size,), np.float16)
        rows = x.size // D
        quantize_rows(x.reshape(1, 1, rows, D), data.reshape(1, 1, rows, D),
                      scales.reshape(1, 1, rows, D // group_size), group_size, [0], [rows], "x")
        return cls._trusted(data, scales, group_size)

    @property
    def data(self):
        return self._data

    @property
    def scales(self):
        return self._scales

    @property
    def group_size(self):
        return self._group_size

    @property
    def shape(self):
        """The shape of the (dequantized) keys or values: data's."""
        return self._data.shape

    @property
    def nbytes(self):
        return self._data.nbytes + self._scales.nbytes

    def dequantize(self):
        """float32 keys or values, exactly those the kernels compute with."""
        groups = self._data.reshape(self._scales.shape + (self._group_size,))
        out = groups.astype(np.float32) * self._scales.astype(np.float32)[..., None]
        return out.reshape(self._data.shape)

    def __repr__(self):
        return f"QuantizedKV(shape={self.shape}, group_size={self.group_size})"
