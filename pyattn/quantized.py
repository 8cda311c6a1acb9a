"""Quantized keys and values: int8 or float8_e4m3fn with one float16 scale
per group of channels (the formats of docs/kv-cache.md), read by the kernels
as they are."""
import numbers

import numpy as np

from . import _attention, reference
from ._arrays import as_array, as_float_array, check_fits, checked_cast, compact, convert_stored
from ._dtypes import check_dtype
from ._validation import cpu_count

__all__ = ["QuantizedKV"]

FORMATS = tuple(reference.LARGEST)  # the storage dtypes' names: int8, float8_e4m3fn
FORMAT_NAMES = "int8 or float8_e4m3fn (with ml_dtypes)"


def default_group_size(dtype, D):
    """Channels per scale unless asked: 32 for int8 (llama.cpp's q8_0) where
    32 divides D, else the whole row (D = 80, as Phi-2's heads); the whole
    row for float8, whose exponent covers the range within it."""
    return 32 if dtype == "int8" and D % 32 == 0 else D

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


def is_float32_rows(x):
    """Whether the quantizer reads `x` as it is (else it gets a float32 copy)."""
    return x.dtype == np.float32 and x.flags.c_contiguous


def quantize_rows(x, data, scales, group_size, starts, counts, name):
    """Quantize x (B, H, n, D), any float dtype, in compiled code to data's
    format: rows t < counts[b] of x[b, h] go to rows starts[b] + t of
    data[b, h] and of scales[b, h] (C-contiguous int8 or float8_e4m3fn, and
    float16 arrays).  `name` is x's argument, for the errors."""
    if x.size == 0:
        return  # no rows
    if not is_float32_rows(x):
        check_fits(x.size, 4, f"{name} as float32 rows for the quantizer (a copy)")
        # finite beyond float32: the narrowing rule (inf is refused below, as non-finite)
        x = checked_cast(x, np.float32, name, inf_allowed=False)
    dtype = data.dtype.name
    threads = cpu_count() if x.size >= PARALLEL_QUANTIZE else 1
    err = _attention.quantize(dtype, x, data.view(np.int8), scales.view(np.uint16), group_size,
                              np.ascontiguousarray(starts, np.int64),
                              np.ascontiguousarray(counts, np.int64), threads)
    if err & 1:
        raise ValueError(f"{name} must be finite to be quantized to {dtype}")
    if err & 2:
        raise ValueError(f"{name} has a group whose scale overflows float16 "
                         f"(|x| > 65504 * {reference.LARGEST[dtype]})")
    if err & 4:
        raise TypeError(f"this build has no {dtype} quantizer (its compiler lacks _Float16)")


def kernel_operands(key, value, q_dtype):
    """(k data, v data, k scales, v scales, (k group, v group)) as the
    kernels read two QuantizedKV of one storage dtype, for a float32 query:
    each row's groups contiguous.  Groups that share one scale (a
    zero-stride last axis) are read as one scale per row; other strided
    groups are copied, by the distinct rows only (broadcast axes stay so)."""
    if not (isinstance(key, QuantizedKV) and isinstance(value, QuantizedKV)):
        raise TypeError(f"key and value must both be pyattn.QuantizedKV or both arrays; got "
                        f"key {type(key).__name__} and value {type(value).__name__}")
    if q_dtype != np.float32:
        raise TypeError(f"query must be float32 with quantized key and value (their "
                        f"kernels compute in float32); got {q_dtype}")
    if key.dtype != value.dtype:
        raise TypeError(f"quantized key and value must share one storage dtype; got key "
                        f"{key.dtype.name} and value {value.dtype.name}")

    def scales_for_kernel(kv, name):
        s = convert_stored(kv.scales, f"{name}.scales")
        if s.shape[-1] > 1 and s.strides[-1] == 0:
            return s[..., :1], kv.shape[-1]
        if s.shape[-1] == 1 or s.strides[-1] == s.itemsize:
            return s, kv.group_size
        rows = compact(s, s.ndim - 1)
        check_fits(rows.size, s.itemsize, f"a copy of {name}.scales with contiguous rows")
        return np.broadcast_to(np.ascontiguousarray(rows), s.shape), kv.group_size

    (k_scales, k_group), (v_scales, v_group) = (scales_for_kernel(kv, name) for kv, name in
                                                ((key, "key"), (value, "value")))
    return key.data, value.data, k_scales, v_scales, (k_group, v_group)


