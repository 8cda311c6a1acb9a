"""Differential fuzzer: adversarial calls, each run
through pyattn and through its NumPy oracle pyattn.reference with the same
arguments, on every kernel this machine can run.

test_fuzz.py checks agreement on well-behaved inputs; this file goes after
the corners: sizes 0, 1 and odd on every axis and on each side of a
broadcast; zero, negative and odd strides, unaligned data, big-endian and
read-only arrays (q, k, v and the mask); float32/64, float16, bfloat16;
planted extremes (+-finfo.max, subnormals, +-inf, NaN, 0); bool and additive
masks (finfo.min on whole rows, -inf, large values, broadcast); extreme scale,
softcap, ALiBi slopes and sinks; causality, windows, lengths, return_lse and
1 or 2 threads.

On every example either both raise (the same ValueError or TypeError, with a
message naming an argument) or both return, and then (see check_call):

- same shape (NumPy's broadcasting, checked against our own rule) and dtype;
- NaNs in the same places and the same infinities, in output and logsumexp;
- finite values close: helpers.assert_close's rule with helpers.tolerance,
  the score bound taken per row (Helpers.score_bound's Cauchy-Schwarz bound
  plus the mask, ALiBi and sink magnitudes);
- every finite output within the convex hull of the values (and 0);
- a row with no key taking part (False, -inf, window, kv_lengths) is zeros,
  its logsumexp -inf (or the sink); a q_lengths padding row is zeros;
- no NaN in a row whose inputs are all finite and do not overflow, whatever
  the parameters (one that does not fit the compute dtype must be refused
  with a ValueError naming it, or computed without NaN).

Legitimately ill-conditioned places are excluded from some of these checks
only; each exclusion is computed per row or per element in `Analysis`, with
the reason next to it.

The deterministic tests at the end, (a)-(h), pin known hard inputs: zero-stride
and claimed-huge sizes, zero heads, finfo.min masks, huge softcaps and ALiBi
slopes, sinks on rows with no key, and misaligned or big-endian broadcasts.
"""
import math
import os
import re
import textwrap
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import SDPA_IMPLS, USABLE_KERNELS, using_kernel

import pyattn
from pyattn import _attention, _dispatch
from pyattn import reference as ref

# The example budget, PYATTN_FUZZ_EXAMPLES: Hypothesis examples per fuzz test
# and kernel.  The default, 100, keeps this file well under a minute on 2
# cores with three kernels, inside CI's time; the examples are drawn
# derandomised (the same every run).  tools/sanitize.sh sets a small fixed
# budget; run 100x the default (PYATTN_FUZZ_EXAMPLES=10000) after changing the
# kernels, the planner or input validation.
FUZZ_EXAMPLES = int(os.environ.get("PYATTN_FUZZ_EXAMPLES", "100"))

FUZZ = settings(
    max_examples=FUZZ_EXAMPLES, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much, HealthCheck.large_base_example],
)

KERNELS = USABLE_KERNELS
BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), BF16]
DTYPE_IDS = [d.name for d in DTYPES]

ARGUMENTS = ("query", "key", "value", "attn_mask", "is_causal", "scale", "enable_gqa", "out",
             "num_threads", "alignment", "window", "alibi_slopes", "softcap", "sinks",
             "q_lengths", "kv_lengths", "return_lse")
NAMES_AN_ARGUMENT = re.compile(r"\b(" + "|".join(ARGUMENTS) + r")\b")


def native(dtype):
    dtype = np.dtype(dtype)
    return dtype if dtype.isnative else dtype.newbyteorder("=")


def compute_dtype(dtype):
    """float64 for float64, float32 for everything else (the library's rule)."""
    return np.dtype(np.float64) if native(dtype) == np.float64 else np.dtype(np.float32)


def finfo(dtype):
    return ml_dtypes.finfo(native(dtype))


def cast(x, dtype):
    """float64 value(s) `x` rounded to `dtype` and back (overflow gives inf)."""
    with np.errstate(all="ignore"):
        return np.asarray(x, np.float64).astype(native(dtype)).astype(np.float64)


# --------------------------------------------------------------------------
# building adversarial arrays
# --------------------------------------------------------------------------

EXTREMES = ("max", "-max", "subnormal", "-subnormal", "tiny", "inf", "-inf", "nan", "0")


def extreme(kind, dtype):
    fi = finfo(dtype)
    return {"max": float(fi.max), "-max": float(fi.min), "tiny": float(fi.tiny),
            "subnormal": float(fi.smallest_subnormal),
            "-subnormal": -float(fi.smallest_subnormal),
            "inf": np.inf, "-inf": -np.inf, "nan": np.nan, "0": 0.0}[kind]


@dataclass(frozen=True)
class Layout:
    """How an array's elements sit in memory (all combinable)."""

    broadcast: tuple = ()     # axes stored once and read with stride 0
    reverse: object = None    # an axis read backwards (negative stride)
    step: object = None       # an axis read every other element
    transpose: bool = False   # the last two axes swapped in memory
    unaligned: bool = False   # data at an odd byte offset
    byteswap: bool = False    # non-native byte order (no such bfloat16)
    readonly: bool = False


@st.composite
def layouts(draw, ndim):
    rare = st.sampled_from([False, False, True])
    axis = st.integers(0, ndim - 1) if ndim else st.none()
    return Layout(
        broadcast=tuple(draw(st.lists(st.integers(0, ndim - 1), max_size=2, unique=True)))
        if ndim and draw(rare) else (),
        reverse=draw(axis) if draw(rare) else None,
        step=draw(axis) if draw(rare) else None,
        transpose=ndim >= 2 and draw(rare),
        unaligned=draw(rare), byteswap=draw(rare), readonly=draw(rare))


def stored_shape(shape, layout):
    """The shape of the values actually stored (1 on broadcast axes)."""
    return tuple(1 if a in layout.broadcast else n for a, n in enumerate(shape))


def store(base, shape, layout):
    """An array of `shape` holding `base` (of stored_shape(shape, layout))
    broadcast, laid out in memory as `layout` says."""
    dt = base.dtype
    if layout.byteswap and dt.kind == "f" and dt.itemsize > 1:
        dt = dt.newbyteorder("S")
    nd = base.ndim
    inner = list(base.shape)
    if layout.transpose and nd >= 2:
        inner[-1], inner[-2] = inner[-2], inner[-1]
    raw_shape = list(inner)
    if layout.step is not None:
        raw_shape[layout.step] *= 2
    n = math.prod(raw_shape)
    offset = 1 if layout.unaligned else 0
    raw = np.frombuffer(bytearray(n * dt.itemsize + offset), dtype=dt, count=n,
                        offset=offset).reshape(raw_shape)
    view = raw
    if layout.step is not None:
        view = raw[tuple(slice(None, None, 2) if a == layout.step else slice(None)
                         for a in range(nd))]
    if layout.transpose and nd >= 2:
        view = view.swapaxes(-1, -2)
    if layout.reverse is not None:
        view[...] = np.flip(base, layout.reverse)
        view = np.flip(view, layout.reverse)
    else:
        view[...] = base
    arr = view if view.shape == tuple(shape) else np.broadcast_to(view, shape)
    if layout.readonly:
        arr.flags.writeable = False
    assert arr.shape == tuple(shape)
    return arr


def random_values(rng, shape, dtype, plants=(), magnitude=1.0):
    """Normal values of `dtype`, with the `plants` (EXTREMES) at random places."""
    x = np.asarray(rng.standard_normal(shape) * magnitude, np.float64)
    flat = x.reshape(-1)
    for kind in plants:
        if flat.size:
            flat[rng.integers(flat.size)] = extreme(kind, dtype)
    return x.astype(dtype)


