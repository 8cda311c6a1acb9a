"""The optional score modifiers of a call (alignment, windows, ALiBi,
soft-capping, sinks, sequence lengths), validated and put in the kernel's
terms, in the dtype the kernel computes with them."""
import math
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from ._arrays import as_array, compact
from ._validation import representable


@dataclass
class ScoreOptions:
    """The optional score modifiers of a call, in the kernel's terms."""

    # Per-batch values have the batch's shape, as int64 views that may be
    # broadcast (zero strides): a claimed batch costs no memory.
    window: Tuple[int, int]          # (left, right) keys around the diagonal; -1: open
    diag: np.ndarray                 # per batch: row i's diagonal key is i + diag
    alibi: Optional[np.ndarray]      # float64 per head: ALiBi slopes
    softcap: float                   # 0: none
    sinks: Optional[np.ndarray]      # float64 per head: sink logits
    q_lengths: Optional[np.ndarray]  # per batch
    kv_lengths: Optional[np.ndarray]

    def kernel_keywords(self, per_batch):
        """The driver's (attend()'s) keywords for these modifiers; per-batch
        values go through `per_batch`, which picks a launch's batch items.  A
        new modifier is a field above and its keyword here."""
        return dict(window=self.window, softcap=self.softcap, diag=per_batch(self.diag),
                    alibi=self.alibi, sinks=self.sinks, q_lengths=per_batch(self.q_lengths),
                    kv_lengths=per_batch(self.kv_lengths))


ALIGNMENTS = ("top_left", "lower_right")


def _window_side(value, name):
    if value is None:
        return -1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")
    return int(value)


def _check_window(window):
    if window is None:
        return -1, -1
    if isinstance(window, numbers.Integral) and not isinstance(window, bool):
        window = (window, window)
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be an int or a (left, right) pair of ints or None; "
                         f"got {window!r}")
    return (_window_side(window[0], "window's left size"),
            _window_side(window[1], "window's right size"))


def _per_head(values, name, num_heads, dtype):
    """Per-head values as float64 holding exactly their `dtype` (compute)
    roundings, which the kernel and the reference both use."""
    if values is None:
        return None
    arr = as_array(values, name, "an array of real numbers")
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers; got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if arr.shape != (num_heads,):
        raise ValueError(f"{name} must have shape (Hq,) = ({num_heads},), one value per query "
                         f"head; got shape {arr.shape}")
    allow_neginf = name == "sinks"  # a sink of -inf weighs nothing: no sink
    if (np.isnan(arr) | (np.isposinf(arr) if allow_neginf else np.isinf(arr))).any():
        also = " or -inf" if allow_neginf else ""
        raise ValueError(f"{name} must be finite{also}; got {arr}")
    with np.errstate(over="ignore"):
        rounded = arr.astype(dtype)
    if np.isposinf(rounded).any() or (not allow_neginf and np.isinf(rounded).any()):
        # a sink below the range is -inf, which is the limit: it weighs nothing
        raise ValueError(f"{name} = {arr} is outside the range of {np.dtype(dtype)}, the dtype "
                         f"the kernel computes in for these inputs")
    return rounded.astype(np.float64)


def _per_batch_lengths(lengths, name, batch, limit, limit_name):
    """`lengths` as int64 broadcast to `batch`, a view: checked as given, never
    expanded to the batch that it broadcasts to."""
    if lengths is None:
        return None
    arr = as_array(lengths, name, "an array of ints")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers; got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > limit):
        raise ValueError(f"{name} must lie in [0, {limit_name}] = [0, {limit}]; got values "
                         f"from {arr.min()} to {arr.max()}")
    try:
        return np.broadcast_to(compact(arr).astype(np.int64), batch)
    except ValueError:
        raise ValueError(f"{name} of shape {arr.shape} does not broadcast to the batch "
                         f"dimensions {batch}") from None


def prepare_options(prob, alignment="top_left", window=None, alibi_slopes=None, softcap=None,
                    sinks=None, q_lengths=None, kv_lengths=None):
    """Validate the score modifiers of a call whose problem is `prob`."""
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}; got {alignment!r}")
    left, right = _check_window(window)
    if prob.is_causal:
        right = 0
    L, S = prob.q.shape[-2], prob.k.shape[-2]
    # beyond L + S keys a side hides nothing; the kernel's int64 sums stay safe
    left, right = (min(side, L + S) for side in (left, right))
    q_len = _per_batch_lengths(q_lengths, "q_lengths", prob.batch, L, "L")
    kv_len = _per_batch_lengths(kv_lengths, "kv_lengths", prob.batch, S, "S")
    diag = 0
    if alignment == "lower_right":  # each sequence's last query sits on its last key
        # on the lengths' own elements; broadcast to the batch below
        diag = (S if kv_len is None else compact(kv_len)) - (L if q_len is None else compact(q_len))
    if softcap is None:
        softcap = 0.0
    else:
        if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
            raise TypeError("softcap must be a positive number or None, "
                            f"got {type(softcap).__name__}")
        try:
            softcap = float(softcap)
        except OverflowError:  # an int beyond float range
            raise ValueError(f"softcap must be finite, got an integer of "
                             f"{softcap.bit_length()} bits") from None
        if not (math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"softcap must be positive and finite, got {softcap}")
        representable(softcap, "softcap", prob.compute_dtype, positive=True)
    alibi = _per_head(alibi_slopes, "alibi_slopes", prob.num_heads, prob.compute_dtype)
    if alibi is not None and alibi.size:
        # the bias -slope |d| must stay finite at every query-key distance d
        representable(float(np.abs(alibi).max()) * max(L + S, 1),
                      "max |alibi_slopes| * (L + S), the largest ALiBi bias,",
                      prob.compute_dtype)
    return ScoreOptions(
        window=(left, right), diag=np.broadcast_to(np.asarray(diag, np.int64), prob.batch),
        alibi=alibi, softcap=softcap,
        sinks=_per_head(sinks, "sinks", prob.num_heads, prob.compute_dtype),
        q_lengths=q_len, kv_lengths=kv_len,
    )
