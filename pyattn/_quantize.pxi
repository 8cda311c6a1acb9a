# Included by _attention.pyx: the compiled quantizer (csrc/quantize.c) over
# the (batch, head) rows of a call, in a prange without the GIL.

from libc.stdint cimport int8_t, uint16_t


def quantize(str dtype, const float[:, :, :, ::1] x, int8_t[:, :, :, ::1] q,
             uint16_t[:, :, :, ::1] scales, int64_t group, const int64_t[::1] starts,
             const int64_t[::1] counts, int num_threads=1):
    """Quantize x (B, H, n, D) to the format `dtype` ("int8" or
    "float8_e4m3fn", docs/kv-cache.md) in compiled code: rows t < counts[b]
    of x[b, h] go to rows starts[b] + t of q[b, h] (B, H, capacity, D, the
    format's bytes) and of scales[b, h] (float16 bits, D / group per row),
    over (b, h) on at most num_threads threads.  Returns 0, or the C
    quantizer's error codes c of the rows that failed as bits 1 << (c - 1)
    (1: non-finite, 2: a scale overflows float16, 4: no float16)."""
    if dtype not in KV_ONLY_DTYPES:
        raise ValueError(f"quantize: no format {dtype!r}")
    cdef int fmt = DTYPES.index(dtype)
    cdef int64_t B = x.shape[0], H = x.shape[1], D = x.shape[3], item, b, h
    if (q.shape[0] != B or q.shape[1] != H or q.shape[3] != D or scales.shape[0] != B
            or scales.shape[1] != H or scales.shape[2] != q.shape[2] or group < 1
            or D % group or scales.shape[3] != D // group
            or starts.shape[0] != B or counts.shape[0] != B):
        raise ValueError("quantize: shapes do not agree")
    for b in range(B):
        if not (0 <= counts[b] <= x.shape[2] and 0 <= starts[b] <= q.shape[2] - counts[b]):
            raise ValueError("quantize: rows out of range")
    cdef int err = 0, rc = 0
    if B * H == 0 or D == 0:
        return 0
    with nogil:
        for item in prange(B * H, num_threads=num_threads, schedule="static"):
            b = item // H
            h = item % H
            if counts[b] > 0:
                rc = pyattn_quantize(fmt, &x[b, h, 0, 0], counts[b], D, group,
                                     &q[b, h, starts[b], 0], &scales[b, h, starts[b], 0])
                err |= (1 << rc) >> 1  # a reduction: every thread's failures
    return err