def describe(arr):
    if arr is None or not isinstance(arr, np.ndarray):
        return repr(arr)
    flags = [f for f, on in (("C", arr.flags.c_contiguous), ("aligned", arr.flags.aligned),
                             ("writeable", arr.flags.writeable)) if on]
    text = f"<{arr.dtype.str} {arr.shape} strides={arr.strides} {','.join(flags)}"
    if arr.size <= 24:
        text += " " + np.array2string(np.asarray(arr, dtype=object if arr.dtype == BF16
                                                  else None).reshape(-1), separator=",")
    return text + ">"


@dataclass
class Case:
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    kwargs: dict
    must_succeed: bool  # valid shapes and mask, every parameter fits the compute dtype
    notes: list = field(default_factory=list)
    refused: str = ""  # the argument both must refuse with ValueError, if any

    def __repr__(self):
        kw = ", ".join(f"{n}={describe(a)}" for n, a in self.kwargs.items())
        return (f"Case(q={describe(self.q)}, k={describe(self.k)}, v={describe(self.v)}, "
                f"{kw}, must_succeed={self.must_succeed}, notes={self.notes})")


# --------------------------------------------------------------------------
# the rules checked against, written here independently of the library
# --------------------------------------------------------------------------

def expected_shape(qs, ks, vs, gqa):
    """(result shape, may_raise) by NumPy's broadcasting and the documented
    GQA rule, or (None, True) when the call must raise ValueError."""
    qs, ks, vs = tuple(qs), tuple(ks), tuple(vs)
    if min(len(qs), len(ks), len(vs)) < 2:
        return None, True
    if qs[-1] != ks[-1] or qs[-1] == 0 or ks[-2] != vs[-2]:  # E = 0 is refused by the docs
        return None, True
    nd = max(len(qs), len(ks), len(vs))
    lifted = max(nd, 3)
    q, k, v = ((1,) * (lifted - len(s)) + s for s in (qs, ks, vs))
    try:
        batch = np.broadcast_shapes(q[:-3], k[:-3], v[:-3])
        hkv = np.broadcast_shapes((k[-3],), (v[-3],))[0]
    except ValueError:
        return None, True
    hq, may_raise = q[-3], False
    try:
        heads = np.broadcast_shapes((hq,), (hkv,))[0]
    except ValueError:
        if not (gqa and hkv > 0 and hq % hkv == 0):
            return None, True
        heads, may_raise = hq, hq == 0  # 0 groups of Hkv heads: 0 heads, or refused
    out = tuple(batch) + (heads, q[-2], v[-1])
    return out[lifted - nd:], may_raise


def unrepresentable(kwargs, dtype):
    """Names of the parameters whose value changes meaning in the compute
    dtype: overflows to +-inf, or a nonzero value becomes 0 or subnormal
    (a sink may overflow to -inf: it weighs nothing either way)."""
    cdt = compute_dtype(dtype)
    tiny = float(finfo(cdt).tiny)
    bad = []
    for name in ("scale", "softcap", "alibi_slopes"):
        x = kwargs.get(name)
        if x is None:
            continue
        x = np.asarray(x, np.float64)
        c = cast(x, cdt)
        if (~np.isfinite(c) | ((x != 0) & (np.abs(c) < tiny))).any():
            bad.append(name)
    if kwargs.get("sinks") is not None:
        if (cast(kwargs["sinks"], cdt) == np.inf).any():
            bad.append("sinks")
    return bad


def row_tolerance(helpers, cdt, bounds):
    """helpers.tolerance(cdt, bound) for an array of per-row score bounds."""
    rtol = np.frompyfunc(lambda b: helpers.tolerance(cdt, b)[0], 1, 1)(bounds)
    atol = np.frompyfunc(lambda b: helpers.tolerance(cdt, b)[1], 1, 1)(bounds)
    return rtol.astype(np.float64), atol.astype(np.float64)