class QuantizedKV:
    """Keys or values stored as int8 or float8_e4m3fn with per-group float16
    scales, for ``key`` and ``value`` of scaled_dot_product_attention (both
    quantized, with a float32 query) and the storage of
    ``KVCache(dtype="int8" | "float8_e4m3fn")``.

    Channel e of row (..., j) is ``float32(data[..., j, e]) *
    float32(scales[..., j, e // group_size])``; the kernels compute exactly
    that, in registers, before each product.

    Parameters
    ----------
    data : int8 or ml_dtypes.float8_e4m3fn array (..., S, D)
        float8 data must hold no NaN (bit patterns 0x7f, 0xff).
    scales : float16 array (..., S, D // group_size), finite and >= 0
    group_size : 32, 64 or D, optional
        Channels per scale; it must divide D.  Default: 32 for int8, D
        (one scale per row) for float8_e4m3fn.

    The arrays are kept as given (no copy) and must not change while a call
    reads them.  ``QuantizedKV.quantize(x)`` makes one from float data.
    """

    __slots__ = ("_data", "_scales", "_group_size")

    def __init__(self, data, scales, group_size=None):
        data = as_array(data, "data", f"an array of {FORMAT_NAMES}")
        scales = as_array(scales, "scales", "a float16 array")
        if data.dtype.name not in FORMATS or data.dtype.itemsize != 1:
            raise TypeError(f"data must be an array of {FORMAT_NAMES}; got dtype {data.dtype}")
        if scales.dtype != np.float16 or not scales.dtype.isnative:
            raise TypeError(f"scales must be a float16 array; got dtype {scales.dtype}")
        if data.ndim < 2 or data.shape[-1] == 0:
            raise ValueError(f"data must have at least 2 dimensions (..., S, D) with D >= 1; "
                             f"got shape {data.shape}")
        D = data.shape[-1]
        if group_size is None:
            group_size = default_group_size(data.dtype.name, D)
        group_size = check_group_size(group_size, D)
        want = data.shape[:-1] + (D // group_size,)
        if scales.shape != want:
            raise ValueError(f"scales must have shape {want}, one per group of {group_size} "
                             f"channels of data {data.shape}; got {scales.shape}")
        # checked on the distinct elements: a broadcast view is never expanded
        distinct = compact(scales)
        if not (np.isfinite(distinct) & (distinct >= 0)).all():
            raise ValueError("scales must be finite and non-negative")
        # the kernels read float8 through float16, which has no room for NaN
        if data.dtype.name == "float8_e4m3fn" and (
                compact(data).view(np.uint8) & 0x7f == 0x7f).any():
            raise ValueError("data must hold no NaN (float8_e4m3fn bits 0x7f, 0xff)")
        self._data, self._scales, self._group_size = data, scales, group_size

    @classmethod
    def _trusted(cls, data, scales, group_size):
        """Views of storage that pyattn itself quantized (a KVCache's): no checks."""
        self = cls.__new__(cls)
        self._data, self._scales, self._group_size = data, scales, group_size
        return self

    @classmethod
    def quantize(cls, x, group_size=None, dtype="int8"):
        """`x` (..., S, D), any float dtype, quantized in compiled code to
        `dtype`, int8 or float8_e4m3fn (as pyattn.reference's quantize_int8
        and quantize_float8_e4m3fn: round half to even, saturated at +-127
        or +-448).  Non-finite values, and groups whose scale overflows
        float16, raise ValueError."""
        dtype = check_dtype(dtype, FORMATS, FORMAT_NAMES)
        x = as_float_array(x, "x", layout="(..., S, D)")
        D = x.shape[-1]
        if D == 0:
            raise ValueError(f"x must have at least one channel; got shape {x.shape}")
        if group_size is None:
            group_size = default_group_size(dtype.name, D)
        group_size = check_group_size(group_size, D)
        copy = 0 if is_float32_rows(x) else 4 * x.size  # the quantizer's float32 rows
        check_fits(x.size * (1 + 2 / group_size) + copy, 1,
                   f"{dtype.name} data and scales of x {x.shape}"
                   + (", with x as float32 rows" if copy else ""))
        data = np.empty(x.shape, dtype)
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

    @property
    def dtype(self):
        """The storage dtype of data: int8 or float8_e4m3fn."""
        return self._data.dtype

    def dequantize(self):
        """float32 keys or values, exactly those the kernels compute with."""
        return reference.dequantize(self._data, self._scales)

    def __repr__(self):
        return (f"QuantizedKV(shape={self.shape}, dtype={self.dtype.name}, "
                f"group_size={self.group_size})")
