"""A key/value cache for autoregressive decoding, and attention against it."""
import copy
import inspect
import numbers
import threading

import numpy as np

from ._arrays import as_array, as_float_array, check_fits, convert_stored, held_array
from ._dtypes import KERNEL_DTYPE_NAMES, check_dtype
from ._validation import check_size
from .functional import scaled_dot_product_attention
from .quantized import FORMATS, QuantizedKV, check_group_size, default_group_size, quantize_rows

__all__ = ["KVCache", "decode_attention"]

INITIAL_CAPACITY = 256  # positions; storage then doubles (amortised O(1) appends)


class KVCache:
    """Keys and values of `batch` sequences, appended position by position.

    Storage is (batch, num_kv_heads, capacity, head_dim) per tensor, so every
    head's keys are contiguous rows; it grows by doubling (a full copy only
    then, amortised O(1) per position) up to ``max_len`` when given.  Each
    sequence has its own length.

    Thread safety: one cache may be shared by several Python threads.  The
    methods that change it (append, truncate, reset) take the cache's lock,
    so appends made at once all land: each as one block of positions, in
    some order, a thread's own appends in the order it made them.  ``keys``,
    ``values`` and decode_attention take the lock too, so they see the cache
    between two changes, never during one; decode_attention holds it until
    its kernel is done (changes from other threads wait).  ``keys`` and
    ``values`` are views of the storage, which a later change may overwrite:
    copy them for a snapshot.  ``lengths`` is replaced, never modified in
    place, by each change.

    Parameters
    ----------
    batch, num_kv_heads, head_dim : int
    max_len : int, optional
        Refuse to grow beyond this many positions (and never allocate more).
    dtype : float32, float64, float16, bfloat16, int8 or float8_e4m3fn
        int8 and float8_e4m3fn quantize keys and values as they are appended
        (compiled code, docs/kv-cache.md): one byte per channel and one
        float16 scale per group of ``group_size`` channels, about 0.27x
        (int8) and 0.25x (float8) the float32 cache at head_dim 128;
        queries are then float32.  bfloat16 and float8 need ml_dtypes.
    value_dim : int, optional
        Width of the values (default head_dim).
    group_size : 32, 64 or the width, optional
        Quantized caches only: channels per scale (default 32 for int8, the
        whole row for float8_e4m3fn); it must divide head_dim and value_dim.
    """

    def __init__(self, batch, num_kv_heads, head_dim, max_len=None, dtype=np.float32,
                 value_dim=None, group_size=None):
        self.batch = check_size(batch, "batch")
        self.num_kv_heads = check_size(num_kv_heads, "num_kv_heads")
        self.head_dim = check_size(head_dim, "head_dim")
        self.value_dim = self.head_dim if value_dim is None else check_size(value_dim, "value_dim")
        self.max_len = None if max_len is None else check_size(max_len, "max_len")
        self.dtype = check_dtype(dtype, KERNEL_DTYPE_NAMES + FORMATS,
                                 "float32, float64, float16, bfloat16, int8 or float8_e4m3fn "
                                 "(bfloat16 and float8 with ml_dtypes)")
        self.group_size = None
        if self.quantized:
            default = default_group_size(self.dtype.name, self.head_dim)
            if group_size is None and (self.value_dim % default
                                       or default not in (32, 64, self.value_dim)):
                raise ValueError(f"{self.dtype.name} cache: the default group_size, {default} "
                                 f"for head_dim {self.head_dim}, does not suit value_dim "
                                 f"({self.value_dim}): pass group_size (32 or 64, dividing both)")
            self.group_size = check_group_size(
                default if group_size is None else group_size, self.head_dim)
            check_group_size(self.group_size, self.value_dim, "group_size")
        elif group_size is not None:
            raise ValueError(f"group_size is for quantized (int8, float8_e4m3fn) caches; this "
                             f"one stores {self.dtype.name}")
        self._lock = threading.Lock()
        self._k = self._v = self._ks = self._vs = None
        # storage first: its size check also covers the lengths, (batch,) int64
        self._allocate(min(INITIAL_CAPACITY, self.max_len or INITIAL_CAPACITY), "the KVCache")
        self.lengths = np.zeros(self.batch, dtype=np.int64)

    # A lock cannot be pickled or copied: a copy (pickle, copy.deepcopy) gets its own.
    def __getstate__(self):
        with self._lock:
            state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __copy__(self):
        # a shallow copy would share the storage but not the lock: appends to
        # either would overwrite the other's positions, so copies are whole
        return copy.deepcopy(self)

    @property
    def quantized(self):
        """Whether keys and values are stored quantized (int8, float8_e4m3fn) with scales."""
        return self.dtype.name in FORMATS

    def _allocate(self, capacity, why):
        """Storage for `capacity` positions, checked to fit first; `why` says
        what asked for them, for the error."""
        shape = (self.batch, self.num_kv_heads, capacity)
        widths = [self.head_dim, self.value_dim]
        itemsizes = [self.dtype.itemsize] * 2
        if self.quantized:  # and their float16 scales
            widths += [w // self.group_size for w in widths]
            itemsizes += [2, 2]
        check_fits(self.batch * self.num_kv_heads * capacity
                   * sum(w * i for w, i in zip(widths, itemsizes)), 1,
                   f"{why}: keys and values for {capacity} positions (batch={self.batch}, "
                   f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                   f"value_dim={self.value_dim})")
        # zeros (calloc: pages appear as they are written): never-written
        # storage in the keys/values views reads as zeros, not garbage
        new = [np.zeros(shape + (w,), dtype=np.float16 if i > 1 else self.dtype)
               for i, w in enumerate(widths)]
        old = [a for a in (self._k, self._v, self._ks, self._vs) if a is not None]
        n = int(self.lengths.max()) if old else 0
        for a, b in zip(new, old):  # keep what is there (up to the longest sequence)
            a[:, :, :n] = b[:, :, :n]
        self._k, self._v = new[:2]
        if self.quantized:
            self._ks, self._vs = new[2:]

    def _filled(self):
        """(keys view, values view, lengths) of one moment, the views
        QuantizedKV for quantized caches; the caller holds the lock."""
        n = int(self.lengths.max(initial=0))
        if self.quantized:
            return (QuantizedKV._trusted(self._k[:, :, :n], self._ks[:, :, :n], self.group_size),
                    QuantizedKV._trusted(self._v[:, :, :n], self._vs[:, :, :n], self.group_size),
                    self.lengths)
        return self._k[:, :, :n], self._v[:, :, :n], self.lengths

    @property
    def capacity(self):
        return self._k.shape[2]

    @property
    def nbytes(self):
        """Bytes of storage the cache holds (all its capacity, scales included)."""
        return sum(a.nbytes for a in (self._k, self._v, self._ks, self._vs) if a is not None)

    def dequantize(self):
        """(keys, values) of a quantized cache as float32 arrays (batch,
        num_kv_heads, max(lengths), dim): exactly what the kernels compute
        with (positions past a sequence's length included)."""
        if not self.quantized:
            raise TypeError(f"dequantize() is for quantized caches; this one stores "
                            f"{self.dtype.name} (use keys and values)")
        with self._lock:
            keys, values, _ = self._filled()
            return keys.dequantize(), values.dequantize()

    @property
    def keys(self):
        """View (batch, num_kv_heads, max(lengths), head_dim); sequence b's
        valid keys are the first lengths[b].  A QuantizedKV of views for a
        quantized cache."""
        with self._lock:
            return self._filled()[0]

    @property
    def values(self):
        """View (batch, num_kv_heads, max(lengths), value_dim), as keys."""
        with self._lock:
            return self._filled()[1]

    def append(self, k_new, v_new, lengths=None):
        """Append n positions to every sequence: k_new (batch, num_kv_heads, n,
        head_dim), v_new (..., value_dim).  With `lengths` (batch,) ints <= n,
        sequence b takes only its first lengths[b] new positions."""
        # The arguments are checked before the lock: only the cache's state needs it.
        k_new, v_new = self._checked_new(k_new, v_new)
        n = k_new.shape[2]
        if lengths is None:
            counts = np.full(self.batch, n, dtype=np.int64)
        else:
            counts = as_array(lengths, "lengths", f"{self.batch} ints")
            if counts.dtype.kind not in "iu" or counts.shape != (self.batch,):
                raise ValueError(f"lengths must be {self.batch} ints, one per sequence; "
                                 f"got {counts.dtype} of shape {counts.shape}")
            if counts.size and (counts.min() < 0 or counts.max() > n):
                raise ValueError(f"lengths must lie in [0, n] = [0, {n}]; got {counts}")
            counts = counts.astype(np.int64)
        # the rows each sequence takes, in the cache's dtype (quantized caches
        # quantize float32), before the lock: a finite value the cache cannot
        # hold is refused, in those rows only
        given = np.float32 if self.quantized else self.dtype
        rows = [(convert_stored(k_new[b, :, :c], "k_new", given),
                 convert_stored(v_new[b, :, :c], "v_new", given)) for b, c in enumerate(counts)]
        with self._lock:  # from reading the lengths to replacing them: one step
            new_lengths = self.lengths + counts
            needed = int(new_lengths.max(initial=0))
            if self.max_len is not None and needed > self.max_len:
                raise ValueError(f"the cache holds at most max_len = {self.max_len} positions; "
                                 f"appending would make {needed}")
            if needed > self.capacity:
                grown = max(needed, 2 * self.capacity)
                self._allocate(grown if self.max_len is None else min(grown, self.max_len),
                               f"appending n = {n} positions (k_new, v_new)")
            for b, (k_rows, v_rows) in enumerate(rows):
                start, c = self.lengths[b:b + 1], int(counts[b])
                if self.quantized:  # compiled, over heads; errors before lengths move
                    one = slice(b, b + 1)
                    quantize_rows(k_rows[None], self._k[one], self._ks[one], self.group_size,
                                  start, counts[one], "k_new")
                    quantize_rows(v_rows[None], self._v[one], self._vs[one], self.group_size,
                                  start, counts[one], "v_new")
                else:
                    self._k[b, :, int(start[0]):int(start[0]) + c] = k_rows
                    self._v[b, :, int(start[0]):int(start[0]) + c] = v_rows
            self.lengths = new_lengths

    def reset(self):
        """Forget every position (the storage is kept)."""
        with self._lock:
            self.lengths = np.zeros(self.batch, dtype=np.int64)

    def _checked_new(self, k_new, v_new):
        """k_new and v_new of an append as float arrays of this cache's shapes
        (also for pyattn.dask.ShardedKVCache, which splits them)."""
        k_new = as_float_array(k_new, "k_new", min_ndim=4,
                               layout="(batch, num_kv_heads, n, head_dim)")
        v_new = as_float_array(v_new, "v_new", min_ndim=4,
                               layout="(batch, num_kv_heads, n, value_dim)")
        want_k = (self.batch, self.num_kv_heads, k_new.shape[2], self.head_dim)
        want_v = want_k[:3] + (self.value_dim,)
        if k_new.shape != want_k or v_new.shape != want_v:
            raise ValueError(f"k_new and v_new must have shapes {want_k} and {want_v} "
                             f"(batch, num_kv_heads, n, dim); got {k_new.shape} and {v_new.shape}")
        return k_new, v_new

    def truncate(self, n):
        """Keep at most the first n positions of every sequence (n an int, or
        one int per sequence)."""
        if isinstance(n, numbers.Integral) and not isinstance(n, bool):
            # into int64: beyond every length keeps them all, below 0 is refused below
            limit = np.int64(max(-1, min(int(n), np.iinfo(np.int64).max)))
        else:
            limit = as_array(n, "n", f"an int or {self.batch} ints")
        if limit.dtype.kind not in "iu":
            raise TypeError(f"n must be an int or {self.batch} ints; got {n!r}")
        if limit.ndim and limit.shape != (self.batch,):
            raise ValueError(f"n must be an int or {self.batch} ints; got shape {limit.shape}")
        if (limit < 0).any():
            raise ValueError(f"n must be non-negative; got {n!r}")
        with self._lock:
            self.lengths = np.minimum(self.lengths, limit).astype(np.int64)

    def __repr__(self):
        with self._lock:
            return (f"KVCache(batch={self.batch}, num_kv_heads={self.num_kv_heads}, "
                    f"head_dim={self.head_dim}, lengths={self.lengths.tolist()}, "
                    f"capacity={self.capacity}, dtype={self.dtype.name}"
                    + (f", group_size={self.group_size})" if self.quantized else ")"))


# What decode_attention sets itself, and what it passes on as the caller gave it.
_DECODE_SETS = ("is_causal", "alignment", "enable_gqa", "kv_lengths")
_DECODE_PASSES = frozenset(inspect.signature(scaled_dot_product_attention).parameters) - {
    "query", "key", "value", *_DECODE_SETS}


def _check_decode_keywords(modifiers):
    for name in modifiers:
        if name in _DECODE_SETS:
            raise TypeError(f"decode_attention sets {name} itself (causal, aligned lower-right "
                            "to each sequence's end, every query head against the cache's "
                            "key/value heads, the cache's lengths); do not pass it")
        if name not in _DECODE_PASSES:
            raise TypeError(f"decode_attention() got an unexpected keyword argument {name!r}")


def decode_attention(query, cache, *, q_lengths=None, scale=None, num_threads=None, **modifiers):
    """Attend new queries to everything in `cache`, causally aligned to the
    end of each sequence (lower-right): query i of L sees the keys up to
    position lengths[b] - L + i, so append the new keys and values first.

    query : (batch, num_heads, L, head_dim), float32 for a quantized cache;
        num_heads a multiple of the cache's num_kv_heads (GQA/MQA: each KV
        head is read once for all the query heads that share it when L == 1).
    q_lengths : (batch,) ints, optional
        Sequences that appended fewer than L positions have their queries
        first; the rest are padding (zeros out).
    Other keywords (window, alibi_slopes, softcap, sinks, return_lse, out)
    are those of scaled_dot_product_attention.

    The cache stays locked until the result is computed: another thread's
    append or truncate waits rather than rewrite the keys being read.
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a pyattn.KVCache, got {type(cache).__name__}")
    _check_decode_keywords(modifiers)
    query = held_array(query, "query")  # converted once: what is checked is what is read
    q = as_float_array(query, "query", min_ndim=4, layout="(batch, num_heads, L, head_dim)")
    if q.ndim != 4 or q.shape[0] != cache.batch or q.shape[-1] != cache.head_dim:
        raise ValueError(f"query must have shape (batch={cache.batch}, num_heads, L, "
                         f"head_dim={cache.head_dim}); got {q.shape}")
    with cache._lock:
        keys, values, lengths = cache._filled()
        if lengths.size and (lengths == keys.shape[2]).all():
            lengths = None  # every sequence fills the view: the common call's fast path
        return scaled_dot_product_attention(  # the query as given: out is checked against it
            query, keys, values, is_causal=True, alignment="lower_right", scale=scale,
            enable_gqa=True, kv_lengths=lengths, q_lengths=q_lengths,
            num_threads=num_threads, **modifiers)