class Analysis:
    """What a call's inputs imply for each output row (..., H, i) and element,
    computed from the inputs in float64 from their compute-dtype values.

    Exclusions (each with its reason):

    prone        rows whose scores may overflow the compute dtype on the way:
                 |q|.|k| (or scale * that, or scale * q pre-scaled) near
                 finfo.max, or score + ALiBi + mask beyond finfo.max + ulp/2.
                 Where an intermediate overflows depends on the order of
                 operations, so inf/NaN may appear in one implementation
                 and not the other; only the hull rule is checked there.
                 A mask of finfo.min alone is not prone: s + finfo.min rounds
                 to finfo.min exactly for |s| < ulp/2.
    score_ambig  rows with an additive -inf on a key whose score is inf or
                 NaN (non-finite q or k): "added" gives NaN (the reference),
                 "excluded" gives -inf; both readings of the docs are fair.
                 Also rows where a nonzero q (or k) element times the scale
                 underflows to 0 while the element it meets is inf: a kernel
                 that scales Q before the product (FlashAttention's order)
                 gets 0 * inf = NaN where (q . k) * scale is +-inf.  Only
                 where both are finite are such rows compared.
    v_ambig      elements whose value column holds inf/NaN at a key the row
                 weights 0 or almost 0 in the reference (masked, or exp
                 underflow): the library never reads skipped keys (NaN does
                 not spread from them) while 0 * NaN is NaN in a matmul;
                 an underflowing weight may be 0 in one and 1e-40 in the
                 other.  Also any inf/NaN value in a row whose tolerance is
                 large (its weights are unreliable), and columns whose
                 sum of |v| or magnitude near finfo.max (of the compute or
                 of the storage dtype) may round to inf in an unnormalised
                 accumulator or at the final rounding.

    Not an exclusion but its converse: a row whose keys all carry one
    finite additive mask value large enough to absorb every score
    (finfo.min) gets the tolerance of its scores, not of finfo.min: every
    order of operations rounds each key's score to that value exactly.
    """

    def __init__(self, helpers, q, k, v, kwargs, work_shape):
        dt = native(q.dtype)
        self.dtype, self.cdt = dt, compute_dtype(dt)
        fi = finfo(self.cdt)
        big, eps = float(fi.max), float(fi.eps)
        batch, H = tuple(work_shape[:-3]), work_shape[-3]
        nd = max(q.ndim, k.ndim, v.ndim, 3)

        def expand(a):  # (*batch, H, rows, width) float64 of the compute-dtype values
            a = a.reshape((1,) * (nd - a.ndim) + a.shape)
            n = a.shape[-3]
            if H == 0:
                heads = np.zeros(0, int)
            elif n == H:
                heads = np.arange(H)
            elif n == 1:
                heads = np.zeros(H, int)
            else:  # grouped-query: head h reads key/value head h // (H / n)
                heads = np.arange(H) // (H // n)
            a = np.asarray(a).astype(self.cdt).astype(np.float64)
            return np.broadcast_to(a, batch + a.shape[-3:])[..., heads, :, :]

        Q, K, V = expand(q), expand(k), expand(v)
        L, S, E = Q.shape[-2], K.shape[-2], q.shape[-1]
        self.L, self.S = L, S
        scores_shape = batch + (H, L, S)
        Qf, Kf, Vf = (np.where(np.isfinite(a), a, 0.0) for a in (Q, K, V))
        with np.errstate(all="ignore"):
            A = np.abs(Qf) @ np.swapaxes(np.abs(Kf), -1, -2)  # |q|.|k|, (*batch, H, L, S)
        q_bad = ~np.isfinite(Q).all(-1)  # (*batch, H, L)
        k_bad = ~np.isfinite(K).all(-1)  # (*batch, H, S)
        v_bad = ~np.isfinite(V)  # (*batch, H, S, Ev)

        # parameters: an unrepresentable one is judged by the no-NaN rule; the
        # overflow analysis takes it as neutral
        bad = unrepresentable(kwargs, self.cdt)
        scale = kwargs.get("scale")
        scale = 1 / math.sqrt(E) if scale is None else scale
        sc = 1.0 if "scale" in bad else abs(float(cast(scale, self.cdt)))
        cap = kwargs.get("softcap")
        cap = None if cap is None or "softcap" in bad else float(cast(cap, self.cdt))
        slopes = np.zeros(H)
        if kwargs.get("alibi_slopes") is not None:
            c = np.abs(cast(kwargs["alibi_slopes"], self.cdt))
            slopes = np.where(np.isfinite(c), c, 0.0)
        sinks = None if kwargs.get("sinks") is None else cast(kwargs["sinks"], self.cdt)
        self.sinks = sinks

        # which keys a row sees, from the documented rules
        left, right = -1, -1
        window = kwargs.get("window")
        if window is not None:
            window = (window, window) if isinstance(window, int) else window
            left, right = (-1 if w is None else w for w in window)
        if kwargs.get("is_causal"):
            right = 0
        qlen = np.broadcast_to(kwargs["q_lengths"], batch) if kwargs.get(
            "q_lengths") is not None else np.full(batch, L)
        kvlen = np.broadcast_to(kwargs["kv_lengths"], batch) if kwargs.get(
            "kv_lengths") is not None else np.full(batch, S)
        qlen, kvlen = qlen.astype(np.int64), kvlen.astype(np.int64)
        diag = kvlen - qlen if kwargs.get("alignment") == "lower_right" else np.zeros(batch, int)
        per_batch = (...,) + (None,) * 3
        offset = (np.arange(S) - np.arange(L)[:, None])[None] - diag[per_batch]
        vis = np.ones(offset.shape, bool)
        if left >= 0:
            vis &= offset >= -left
        if right >= 0:
            vis &= offset <= right
        vis &= np.arange(S) < kvlen[per_batch]
        mask = kwargs.get("attn_mask")
        addinf = np.zeros(scores_shape, bool)
        mfin = np.zeros(scores_shape)
        mask_bad = np.zeros(scores_shape, bool)
        if mask is not None and mask.dtype == np.bool_:
            vis = vis & np.broadcast_to(mask, scores_shape)
        elif mask is not None:
            mc = np.broadcast_to(cast(mask, self.cdt), scores_shape)
            addinf = mc == -np.inf
            mfin = np.where(np.isfinite(mc), np.abs(mc), 0.0)
            mask_bad = np.isnan(mc) | (mc == np.inf)
        vis = np.broadcast_to(vis, scores_shape)  # not hidden by window, lengths, False
        takes_part = vis & ~addinf
        self.padded = np.broadcast_to((np.arange(L) >= qlen[..., None])[..., None, :],
                                      batch + (H, L))

        with np.errstate(all="ignore"):
            bias = slopes[:, None, None] * np.abs(offset)  # (*batch, H, L, S)
            s_bound = sc * A
            capped = s_bound if cap is None else np.minimum(s_bound, cap)
            dot_over = 2 * max(1.0, sc) * A >= big
            half_ulp = float(np.spacing(self.cdt.type(fi.max))) / 2
            add_over = ~((capped + bias) * (1 + 1e-6) < (big - mfin) + half_ulp)
            pre_q = 2 * sc * np.abs(Qf).max(-1, initial=0.0) >= big
            pre_k = 2 * sc * np.abs(Kf).max(-1, initial=0.0) >= big
        self.prone = (((dot_over | add_over) & vis).any(-1) | pre_q
                      | (pre_k[..., None, :] & vis).any(-1))
        self.score_ambig = (addinf & vis & (q_bad[..., None] | k_bad[..., None, :])).any(-1)
        # scale * q (or k) pre-scaled underflowing to 0 where the other
        # factor is inf: 0 * inf is NaN where q . k * scale is +-inf
        sub = float(finfo(self.cdt).smallest_subnormal)
        q_nf, k_nf = (~np.isfinite(a) for a in (Q, K))
        q_under, k_under = ((a != 0) & (np.abs(a) * sc < sub) for a in (Qf, Kf))
        meets = ((q_under.astype(float) @ np.swapaxes(k_nf, -1, -2).astype(float))
                 + (q_nf.astype(float) @ np.swapaxes(k_under, -1, -2).astype(float))) > 0
        self.score_ambig |= (meets & vis).any(-1)
        with np.errstate(all="ignore"):
            total = np.where(takes_part, s_bound + bias + mfin, 0.0)
            self.bound = total.max(-1, initial=0.0)
            if mask is not None and mask.dtype != np.bool_:
                # A row whose keys all carry one finite mask value c so large
                # that |score| + |ALiBi| < ulp(c) / 8 (HuggingFace's finfo.min)
                # gives every key the score c exactly, in any order of
                # operations: its softmax is exactly uniform, so the large c
                # is no ill-conditioning and the row's bound is the scores'.
                c_hi = np.where(takes_part, mc, -np.inf).max(-1, initial=-np.inf)
                c_lo = np.where(takes_part, mc, np.inf).min(-1, initial=np.inf)
                c_ulp = np.spacing(np.abs(np.where(np.isfinite(c_hi), c_hi, 0)).astype(self.cdt))
                rest = np.where(takes_part, s_bound + bias, 0.0).max(-1, initial=0.0)
                absorbed = (c_hi == c_lo) & np.isfinite(c_hi) & (rest < c_ulp / 8)
                self.bound = np.where(absorbed, rest, self.bound)
        if sinks is not None:
            self.bound = self.bound + np.where(np.isfinite(sinks), np.abs(sinks), 0)[:, None]
        self.bound = np.where(np.isnan(self.bound), np.inf, self.bound)  # 0 * inf
        self.rtol, self.atol = row_tolerance(helpers, self.cdt, self.bound)
        self.full_hidden = ~takes_part.any(-1) & ~self.padded

        # rows whose inputs are finite and do not overflow: no NaN there, ever
        self.clean = (~self.prone & ~q_bad & ~(k_bad[..., None, :] & vis).any(-1)
                      & ~v_bad.any((-1, -2))[..., None] & ~(mask_bad & vis).any(-1))

        # the values' side
        vabs = np.abs(Vf)
        with np.errstate(all="ignore"):
            vsum = vis.astype(np.float64) @ vabs  # (*batch, H, L, Ev)
        storage_max = float(finfo(dt).max)
        head_vmax = vabs.max(-2, initial=0.0)[..., None, :]  # (*batch, H, 1, Ev)
        self.v_ambig = ((vsum * (1 + (S + 4) * eps) >= big) | (head_vmax >= storage_max / 2))
        self.v_ambig = np.broadcast_to(self.v_ambig, batch + (H, L, V.shape[-1])).copy()
        if v_bad.any():
            self.v_ambig |= self._weak_weights(q, k, v, kwargs, work_shape, v_bad)
            unreliable = (self.rtol >= 0.1)[..., None] & v_bad.any(-2)[..., None, :]
            self.v_ambig |= unreliable
        self.lo = np.minimum(0.0, Vf.min(-2, initial=0.0))[..., None, :]
        self.hi = np.maximum(0.0, Vf.max(-2, initial=0.0))[..., None, :]
        seps = float(finfo(dt).eps)
        self.hull_slack = ((S + 4) * eps + 2 * seps) * head_vmax + float(finfo(dt).tiny)
        self.col_slack = 4 * S * float(fi.tiny) * head_vmax  # flushed tiny weights
        self.storage_eps = seps if dt != self.cdt else 0.0

    def _weak_weights(self, q, k, v, kwargs, work_shape, v_bad):
        """Elements fed an inf/NaN value through a weight the reference
        makes 0 or nearly so (<= 1e-3): the reference's weights of the
        keys holding them, got by attending to one-hot value columns."""
        keys = np.flatnonzero(v_bad.any(axis=(-1,) + tuple(range(v_bad.ndim - 2))))
        onehot = np.zeros(v.shape[:-1] + (len(keys),), native(v.dtype))
        onehot[..., keys, np.arange(len(keys))] = 1
        kw = {n: a for n, a in kwargs.items() if n not in ("return_lse", "out")}
        with np.errstate(all="ignore"):
            w = ref.scaled_dot_product_attention(q, k, onehot, **kw)
        w = w.astype(np.float64).reshape(work_shape[:-1] + (len(keys),))
        weak = ~((w > 1e-3) | np.isnan(w))  # (*batch, H, L, nkeys)
        return (weak.astype(np.float64) @ v_bad[..., keys, :].astype(np.float64)) > 0


# --------------------------------------------------------------------------
# the differential check
# --------------------------------------------------------------------------

def run_both(q, k, v, kwargs):
    results = []
    for fn in (pyattn.scaled_dot_product_attention, ref.scaled_dot_product_attention):
        with np.errstate(all="ignore"):
            try:
                results.append((fn(q, k, v, **kwargs), None))
            except Exception as exc:  # classified by the caller
                results.append((None, exc))
    return results


def where(mask, *arrays):
    """The first few offending elements, for a failure message."""
    idx = np.argwhere(mask)[:4]
    return "; ".join(f"at {tuple(i)}: " + ", ".join(str(a[tuple(i)]) for a in arrays)
                     for i in idx)


def used_bf16_products(kernel, dtype, kwargs):
    """Whether the call ran its products in bfloat16 (see precision=)."""
    name = native(dtype).name
    return (_attention.has_bf16_products(kernel, name)
            and _attention.wants_bf16_products(kwargs.get("precision"), name))


def check_call(helpers, case, kernel):
    with np.errstate(all="ignore"):  # inf and NaN are what is being compared
        _check_call(helpers, case, kernel)


def _check_call(helpers, case, kernel):
    q, k, v, kwargs = case.q, case.k, case.v, case.kwargs
    with using_kernel(kernel, exact_threads=True):
        (got, gexc), (want, wexc) = run_both(q, k, v, kwargs)
    shape, may_raise = expected_shape(q.shape, k.shape, v.shape, kwargs.get("enable_gqa", False))
    if gexc is not None or wexc is not None:
        for who, exc in (("pyattn", gexc), ("reference", wexc)):
            if exc is not None:
                assert type(exc) in (ValueError, TypeError), (
                    f"{who} raised {type(exc).__name__}: {exc}")
                assert NAMES_AN_ARGUMENT.search(str(exc)), (
                    f"{who}'s {type(exc).__name__} names no argument: {exc}")
        assert gexc is not None, f"pyattn returned where the reference raised {wexc!r}"
        assert wexc is not None, f"pyattn raised {gexc!r} where the reference returned"
        assert type(gexc) is type(wexc), (gexc, wexc)
        if shape is None:
            assert type(gexc) is ValueError, f"shapes that do not broadcast: {gexc!r}"
        assert not (case.must_succeed and not may_raise), f"both refused a valid call: {gexc!r}"
        if case.refused:
            assert type(gexc) is ValueError and case.refused in str(gexc), gexc
        return
    assert not case.refused, f"both accepted {case.refused}, whose finite values overflow"
    assert shape is not None, "shapes that do not broadcast were accepted"
    lse = kwargs.get("return_lse", False)
    if lse:
        (got, glse), (want, wlse) = got, want
    dt = native(q.dtype)
    cdt = compute_dtype(dt)
    assert got.shape == shape and want.shape == shape, (got.shape, want.shape, shape)
    assert got.dtype == dt and want.dtype == dt, (got.dtype, want.dtype, dt)
    if lse:
        assert glse.shape == shape[:-1] and wlse.shape == shape[:-1], (glse.shape, wlse.shape)
        assert glse.dtype == cdt and wlse.dtype == cdt, (glse.dtype, wlse.dtype)
    if got.size == 0 and not (lse and glse.size):
        return

    # the work shape: every batch dimension, the heads, then (L, Ev)
    nd = max(q.ndim, k.ndim, v.ndim, 3)
    lift = lambda s: (1,) * (nd - len(s)) + tuple(s)  # noqa: E731
    batch = np.broadcast_shapes(lift(q.shape)[:-3], lift(k.shape)[:-3], lift(v.shape)[:-3])
    work_shape = tuple(batch) + lift(shape)[-3:]
    an = Analysis(helpers, q, k, v, kwargs, work_shape)
    g = got.astype(np.float64).reshape(work_shape)
    w = want.astype(np.float64).reshape(work_shape)

    # rules of the library, on pyattn's result (the reference breaks the
    # zero-row one when a value at a masked key is inf/NaN: 0 * inf in its matmul)
    pad = an.padded
    nz = pad[..., None] & (g != 0)
    assert not nz.any(), f"q_lengths padding rows are not zeros: {where(nz, g)}"
    hidden = an.full_hidden & ~an.prone & ~an.score_ambig
    nz = hidden[..., None] & (g != 0)
    assert not nz.any(), f"rows with no key taking part are not zeros: {where(nz, g, w)}"
    clean = an.clean[..., None] & ~an.v_ambig
    nan = clean & np.isnan(g)
    assert not nan.any(), (
        f"NaN output from finite inputs (parameters {unrepresentable(kwargs, dt)} do not fit "
        f"{cdt}): {where(nan, g, w)}")
    inf = clean & np.isinf(g)
    assert not inf.any(), f"infinite output from finite inputs: {where(inf, g, w)}"
    fin = np.isfinite(g)
    out_hull = fin & ((g < an.lo - an.hull_slack) | (g > an.hi + an.hull_slack))
    assert not out_hull.any(), f"output outside the values' hull: {where(out_hull, g, w)}"

    # agreement with the reference: the non-finite pattern...
    strict = (~an.prone & ~an.score_ambig)[..., None] & ~an.v_ambig
    for name, test in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        diff = strict & (test(g) != test(w))
        assert not diff.any(), f"{name} pattern differs (pyattn, reference): {where(diff, g, w)}"
    # ... and the finite values: assert_close's rule, per row and column
    both = np.isfinite(g) & np.isfinite(w) & ~an.prone[..., None]
    mag = np.max(np.abs(np.where(np.isfinite(w), w, 0)), axis=tuple(range(w.ndim - 1)),
                 initial=0.0)
    # an output is a weighted mean of value rows: its error scales with the
    # values' magnitude, not its own (values of +-finfo.max can cancel)
    mag = np.maximum(mag, np.maximum(-an.lo, an.hi))
    err = np.abs(g - w)
    # bfloat16 products round each weight to bfloat16 (relative error eps / 2)
    products_eps = float(finfo(BF16).eps) if used_bf16_products(kernel, dt, kwargs) else 0.0
    allowed = (an.atol[..., None] * np.maximum(1.0, mag) + an.rtol[..., None] * np.abs(w)
               + an.storage_eps * np.abs(w) + an.col_slack + products_eps * mag)
    allowed = np.where(np.isnan(allowed), np.inf, allowed)  # inf tolerance times 0
    far = both & ~(err <= allowed)
    assert not far.any(), (
        f"{far.sum()} of {far.size} outputs differ from the reference (pyattn, reference, "
        f"allowed): {where(far, g, w, allowed)}")

    if not lse:
        return
    gl = glse.astype(np.float64).reshape(work_shape[:-1])
    wl = wlse.astype(np.float64).reshape(work_shape[:-1])
    assert np.isneginf(gl[pad]).all(), f"lse of q_lengths padding rows: {where(pad, gl)}"
    if an.sinks is None:
        sink = np.full(work_shape[-3], -np.inf)
    else:
        sink = an.sinks
    sink_rows = np.broadcast_to(sink[:, None], gl.shape)
    bad_hidden = hidden & ~((gl == sink_rows) | np.isclose(gl, sink_rows, rtol=1e-6, atol=0))
    assert not bad_hidden.any(), (
        f"lse of rows with no key is not -inf (or the sink): {where(bad_hidden, gl, sink_rows)}")
    bad = an.clean & (np.isnan(gl) | np.isposinf(gl))
    assert not bad.any(), f"NaN/+inf logsumexp from finite inputs: {where(bad, gl, wl)}"
    strict_rows = ~an.prone & ~an.score_ambig
    for name, test in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
        diff = strict_rows & (test(gl) != test(wl))
        assert not diff.any(), f"lse {name} pattern differs: {where(diff, gl, wl)}"
    both = np.isfinite(gl) & np.isfinite(wl) & ~an.prone
    allowed = an.atol * np.maximum(1, np.abs(wl)) + an.rtol * np.abs(wl)
    far = both & ~(np.abs(gl - wl) <= np.where(np.isnan(allowed), np.inf, allowed))
    assert not far.any(), f"lse differs from the reference: {where(far, gl, wl)}"


# --------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------

SCALES = (None, 0.37, 2.0, -0.5, 0.0, 1e-30, 1e-300, 1e30, 1e300)
SOFTCAPS = (None, 5.0, 0.05, 1e30, 1e300, 3.5e38)
SLOPES = (None, "normal", "negative", 1e30, 1e300, "mixed")
SINKS = (None, "normal", -1e39, 1e39, -np.inf, -1e30, 1e30, 30.0)
MASK_PLANTS = ("-inf", "min", "nan", "large", "-large", "-huge")


def draw_shapes(draw, focus):
    """(qshape, kshape, vshape, enable_gqa) with sizes 0, 1 and odd on every
    axis, broadcasting (1 against n, 0 against 1), batch dims of different
    ranks; for the "shapes" focus sometimes a mismatch."""
    shapes_focus = focus == "shapes"
    bsize = st.sampled_from([1, 0, 2, 3] if shapes_focus else [1, 2, 3])
    nb = draw(st.integers(0, 2))
    full = [draw(bsize) for _ in range(nb)]
    hkv = draw(st.sampled_from([1, 2, 0, 3] if shapes_focus else [1, 2, 3]))
    g = draw(st.sampled_from([1, 2, 3]))
    hq_kind = draw(st.sampled_from(["group", "one", "zero"] if shapes_focus else ["group", "one"]))
    hq = {"group": hkv * g, "one": 1, "zero": 0}[hq_kind]
    hk = hkv if draw(st.booleans()) else 1
    hv = hkv if draw(st.booleans()) else 1
    gqa = g > 1 if not shapes_focus or draw(st.sampled_from([True, True, False])) else (
        draw(st.booleans()))
    if shapes_focus:
        L = draw(st.sampled_from([1, 0, 2, 3, 5, 7, 130]))
        S = draw(st.sampled_from([1, 0, 2, 3, 5, 7, 129]))
        E = draw(st.sampled_from([1, 2, 3, 5, 0]))
        Ev = draw(st.sampled_from([1, 0, 2, 3, 5]))
    else:
        L = draw(st.sampled_from([1, 2, 3, 5, 7, 17, 33, 130, 257]))
        S = draw(st.sampled_from([1, 2, 3, 5, 7, 17, 65, 97, 129, 300, 0, 2100]))
        E = draw(st.sampled_from([1, 2, 3, 5, 8, 17, 33]))
        Ev = draw(st.sampled_from([1, 2, 3, 5, 8, 4, 7, 0]))

    def batch_of():
        r = draw(st.integers(0, nb))
        return [n if draw(st.booleans()) else 1 for n in full[nb - r:]]

    qb, kb, vb = batch_of(), batch_of(), batch_of()
    kE, vS = E, S
    bad = draw(st.sampled_from([None] * 5 + ["E", "S", "batch", "heads"])) if shapes_focus else None
    if bad == "E":
        kE = E + 1
    elif bad == "S":
        vS = S + 1
    elif bad == "batch":
        qb, kb = [2] + list(full[1:]), [3] + list(full[1:])
    elif bad == "heads":
        hk, hv = 2, 3
    two_d_q = shapes_focus and not qb and draw(st.sampled_from([False, False, True]))
    qshape = (L, E) if two_d_q and hq <= 1 else tuple(qb) + (hq, L, E)
    kshape = tuple(kb) + (hk, S, kE)
    vshape = tuple(vb) + (hv, vS, Ev)
    # keep an example cheap: the reference materialises every score
    out, _ = expected_shape(qshape, kshape, vshape, gqa)
    if out is not None:
        work = math.prod(out[:-2]) * L * S * (E + Ev + 1)
        if work > 3e6:
            L = min(L, 3)
            qshape = qshape[:-2] + (L, E)
    return qshape, kshape, vshape, gqa


@st.composite
def calls(draw, focus):
    """One scaled_dot_product_attention call (a Case).  focus: "values"
    (layouts, planted extremes, masks), "params" (extreme scale, softcap,
    ALiBi, sinks), "shapes" (degenerate and mismatched shapes)."""
    dt = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    qshape, kshape, vshape, gqa = draw_shapes(draw, focus)
    notes = []

    def array(shape, name):
        layout = draw(layouts(len(shape)))
        plants = ()
        if focus == "values" and draw(st.sampled_from([False, False, False, True])):
            plants = tuple(draw(st.lists(st.sampled_from(EXTREMES), min_size=1, max_size=3)))
        magnitude = draw(st.sampled_from([1.0, 1.0, 4.0]))
        base = random_values(rng, stored_shape(shape, layout), dt, plants, magnitude)
        if plants:
            notes.append(f"{name} plants {plants}")
        if layout != Layout():
            notes.append(f"{name} {layout}")
        return store(base, shape, layout)

    q, k, v = array(qshape, "q"), array(kshape, "k"), array(vshape, "v")
    out, may_raise = expected_shape(qshape, kshape, vshape, gqa)
    valid = out is not None and not may_raise
    kwargs = {"enable_gqa": gqa, "is_causal": draw(st.booleans()),
              "num_threads": draw(st.sampled_from([1, 2])),
              "return_lse": draw(st.booleans())}
    if draw(st.booleans()):
        kwargs["alignment"] = "lower_right"
    nd = max(len(qshape), len(kshape), len(vshape), 3)
    lift = lambda s: (1,) * (nd - len(s)) + tuple(s)  # noqa: E731
    mask_ok, refused = True, ""
    if out is not None:
        batch = tuple(np.broadcast_shapes(lift(qshape)[:-3], lift(kshape)[:-3],
                                          lift(vshape)[:-3]))
        H = lift(out)[-3]
    else:
        batch, H = (), max(qshape[-3] if len(qshape) > 2 else 1, 1)
    L, S = qshape[-2], kshape[-2]
    if out is not None and draw(st.sampled_from([True, True, False])):
        mask, mask_ok = draw_mask(draw, rng, batch + (H, L, S), dt, focus, notes)
        kwargs["attn_mask"] = mask
        if mask_ok and valid and beyond_range(mask, compute_dtype(dt)):
            refused = "attn_mask"
    if draw(st.sampled_from([False, False, True])):
        kwargs["window"] = draw(st.sampled_from([0, 1, 2, 5, 40, (0, None), (None, 3),
                                                 (2, 0), (None, None), (70, 1)]))
    if out is not None and draw(st.sampled_from([False, False, True])):
        kwargs["q_lengths"] = lengths(draw, rng, batch, L)
    if out is not None and draw(st.sampled_from([False, False, True])):
        kwargs["kv_lengths"] = lengths(draw, rng, batch, S)
    extreme_params = focus == "params"
    pick = (lambda vals: draw(st.sampled_from(vals))) if extreme_params else (
        lambda vals: draw(st.sampled_from(vals[:3])) if draw(st.booleans()) else vals[0])
    scale = pick(SCALES)
    if scale is not None:
        kwargs["scale"] = scale
    softcap = pick(SOFTCAPS)
    if softcap is not None:
        kwargs["softcap"] = softcap
    slopes = pick(SLOPES)
    if slopes is not None:
        kwargs["alibi_slopes"] = {
            "normal": lambda: rng.uniform(0, 0.5, H), "negative": lambda: rng.uniform(-0.3, 0, H),
            "mixed": lambda: np.where(rng.random(H) < 0.5, 1e30, 0.1),
        }.get(slopes, lambda: np.full(H, slopes))()
    sinks = pick(SINKS)
    if sinks is not None:
        kwargs["sinks"] = rng.standard_normal(H) if sinks == "normal" else np.full(H, sinks)
    if unrepresentable(kwargs, dt):
        refused = ""  # a parameter may be refused first
    must = valid and mask_ok and not refused and not unrepresentable(kwargs, dt)
    return Case(q, k, v, kwargs, must_succeed=must, notes=notes, refused=refused)


def lengths(draw, rng, batch, n):
    shape = draw(st.sampled_from([(), batch]))
    arr = rng.integers(0, n + 1, size=shape)
    if draw(st.booleans()):  # the edges: no row or key at all, and all of them
        arr = np.where(rng.random(shape) < 0.5, 0, n)
    return np.asarray(arr, dtype=draw(st.sampled_from([np.int64, np.int32])))


def beyond_range(arr, dtype):
    """Whether `arr` holds finite values that round to inf in `dtype` (from
    half an ulp past its max): a conversion the library refuses."""
    fi = finfo(dtype)
    limit = float(fi.max) + 2.0 ** (fi.maxexp - fi.nmant - 2)
    a = np.asarray(arr, np.float64)
    return bool((np.isfinite(a) & (np.abs(a) >= limit)).any())


def draw_mask(draw, rng, scores_shape, dt, focus, notes):
    """(mask, valid): bool or additive, of a shape that broadcasts to the
    scores (fewer leading dims, 1 for n) or, for the "shapes" focus,
    sometimes one that does not."""
    rank = draw(st.integers(0, len(scores_shape)))
    mshape = [n if draw(st.booleans()) else 1 for n in scores_shape[len(scores_shape) - rank:]]
    valid = True
    if focus == "shapes" and mshape and draw(st.sampled_from([False] * 5 + [True])):
        mshape[-1] += 2
        valid = False
    mshape = tuple(mshape)
    layout = draw(layouts(len(mshape)))
    sshape = stored_shape(mshape, layout)
    if draw(st.booleans()):
        keep = rng.random(sshape) < draw(st.sampled_from([0.7, 0.3, 0.9, 0.0, 1.0]))
        if len(sshape) >= 2 and sshape[-2] > 1 and draw(st.booleans()):
            keep[..., rng.integers(sshape[-2]), :] = False  # a row that sees no key
        notes.append(f"bool mask {layout}")
        return store(keep, mshape, layout), valid
    cdt = compute_dtype(dt)
    choices = [cdt, cdt, native(dt)] + ([np.dtype(np.float64)] if cdt == np.float32 else [])
    mdt = draw(st.sampled_from(choices))
    fi = finfo(mdt)
    m = np.asarray(rng.standard_normal(sshape) * draw(st.sampled_from([1.0, 3.0])), np.float64)
    plants = draw(st.lists(st.sampled_from(MASK_PLANTS), max_size=3)) if focus == "values" else []
    flat = m.reshape(-1)
    for kind in plants:
        if flat.size:
            flat[rng.integers(flat.size)] = {
                "-inf": -np.inf, "min": float(fi.min), "nan": np.nan, "large": 1e4,
                "-large": -1e4, "-huge": max(-1e30, float(fi.min) / 2)}[kind]
    rows = draw(st.sampled_from([None, None, "min", "-inf", "all-min"]))
    if rows == "all-min":  # every key of every row: HuggingFace's "masked" value
        m[...] = float(fi.min)
    elif rows is not None and len(sshape) >= 2 and m.size:
        m[..., rng.integers(sshape[-2]), :] = float(fi.min) if rows == "min" else -np.inf
    notes.append(f"float mask {mdt} plants {plants} rows {rows} {layout}")
    return store(m.astype(mdt), mshape, layout), valid


# --------------------------------------------------------------------------
# the fuzz tests
# --------------------------------------------------------------------------

@pytest.mark.parametrize("kernel_name", KERNELS)
@FUZZ
@given(case=calls("values"))
def test_layouts_extremes_and_masks_agree(helpers, kernel_name, case):
    check_call(helpers, case, kernel_name)


@pytest.mark.parametrize("kernel_name", KERNELS)
@FUZZ
@given(case=calls("params"))
def test_extreme_parameters_agree(helpers, kernel_name, case):
    check_call(helpers, case, kernel_name)


@pytest.mark.parametrize("kernel_name", KERNELS)
@FUZZ
@given(case=calls("shapes"))
def test_degenerate_and_mismatched_shapes(helpers, kernel_name, case):
    check_call(helpers, case, kernel_name)


# --------------------------------------------------------------------------
# known hard inputs (a)-(h), deterministic
# --------------------------------------------------------------------------

def _assert_each_a_clear_value_error(out, count):
    """The child printed `count` lines "<case> <exception> <message>", each a
    ValueError whose message names an argument."""
    lines = out.strip().splitlines()
    assert len(lines) == count, out
    for line in lines:
        assert line.split()[1] == "ValueError", line
        assert NAMES_AN_ARGUMENT.search(line.split(" ", 2)[2]), line


def _run_child(helpers, tmp_path, code, kernel=None, timeout=120):
    """Run `code` in a fresh interpreter (a crash fails the test, not
    pytest); returns its stdout."""
    env = {} if kernel is None else {_dispatch.ENV_VAR: kernel}
    return helpers.run_python(textwrap.dedent(code), cwd=tmp_path, timeout=timeout,
                              **env).stdout


_CHILD_PRELUDE = """
import os
import resource
if "asan" not in os.environ.get("LD_PRELOAD", ""):  # ASan's shadow needs terabytes of it
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # an expansion fails loudly
import numpy as np
import ml_dtypes
import pyattn

def attempt(label, fn):
    try:
        result = fn()
    except ValueError as exc:
        print(label, "ValueError", str(exc).replace("\\n", " "))
    except BaseException as exc:
        print(label, "WRONG", type(exc).__name__, str(exc).replace("\\n", " "))
    else:
        print(label, "RETURNED", result)
"""


@pytest.mark.parametrize("kernel_name", KERNELS)
def test_zero_stride_features_beyond_memory_are_refused(helpers, tmp_path, kernel_name):
    """(a) q and k claim E = 2**56 features of one stored element: ValueError,
    no hang, no crash."""
    out = _run_child(helpers, tmp_path, _CHILD_PRELUDE + """
    for dt in (np.float32, np.float64, np.float16, ml_dtypes.bfloat16):
        one = np.zeros(1, dt)
        q = np.lib.stride_tricks.as_strided(one, shape=(1, 2**56), strides=(0, 0))
        k = np.lib.stride_tricks.as_strided(one, shape=(3, 2**56), strides=(0, 0))
        v = np.zeros((3, 2), dt)
        attempt(np.dtype(dt).name, lambda: pyattn.scaled_dot_product_attention(q, k, v).shape)
    """.replace("\n    ", "\n"), kernel=kernel_name, timeout=90)
    _assert_each_a_clear_value_error(out, 4)


# A set whose bfloat16 products keep whole blocks whatever the problem
# (BF16_WHOLE_BLOCKS in its kernels_<isa>.c).
BF16_WHOLE_BLOCKS = {"amx"}


@pytest.mark.parametrize("bf16_products", [False, True], ids=["exact", "bf16-products"])
@pytest.mark.parametrize("dtype", DTYPE_IDS)
@pytest.mark.parametrize("kernel_name", KERNELS)
def test_workspace_holds_the_rows_and_keys_the_problem_has(kernel_name, dtype, bf16_products):
    """(a) The per-thread workspace grows with E and Ev times the rows and keys
    a block can use, min(L, BLOCK_M) and min(S, BLOCK_N) up to a micro-tile,
    not whole blocks: L = S = 1 with E = Ev = 2**22 stays far below BLOCK_M x E.
    A set without bfloat16 products answers with its exact kernel."""
    E = 2**22
    itemsize = 8 if dtype == "float64" else 4  # the compute dtype's
    one = _attention.scratch_bytes(kernel_name, dtype, 1, 1, E, E, bf16_products)
    full = _attention.scratch_bytes(kernel_name, dtype, 4096, 4096, E, E, bf16_products)
    rows = _attention.block_rows(kernel_name, dtype, bf16_products)
    assert full >= rows * E * itemsize, full
    whole = bf16_products and kernel_name in BF16_WHOLE_BLOCKS and _attention.has_bf16_products(
        kernel_name, dtype)
    if whole:
        assert one == full, (one, full)
    else:
        # Q and the accumulators: one micro-tile of rows (MR <= 8) each; K^T
        # and V: one of columns (NR <= 32) each; the rest does not grow with E
        assert one < (2 * 8 + 2 * 32 + 1) * E * itemsize, one
    assert _attention.scratch_bytes(kernel_name, dtype, 1, 1, 2**62, 1, bf16_products) == 2**64 - 1


@pytest.mark.parametrize("kernel_name", KERNELS)
def test_wide_rows_of_one_query_and_key_run_in_little_memory(helpers, tmp_path, kernel_name):
    """(a) A zero-stride query, key and value claiming E = Ev = 2**22 with
    L = S = 1 computes (the output is the one value row) within a 4 GiB
    address space: BLOCK_M x E scratch would need several GiB.  The exact
    kernels on the direct path; then, where the set has bfloat16 products
    that size by the problem, 8 query rows on their tiled path."""
    bf16_tiled = (_attention.has_bf16_products(kernel_name, "bfloat16")
                  and kernel_name not in BF16_WHOLE_BLOCKS)
    out = _run_child(helpers, tmp_path, _CHILD_PRELUDE + f"""
    E = 2**22
    def wide(value, dt, rows):
        return np.lib.stride_tricks.as_strided(np.full(1, value, dt), (1, 1, rows, E), (0,) * 4)
    for dt in (np.float32, np.float64, np.float16, ml_dtypes.bfloat16):
        q, v = wide(0.5, dt, 1), wide(3.0, dt, 1)
        attempt(np.dtype(dt).name, lambda: bool(
            (pyattn.scaled_dot_product_attention(q, q, v, precision="exact") == 3).all()))
    for dt in ((np.float32, np.float16, ml_dtypes.bfloat16) if {bf16_tiled} else ()):
        q, k, v = wide(0.5, dt, 8), wide(0.5, dt, 1), wide(3.0, dt, 1)
        attempt("bf16-" + np.dtype(dt).name, lambda: bool(
            (pyattn.scaled_dot_product_attention(q, k, v, precision="bf16") == 3).all()))
    """.replace("\n    ", "\n"), kernel=kernel_name, timeout=120)
    expected = [w for dt in DTYPE_IDS for w in (dt, "RETURNED", "True")]
    if bf16_tiled:
        expected += [w for dt in ("float32", "float16", "bfloat16")
                     for w in ("bf16-" + dt, "RETURNED", "True")]
    assert out.split() == expected, out


ZERO_HEAD_CASES = {  # (query, key, value) shapes: NumPy's rule, 0 against 1 gives 0
    "q0-kv1": ((2, 0, 3, 4), (2, 1, 5, 4), (2, 1, 5, 6)),
    "q1-kv0": ((2, 1, 3, 4), (2, 0, 5, 4), (2, 0, 5, 6)),
    "q0-kv0": ((2, 0, 3, 4), (2, 0, 5, 4), (2, 0, 5, 6)),
    "q1-k0-v1": ((2, 1, 3, 4), (2, 0, 5, 4), (2, 1, 5, 6)),
    "q1-k1-v0": ((2, 1, 3, 4), (2, 1, 5, 4), (2, 0, 5, 6)),
    "batch0-vs-1": ((0, 1, 3, 4), (1, 1, 5, 4), (1, 1, 5, 6)),
    "q0-kv2": ((2, 0, 3, 4), (2, 2, 5, 4), (2, 2, 5, 6)),  # 0 against 2: no broadcast
    "q2-kv0": ((2, 2, 3, 4), (2, 0, 5, 4), (2, 0, 5, 6)),
}


@pytest.mark.parametrize("case", list(ZERO_HEAD_CASES))
def test_zero_heads_broadcast_like_numpy(kernel, rng, helpers, case):
    """(b) query with 0 heads against key/value with 1, and the reverse."""
    qs, ks, vs = ZERO_HEAD_CASES[case]
    q, k, v = helpers.qkv(rng, qs, ks, vs)
    shape, _ = expected_shape(qs, ks, vs, False)
    for who, sdpa in SDPA_IMPLS.items():
        if shape is None:
            with pytest.raises(ValueError, match=NAMES_AN_ARGUMENT):
                sdpa(q, k, v, return_lse=True)
            continue
        out, lse = sdpa(q, k, v, return_lse=True)
        assert out.shape == shape and lse.shape == shape[:-1], (who, out.shape, lse.shape)


@pytest.mark.parametrize("hq", [1, 2, 3, 4])
def test_zero_kv_heads_with_gqa_is_a_value_error(kernel, rng, helpers, hq):
    """(c) 0 key/value heads with enable_gqa=True: ValueError (Hq = 1 is a
    broadcast, 0 heads), never ZeroDivisionError."""
    q, k, v = helpers.qkv(rng, (2, hq, 3, 4), (2, 0, 5, 4), (2, 0, 5, 6))
    for who, sdpa in SDPA_IMPLS.items():
        if hq == 1:
            assert sdpa(q, k, v, enable_gqa=True).shape == (2, 0, 3, 6), who
            continue
        with pytest.raises(ValueError, match=NAMES_AN_ARGUMENT):
            sdpa(q, k, v, enable_gqa=True)


def half_ulp_tol(dtype):
    """(rtol, atol) allowing two roundings to `dtype`'s grid on top of the
    compute dtype's tolerance."""
    eps = float(finfo(dtype).eps)
    return (2 * eps, 2 * eps) if native(dtype) not in (np.float32, np.float64) else (None, None)


@pytest.mark.parametrize("S", [5, 300, 2100])  # one key tile, several, split-KV chunks
@pytest.mark.parametrize("rows", ["some", "every", "broadcast"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_finfo_min_on_every_key_gives_the_mean_of_v(kernel, rng, helpers, dtype, rows, S):
    """(d) An additive finfo.min on every key of a row (HuggingFace's mask
    value) is a score like any other: the row is the mean of the values
    rows (the scores are lost in finfo.min's rounding), lse finite."""
    cdt = compute_dtype(dtype)
    low = float(finfo(cdt).min)
    q, k, v = helpers.qkv(rng, (2, 3, 4, 8), (2, 3, S, 8), (2, 3, S, 5), dtype)
    if rows == "some":
        mask = rng.standard_normal((4, S)).astype(cdt)
        mask[[1, 3]] = low
        full = [1, 3]
    elif rows == "every":
        mask, full = np.full((4, S), low, cdt), [0, 1, 2, 3]
    else:
        mask, full = np.broadcast_to(np.array(low, cdt), (1, 4, S)), [0, 1, 2, 3]
    got, lse = pyattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, return_lse=True)
    want, wlse = ref.scaled_dot_product_attention(q, k, v, attn_mask=mask, return_lse=True)
    rtol, atol = half_ulp_tol(dtype)
    helpers.assert_close(got, want, rtol=rtol, atol=atol)
    mean = v.astype(np.float64).mean(-2)[..., None, :]
    helpers.assert_close(got[..., full, :].astype(np.float64),
                         np.broadcast_to(mean, got[..., full, :].shape), dtype=np.float64,
                         rtol=rtol or 1e-5, atol=atol or 1e-5)
    assert np.isfinite(lse).all() and np.isfinite(wlse).all(), lse
    np.testing.assert_allclose(lse, wlse, rtol=1e-6)


def _representable(value, dtype):
    return not unrepresentable({"softcap": value}, dtype)


@pytest.mark.parametrize("value", [1e30, 1e300])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_huge_softcap_caps_nothing(kernel, rng, helpers, dtype, value):
    """(e) softcap * tanh(s / softcap) = s for a huge softcap: the result
    without a cap, or (a softcap beyond the compute dtype) a ValueError
    naming softcap; never NaN."""
    q, k, v = helpers.qkv(rng, (2, 2, 5, 8), (2, 2, 150, 8), (2, 2, 150, 4), dtype)
    plain = ref.scaled_dot_product_attention(q, k, v)
    rtol, atol = half_ulp_tol(dtype)
    for who, sdpa in SDPA_IMPLS.items():
        if not _representable(value, dtype):
            try:
                got = sdpa(q, k, v, softcap=value)
            except ValueError as exc:
                assert "softcap" in str(exc), (who, exc)
                continue
        else:
            got = sdpa(q, k, v, softcap=value)
        assert not np.isnan(got).any(), f"{who}: NaN with softcap={value}"
        helpers.assert_close(got, plain, rtol=rtol, atol=atol)


@pytest.mark.parametrize("value", [1e30, 1e300])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_huge_alibi_slope_attends_to_the_diagonal(kernel, rng, helpers, dtype, value):
    """(e) With a huge slope every key but the diagonal one weighs 0: row i
    is value row i, its logsumexp its own score; a slope beyond the
    compute dtype may instead be a ValueError naming alibi_slopes."""
    L, S, H = 6, 150, 2
    q, k, v = helpers.qkv(rng, (2, H, L, 8), (2, H, S, 8), (2, H, S, 4), dtype)
    slopes = np.full(H, value)
    up = [a.astype(np.float64) for a in (q, k)]
    own = (up[0] * up[1][..., :L, :]).sum(-1) / math.sqrt(8)
    rtol, atol = half_ulp_tol(dtype)
    for who, sdpa in SDPA_IMPLS.items():
        try:
            got, lse = sdpa(q, k, v, alibi_slopes=slopes, return_lse=True)
        except ValueError as exc:
            assert unrepresentable({"alibi_slopes": slopes}, dtype), (who, exc)
            assert "alibi_slopes" in str(exc), (who, exc)
            continue
        assert not np.isnan(got).any(), f"{who}: NaN with alibi_slopes={value}"
        helpers.assert_close(got, v[..., :L, :], rtol=rtol, atol=atol)
        np.testing.assert_allclose(lse, own, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["kv_lengths", "bool_mask", "no_keys"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_sink_below_float32_on_a_row_with_no_key(kernel, rng, helpers, dtype, how):
    """(f) A sink of -1e39 (finite in float64, -inf in float32) on rows that
    see no key: zeros, logsumexp -inf (the sink, in float64); elsewhere
    the sink weighs nothing."""
    S = 0 if how == "no_keys" else 70
    q, k, v = helpers.qkv(rng, (2, 2, 3, 8), (2, 2, S, 8), (2, 2, S, 4), dtype)
    kwargs = {"sinks": np.full(2, -1e39)}
    if how == "kv_lengths":
        kwargs["kv_lengths"] = np.array([0, S])
    elif how == "bool_mask":
        mask = np.ones((2, 1, 3, S), bool)
        mask[0] = False
        kwargs["attn_mask"] = mask
    cdt = compute_dtype(dtype)
    sink = float(cast(-1e39, cdt))
    plain = {n: a for n, a in kwargs.items() if n != "sinks"}
    want, wlse = ref.scaled_dot_product_attention(q, k, v, return_lse=True, **plain)
    rtol, atol = half_ulp_tol(dtype)
    for who, sdpa in SDPA_IMPLS.items():
        got, lse = sdpa(q, k, v, return_lse=True, **kwargs)
        assert not np.isnan(got).any() and not np.isnan(lse).any(), (who, got, lse)
        assert (got[0] == 0).all(), (who, got[0])
        assert (lse[0] == sink).all(), (who, lse[0], sink)
        if S:
            helpers.assert_close(got[1], want[1], rtol=rtol, atol=atol)
            np.testing.assert_allclose(lse[1], wlse[1], rtol=1e-6)


def test_claimed_logsumexp_beyond_memory_is_a_value_error(helpers, tmp_path):
    """(g) return_lse for a broadcast query of 2**40 rows and no value
    features (an empty output): a logsumexp of 4 TiB, refused with a
    ValueError before allocating, not a MemoryError."""
    out = _run_child(helpers, tmp_path, _CHILD_PRELUDE + """
    for dt in (np.float32, np.float64, np.float16):
        q = np.broadcast_to(np.zeros((1, 1, 1, 1), dt), (2**20, 1, 2**20, 1))
        k = np.zeros((1, 1, 1, 1), dt)
        v = np.zeros((1, 1, 1, 0), dt)
        attempt(np.dtype(dt).name,
                lambda: [a.shape for a in pyattn.scaled_dot_product_attention(
                    q, k, v, return_lse=True)])
    """.replace("\n    ", "\n"), timeout=90)
    _assert_each_a_clear_value_error(out, 3)


@pytest.mark.parametrize("kernel_name", KERNELS)
def test_broadcast_misaligned_or_big_endian_keys_are_not_expanded(helpers, tmp_path,
                                                                  kernel_name):
    """(h) key/value (and a mask) broadcast from one small misaligned or
    '>f4' row to S = 2**31 - 1 keys claim 1 TiB; only a few keys take part
    (kv_lengths, or a window), so the result is small and cheap.  They must
    be converted at their stored size: under a 4 GiB address-space limit an
    expansion fails.  Every key is the same row, so the result is v's row."""
    out = _run_child(helpers, tmp_path, _CHILD_PRELUDE + """
    S, E = 2**31 - 1, 128

    def small(shape, dt, how):
        dt = np.dtype(dt)
        if how == "big-endian":
            dt = dt.newbyteorder(">")
        n = int(np.prod(shape))
        raw = np.frombuffer(bytearray(n * dt.itemsize + 1), dt, count=n,
                            offset=1 if how == "misaligned" else 0).reshape(shape)
        raw[...] = np.random.default_rng(0).standard_normal(shape)
        return raw

    for dt, how in [(np.float32, "big-endian"), (np.float32, "misaligned"),
                    (np.float64, "big-endian"), (np.float64, "misaligned"),
                    (np.float16, "big-endian"), (np.float16, "misaligned"),
                    (ml_dtypes.bfloat16, "misaligned")]:
        k = np.broadcast_to(small((1, E), dt, how), (S, E))
        v = np.broadcast_to(small((1, 4), dt, how), (S, 4))
        q = np.ones((2, E), dt)
        v0 = v[0].astype(np.float64)
        tol = 1e-2 if np.dtype(dt).itemsize == 2 else 1e-5
        mask = np.broadcast_to(small((1, 1), np.float32 if dt != np.float64 else dt, how),
                               (2, S))
        for limit, kw in [("kv_lengths", {"kv_lengths": np.array(8)}),
                          ("window", {"window": (0, 7)}),
                          ("mask+kv_lengths", {"kv_lengths": np.array(8), "attn_mask": mask})]:
            def run():
                out = pyattn.scaled_dot_product_attention(q, k, v, **kw)
                ok = np.allclose(out.astype(np.float64), v0, rtol=tol, atol=tol)
                return "equal" if ok else f"DIFFERENT {out} vs {v0}"
            attempt(f"{np.dtype(dt).name}/{how}/{limit}", run)
    """.replace("\n    ", "\n"), kernel=kernel_name, timeout=300)
    lines = out.strip().splitlines()
    assert len(lines) == 21, out
    bad = [line for line in lines if line.split()[1:3] != ["RETURNED", "equal"]]
    assert not bad, "\n".join(bad)
