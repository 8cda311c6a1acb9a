"""The bad-input matrix: every public function and layer, given each kind of
bad input, raises ValueError or TypeError with a message that names the
argument (and what was expected or got), and never crashes, hangs or returns
garbage.

MATRIX holds every bad input run in this process, as one row each:
(id, callable, kwargs, expected exception type(s), regex the message must
match).  ISOLATED holds the inputs that claim huge sizes; each runs in a
child interpreter with a time limit (and, outside ASan, a 4 GiB address-space
limit), so a hang or a crash fails that one case instead of the run.

Also here: a failed call leaves a provided ``out`` untouched, and NaN/inf in
query, key or value (or in a layer's inputs) give the same non-finite pattern
as ``pyattn.reference``.
"""
import json
import re
import subprocess
import sys
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import SDPA_IMPLS, USABLE_KERNELS, esc, f32

import pyattn
from pyattn import _dispatch
from pyattn import reference as ref
from pyattn._validation import cpu_count

NCPU = cpu_count()
SENTINEL = np.float32(-12345.5)

Case = namedtuple("Case", "id fn kwargs exc match")


# --------------------------------------------------------------------------
# scaled_dot_product_attention (pyattn and its reference share every rule)
# --------------------------------------------------------------------------

# query (B, Hq, L, E), key (B, Hkv, S, E), value (B, Hkv, S, Ev) -> (B, Hq, L, Ev)
Q, K, V = f32(2, 3, 5, 4), f32(2, 3, 6, 4), f32(2, 3, 6, 4)
OUT_SHAPE = (2, 3, 5, 4)
SCORES = esc((2, 3, 5, 6))


def _overlap_cases():
    """(id, changes) pairs whose `out` shares memory with one input."""
    cases = []
    q_is_out = f32(*OUT_SHAPE)
    cases.append(("out-is-query", dict(query=q_is_out, out=q_is_out), "query"))
    buf = f32(2, 3, 6, 4)
    cases.append(("out-overlaps-query", dict(query=buf[:, :, :5], out=buf[:, :, 1:]), "query"))
    buf = f32(2, 3, 6, 4)
    cases.append(("out-overlaps-key", dict(key=buf, out=buf[:, :, 1:]), "key"))
    buf = f32(2, 3, 6, 4)
    cases.append(("out-overlaps-value", dict(value=buf, out=buf[:, :, :5]), "value"))
    out = f32(*OUT_SHAPE)
    mask = out.reshape(-1)[:30].reshape(5, 6)
    cases.append(("out-overlaps-attn_mask", dict(attn_mask=mask, out=out), "attn_mask"))
    # The same through objects that are not ndarrays but expose the same
    # memory (buffer protocol): the kernel reads them in place.
    buf = f32(2, 3, 6, 4)
    cases.append(("out-overlaps-value-memoryview",
                  dict(value=memoryview(buf), out=buf[:, :, 1:]), "value"))
    buf = f32(2, 3, 6, 4)
    cases.append(("out-overlaps-key-memoryview",
                  dict(key=memoryview(buf), out=buf[:, :, :5]), "key"))
    return cases


def _read_only(shape):
    a = np.full(shape, SENTINEL, np.float32)
    a.setflags(write=False)
    return a


MASK_DTYPE_MSG = r"attn_mask has dtype {}; it must be bool .* or floating"
SCALE_TYPE_MSG = r"scale must be a real number or None, got {}"
NT_TYPE_MSG = r"num_threads must be an int or None, got {}"
NT_RANGE_MSG = (rf"num_threads must be a positive int, or a negative int in \[-{NCPU}, -1\] "
                rf".*{NCPU} CPUs; got {{}}")

# (id, changes to the valid call, exception, regex)
SDPA_SPECS = [
    # wrong ndim, 0-d
    ("query-1d", dict(query=f32(4)), ValueError,
     r"query must have at least 2 dimensions \(\.\.\., L, E\); got shape \(4,\)"),
    ("key-1d", dict(key=f32(4)), ValueError,
     r"key must have at least 2 dimensions \(\.\.\., S, E\); got shape \(4,\)"),
    ("value-1d", dict(value=f32(4)), ValueError,
     r"value must have at least 2 dimensions \(\.\.\., S, Ev\); got shape \(4,\)"),
    ("query-0d-scalar", dict(query=np.float32(1)), ValueError,
     r"query must have at least 2 dimensions.*got shape \(\)"),
    ("query-python-float", dict(query=1.0), ValueError,
     r"query must have at least 2 dimensions.*got shape \(\)"),
    ("key-0d-array", dict(key=np.array(1.0, np.float32)), ValueError,
     r"key must have at least 2 dimensions.*got shape \(\)"),
    ("value-0d-array", dict(value=np.array(1.0, np.float32)), ValueError,
     r"value must have at least 2 dimensions.*got shape \(\)"),
    # head dims, sequence lengths
    ("head-dim-mismatch", dict(key=f32(2, 3, 6, 5)), ValueError,
     rf"query and key must have the same last dimension E; got query {esc((2, 3, 5, 4))} "
     rf"and key {esc((2, 3, 6, 5))}"),
    ("head-dim-zero", dict(query=f32(2, 3, 5, 0), key=f32(2, 3, 6, 0)), ValueError,
     rf"head dimension E must be at least 1; got query {esc((2, 3, 5, 0))}"),
    ("key-value-length-mismatch", dict(value=f32(2, 3, 7, 4)), ValueError,
     rf"key and value must have the same sequence length S.*key {esc((2, 3, 6, 4))} and "
     rf"value {esc((2, 3, 7, 4))}"),
    # batch dims
    ("batch-query-vs-kv", dict(key=f32(4, 3, 6, 4), value=f32(4, 3, 6, 4)), ValueError,
     rf"batch dimensions of query {esc((2,))}, key {esc((4,))} and value {esc((4,))} "
     rf"do not broadcast"),
    ("batch-key-vs-value", dict(value=f32(3, 3, 6, 4)), ValueError,
     rf"batch dimensions of query {esc((2,))}, key {esc((2,))} and value {esc((3,))}"),
    ("batch-2d", dict(query=f32(2, 5, 3, 5, 4)), ValueError,
     rf"batch dimensions of query {esc((2, 5))}, key {esc((1, 2))} and value {esc((1, 2))}"),
    # head counts
    ("heads-query-vs-kv", dict(query=f32(2, 4, 5, 4)), ValueError,
     r"query has 4 heads and key/value have 3 \(dim -3\); they must match or broadcast$"),
    ("heads-query-vs-kv-gqa-hint", dict(query=f32(2, 6, 5, 4)), ValueError,
     r"query has 6 heads and key/value have 3.*pass enable_gqa=True"),
    ("heads-key-vs-value", dict(value=f32(2, 2, 6, 4)), ValueError,
     r"key and value must have the same number of heads \(dim -3\); got 3 and 2"),
    ("heads-gqa-not-multiple", dict(query=f32(2, 4, 5, 4), enable_gqa=True), ValueError,
     r"with enable_gqa=True the query heads Hq=4 must be a multiple of the key/value "
     r"heads Hkv=3"),
    # masks that do not broadcast to the scores (2, 3, 5, 6)
    *[(f"mask-shape-{'x'.join(map(str, shape))}-{np.dtype(dt).name}",
       dict(attn_mask=np.zeros(shape, dt)), ValueError,
       rf"attn_mask of shape {esc(shape)} does not broadcast to the scores shape "
       rf"\(\.\.\., Hq, L, S\) = {SCORES}")
      for shape, dt in [((4, 6), bool), ((5, 7), bool), ((5,), bool), ((2, 5, 6), bool),
                        ((4, 1, 1, 1), bool), ((5, 7), np.float32), ((6, 5), np.float64)]],
    ("mask-more-dims", dict(attn_mask=np.ones((1, 2, 3, 5, 6), bool)), ValueError,
     rf"attn_mask of shape {esc((1, 2, 3, 5, 6))} has more dimensions than the scores "
     rf"\(\.\.\., Hq, L, S\) = {SCORES}"),
    # masks of the wrong dtype
    *[(f"mask-dtype-{np.dtype(dt)}", dict(attn_mask=np.zeros((5, 6), dt)), TypeError,
       MASK_DTYPE_MSG.format(np.dtype(dt)))
      for dt in [np.int64, np.int32, np.int8, np.uint8, np.complex64, np.complex128, object]],
    ("mask-dtype-str-array", dict(attn_mask=np.full((5, 6), "a")), TypeError,
     MASK_DTYPE_MSG.format("<U1")),
    ("mask-str", dict(attn_mask="abc"), TypeError, MASK_DTYPE_MSG.format("<U3")),
    ("mask-int-list", dict(attn_mask=[[1, 0, 1, 0, 1, 0]] * 5), TypeError,
     MASK_DTYPE_MSG.format("int64")),
    ("mask-ragged-list", dict(attn_mask=[[True] * 6, [True] * 5]), ValueError,
     r"attn_mask\b.*(convert|ragged|inhomogeneous)"),
    # scale
    *[(f"scale-{name}", dict(scale=value), ValueError, rf"scale must be finite, got {got}")
      for name, value, got in [("nan", float("nan"), "nan"), ("inf", float("inf"), "inf"),
                               ("-inf", float("-inf"), "-inf"),
                               ("np.float32-nan", np.float32("nan"), "nan"),
                               ("np.float64-inf", np.float64("inf"), "inf"),
                               ("int-beyond-float", 10**400, "an integer of 1329 bits")]],
    *[(f"scale-{name}", dict(scale=value), TypeError, SCALE_TYPE_MSG.format(got))
      for name, value, got in [("bool", True, "bool"), ("np.bool", np.bool_(False), "bool"),
                               ("str", "0.5", "str"), ("complex", 1j, "complex"),
                               ("complex-nan", complex("nan"), "complex"),
                               ("np.complex", np.complex64(1), "complex64"),
                               ("list", [0.5], "list"), ("0d-array", np.array(0.5), "ndarray"),
                               ("array", np.array([0.5, 0.5]), "ndarray")]],
    # ragged nested lists
    ("query-ragged", dict(query=[[1.0] * 4, [1.0] * 3]), ValueError,
     r"query cannot be converted to an array: .*inhomogeneous"),
    ("key-ragged-deep", dict(key=[[[1.0] * 4] * 6, [[1.0] * 4] * 5]), ValueError,
     r"key cannot be converted to an array: .*inhomogeneous"),
    ("value-ragged", dict(value=[[1.0] * 4, [1.0] * 4, [1.0]]), ValueError,
     r"value cannot be converted to an array: .*inhomogeneous"),
    # strings, None, unsupported dtypes
    ("query-str", dict(query="abc"), TypeError,
     r"query has dtype <U3; supported dtypes are float32, float64, float16 or bfloat16"),
    ("key-list-of-str", dict(key=[["a", "b"], ["c", "d"]]), TypeError,
     r"key has dtype <U1; supported dtypes are float32, float64, float16 or bfloat16"),
    ("value-bytes", dict(value=b"xyz"), TypeError, r"value has dtype \|S3; supported dtypes"),
    ("query-None", dict(query=None), TypeError,
     r"query must be an array of float32, float64, float16 or bfloat16.*, got None"),
    ("key-None", dict(key=None), TypeError,
     r"key must be an array of float32, float64, float16 or bfloat16.*, got None"),
    ("value-None", dict(value=None), TypeError,
     r"value must be an array of float32, float64, float16 or bfloat16.*, got None"),
    ("query-dict", dict(query={}), TypeError, r"query has dtype object"),
    *[(f"{which}-dtype-{np.dtype(dt).name}",
       {which: np.ones(shape, dt)}, TypeError,
       rf"{which} has dtype {np.dtype(dt).name}; "
       r"supported dtypes are float32, float64, float16 or bfloat16")
      for which, shape in [("query", (2, 3, 5, 4)), ("key", (2, 3, 6, 4)), ("value", (2, 3, 6, 4))]
      for dt in [np.int64, np.bool_, np.longdouble, np.complex128, object]],
    ("mixed-float-dtypes", dict(key=np.ones((2, 3, 6, 4))), TypeError,
     r"query, key and value must share one dtype "
     r"\(float32, float64, float16 or bfloat16.*\); "
     r"got query float32, key float64, value float32"),
    # flags
    ("is_causal-str", dict(is_causal="yes"), TypeError, r"is_causal must be a bool, got str"),
    ("is_causal-array", dict(is_causal=np.array([True])), TypeError,
     r"is_causal must be a bool, got ndarray"),
    ("enable_gqa-None", dict(enable_gqa=None), TypeError,
     r"enable_gqa must be a bool, got NoneType"),
    # num_threads
    *[(f"num_threads-{n}", dict(num_threads=n), ValueError, NT_RANGE_MSG.format(n))
      for n in [0, -NCPU - 1, -(10**6)]],
    *[(f"num_threads-{n}", dict(num_threads=n), ValueError,
       rf"num_threads must be at most 1024; got {n}") for n in [1025, 2**70]],
    *[(f"num_threads-{name}", dict(num_threads=value), TypeError, NT_TYPE_MSG.format(got))
      for name, value, got in [("float", 1.0, "float"), ("float-2.5", 2.5, "float"),
                               ("str", "2", "str"), ("True", True, "bool"),
                               ("False", False, "bool"), ("np.float64", np.float64(2), "float64"),
                               ("np.bool", np.bool_(True), "bool"),
                               ("0d-array", np.array(2), "ndarray")]],
    # out
    ("out-wrong-shape", dict(out=np.full((2, 3, 5, 3), SENTINEL)), ValueError,
     rf"out has shape {esc((2, 3, 5, 3))}; the result has shape {esc(OUT_SHAPE)}"),
    ("out-broadcastable-shape", dict(out=np.full((1,) + OUT_SHAPE, SENTINEL)), ValueError,
     rf"out has shape {esc((1,) + OUT_SHAPE)}; the result has shape {esc(OUT_SHAPE)}"),
    ("out-transposed-shape", dict(out=np.full((2, 3, 4, 5), SENTINEL)), ValueError,
     rf"out has shape {esc((2, 3, 4, 5))}"),
    ("out-0d", dict(out=np.array(SENTINEL)), ValueError, r"out has shape \(\); the result"),
    ("out-float64", dict(out=np.full(OUT_SHAPE, SENTINEL, np.float64)), TypeError,
     r"out has dtype float64; the result has dtype float32"),
    ("out-int32", dict(out=np.zeros(OUT_SHAPE, np.int32)), TypeError,
     r"out has dtype int32; the result has dtype float32"),
    ("out-list", dict(out=np.zeros(OUT_SHAPE).tolist()), TypeError,
     r"out must be a numpy.ndarray, got list"),
    ("out-scalar", dict(out=np.float32(0)), TypeError, r"out must be a numpy.ndarray, got float32"),
    ("out-read-only", dict(out=_read_only(OUT_SHAPE)), ValueError, r"out is read-only"),
    ("out-broadcast-view", dict(out=np.broadcast_to(np.full(4, SENTINEL), OUT_SHAPE)),
     ValueError, r"out is read-only"),
    *[(cid, changes, ValueError, rf"out overlaps {name} in memory")
      for cid, changes, name in _overlap_cases()],
]

def sdpa_kwargs(changes):
    return dict(dict(query=Q, key=K, value=V), **changes)


SDPA_MATRIX = [Case(f"{impl}:{cid}", fn, sdpa_kwargs(changes), exc, match)
               for impl, fn in SDPA_IMPLS.items()
               for cid, changes, exc, match in SDPA_SPECS]

# --------------------------------------------------------------------------
# SelfAttention
# --------------------------------------------------------------------------

SA = pyattn.SelfAttention(8, rng=0)
X = f32(2, 5, 8)
POSITIVE = "{} must be a positive int, got {}"
REAL_X = r"x must hold real numbers; got dtype {}"


def _ctor_cases(prefix, ctor, base, args):
    """Constructor cases: `args` is (id, changes, exception(s), regex)."""
    return [Case(f"{prefix}:{cid}", ctor, dict(base, **changes), exc, match)
            for cid, changes, exc, match in args]


# A non-int where an int is expected may be TypeError or ValueError; the
# message must name the argument and the value.
NONINT = (TypeError, ValueError)
DIM_ARGS = [
    *[(f"{arg}-{name}", {arg: value}, ValueError if name in ("0", "neg") else NONINT,
       re.escape(POSITIVE.format(arg, repr(value))))
      for arg in ("embed_dim", "kdim", "vdim")
      for name, value in [("0", 0), ("neg", -4), ("float", 8.0), ("float-2.5", 2.5),
                          ("str", "8"), ("bool", True), ("np.float64", np.float64(8))]],
    ("embed_dim-None", dict(embed_dim=None), NONINT, re.escape(POSITIVE.format("embed_dim", None))),
]
DTYPE_ARGS = [
    *[(f"dtype-{np.dtype(dt).name}", dict(dtype=dt), TypeError,
       rf"dtype must be float32 or float64, got {np.dtype(dt).name}")
      for dt in [np.float16, np.int32, int, bool, complex, object, np.longdouble]],
    ("dtype-unknown-str", dict(dtype="banana"), TypeError, r"\bdtype\b.*banana"),
]
RNG_ARGS = [
    *[(f"rng-{name}", dict(rng=value), TypeError,
       rf"rng must be a numpy.random.Generator, an int seed or None, got {got}")
      for name, value, got in [("str", "seed", "str"), ("float", 1.5, "float"),
                               ("RandomState", np.random.RandomState(0), "RandomState"),
                               ("list", [1, 2], "list"), ("object", object(), "object")]],
    ("rng-negative-seed", dict(rng=-1), (TypeError, ValueError), r"\brng\b.*-1"),
]

SA_MATRIX = [
    *_ctor_cases("SelfAttention()", pyattn.SelfAttention, dict(embed_dim=8),
                 DIM_ARGS + DTYPE_ARGS + RNG_ARGS),
    *[Case(f"SelfAttention.__call__:{cid}", SA, dict(dict(x=X), **changes), exc, match)
      for cid, changes, exc, match in [
          ("x-None", dict(x=None), TypeError, r"x must be an array, got None"),
          ("x-str", dict(x="abc"), TypeError, REAL_X.format("<U3")),
          ("x-list-of-str", dict(x=[["a"] * 8]), TypeError, REAL_X.format("<U1")),
          ("x-0d", dict(x=np.float32(1)), ValueError, r"\bx\b.*got shape \(\)"),
          ("x-0d-array", dict(x=np.array(1.0)), ValueError, r"\bx\b.*got shape \(\)"),
          ("x-1d", dict(x=f32(8)), ValueError,
           r"x must have shape \(\.\.\., L, embed_dim\); got shape \(8,\)"),
          ("x-width", dict(x=f32(2, 5, 7)), ValueError,
           r"x must have embed_dim = 8 features in its last axis; got shape \(2, 5, 7\)"),
          ("x-ragged", dict(x=[[1.0] * 8, [1.0] * 7]), ValueError,
           r"x cannot be converted to an array: .*inhomogeneous"),
          ("x-bool", dict(x=np.ones((5, 8), bool)), TypeError, REAL_X.format("bool")),
          ("x-complex", dict(x=np.ones((5, 8), complex)), TypeError, REAL_X.format("complex128")),
          ("x-object", dict(x=np.ones((5, 8), object)), TypeError, REAL_X.format("object")),
          *[(f"attn_mask-shape-{'x'.join(map(str, s))}", dict(attn_mask=np.ones(s, bool)),
             ValueError, rf"attn_mask of shape {esc(s)} does not broadcast.*{esc((2, 5, 5))}")
            for s in [(4, 5), (5, 4), (3, 5, 5)]],
          *[(f"attn_mask-dtype-{np.dtype(dt)}", dict(attn_mask=np.zeros((5, 5), dt)),
             TypeError, MASK_DTYPE_MSG.format(np.dtype(dt)))
            for dt in [np.int64, np.complex128, object, "U1"]],
          ("attn_mask-ragged", dict(attn_mask=[[True] * 5, [True] * 4]), ValueError,
           r"attn_mask\b.*(convert|ragged|inhomogeneous)"),
          ("is_causal-str", dict(is_causal="yes"), TypeError, r"is_causal must be a bool, got str"),
          *[(f"num_threads-{n}", dict(num_threads=n), ValueError, NT_RANGE_MSG.format(n))
            for n in [0, -NCPU - 1]],
          ("num_threads-1025", dict(num_threads=1025), ValueError,
           r"num_threads must be at most 1024"),
          *[(f"num_threads-{name}", dict(num_threads=value), TypeError, NT_TYPE_MSG.format(got))
            for name, value, got in [("float", 1.0, "float"), ("str", "1", "str"),
                                     ("bool", True, "bool")]],
      ]],
]

# --------------------------------------------------------------------------
# MultiHeadAttention: constructor, call, load_state_dict
# --------------------------------------------------------------------------

MHA = pyattn.MultiHeadAttention(8, 2, kdim=6, vdim=4, rng=0)  # separate projections
MHA_PACKED = pyattn.MultiHeadAttention(8, 2, rng=0)
QB, KB, VB = f32(2, 3, 8), f32(2, 5, 6), f32(2, 5, 4)  # (B, L, E), (B, S, kdim), (B, S, vdim)
MHA_MASK_DTYPE = r"{} must be bool \(True = masked out\) or float .*; got dtype {}"

MHA_CTOR_ARGS = [
    *[(cid, changes, exc, match) for cid, changes, exc, match in DIM_ARGS],
    *[(f"num_heads-{name}", dict(num_heads=value), ValueError if name in ("0", "neg") else NONINT,
       re.escape(POSITIVE.format("num_heads", repr(value))))
      for name, value in [("0", 0), ("neg", -2), ("float", 2.0), ("str", "2"), ("None", None),
                          ("bool", True)]],
    *[(f"num_heads-{h}-does-not-divide-{e}", dict(embed_dim=e, num_heads=h), ValueError,
       rf"embed_dim \({e}\) must be divisible by num_heads \({h}\)")
      for e, h in [(8, 3), (4, 8), (10, 4)]],
    *DTYPE_ARGS,
    *RNG_ARGS,
]


def _mha_call_cases():
    cases = []
    for which, good, width, width_name in [("query", QB, 8, "embed_dim"), ("key", KB, 6, "kdim"),
                                           ("value", VB, 4, "vdim")]:
        real = rf"{which} must hold real numbers; got dtype {{}}"
        for cid, bad, exc, match in [
                ("None", None, TypeError, rf"{which} must be an array, got None"),
                ("str", "abc", TypeError, real.format("<U3")),
                ("0d", np.float32(1), ValueError, rf"{which} .*got shape \(\)"),
                ("ragged", [[1.0] * width, [1.0]], ValueError,
                 rf"{which} cannot be converted to an array: .*inhomogeneous"),
                ("bool", np.ones(good.shape, bool), TypeError, real.format("bool")),
                ("complex", np.ones(good.shape, complex), TypeError, real.format("complex128")),
                ("object", np.ones(good.shape, object), TypeError, real.format("object")),
                ("width", f32(*good.shape[:-1], width + 1), ValueError,
                 rf"{which} must have {width_name} = {width} features in its last axis; "
                 rf"got shape {esc(good.shape[:-1] + (width + 1,))}"),
                ("4d", f32(1, *good.shape), ValueError,
                 rf"{which} must (be 3-D|have as many dimensions as query).*"
                 rf"{esc((1,) + good.shape)}"),
                ("1d", f32(width), ValueError,
                 rf"{which} must (be 3-D|have as many dimensions as query).*{esc((width,))}"),
        ]:
            cases.append((f"{which}-{cid}", {which: bad}, exc, match))
    cases += [
        ("all-same-None", dict(query=None, key=None, value=None), TypeError,
         r"query must be an array, got None"),
        ("batch-mismatch", dict(key=f32(3, 5, 6), value=f32(3, 5, 4)), ValueError,
         rf"query and key must have the same batch size \(axis 0\); got query {esc((2, 3, 8))} "
         rf"and key {esc((3, 5, 6))}"),
        ("key-value-length", dict(value=f32(2, 4, 4)), ValueError,
         rf"key and value must agree in all but the last axis; got key {esc((2, 5, 6))} and "
         rf"value {esc((2, 4, 4))}"),
        ("key-unbatched", dict(key=f32(5, 6), value=f32(5, 4)), ValueError,
         rf"key must have as many dimensions as query \(3\); got query {esc((2, 3, 8))} and "
         rf"key {esc((5, 6))}"),
        *[(f"key_padding_mask-shape-{'x'.join(map(str, s))}",
           dict(key_padding_mask=np.zeros(s, bool)), ValueError,
           rf"key_padding_mask must have shape \(2, 5\) \(batch, keys\); got {esc(s)}")
          for s in [(2, 4), (3, 5), (2, 1, 5), (5,), ()]],
        *[(f"attn_mask-shape-{'x'.join(map(str, s))}", dict(attn_mask=np.zeros(s, bool)),
           ValueError, rf"attn_mask must have shape \(3, 5\) or \(4, 3, 5\); got {esc(s)}")
          for s in [(3, 4), (5, 3), (2, 3, 5), (2, 2, 3, 5), (5,), ()]],
        *[(f"{name}-dtype-{np.dtype(dt)}", {name: np.zeros(shape, dt)}, TypeError,
           MHA_MASK_DTYPE.format(name, re.escape(str(np.dtype(dt)))))
          for name, shape in [("key_padding_mask", (2, 5)), ("attn_mask", (3, 5))]
          for dt in [np.int64, np.uint8, np.complex64, object, "U1"]],
        *[(f"{name}-str", {name: "abc"}, TypeError, MHA_MASK_DTYPE.format(name, "<U3"))
          for name in ("key_padding_mask", "attn_mask")],
        *[(f"{name}-ragged", {name: rows}, ValueError,
           rf"{name}\b.*(convert|ragged|inhomogeneous)")
          for name, rows in [("key_padding_mask", [[True] * 5, [True] * 4]),
                             ("attn_mask", [[True] * 5, [True] * 5, [True]])]],
        ("is_causal-str", dict(is_causal="yes"), TypeError, r"is_causal must be a bool, got str"),
        *[(f"num_threads-{n}", dict(num_threads=n), ValueError, NT_RANGE_MSG.format(n))
          for n in [0, -NCPU - 1]],
        *[(f"num_threads-{name}", dict(num_threads=value), TypeError, NT_TYPE_MSG.format(got))
          for name, value, got in [("float", 1.5, "float"), ("str", "2", "str"),
                                   ("bool", False, "bool")]],
    ]
    return cases


def _state_dict_cases(layer):
    good = layer.state_dict()
    keys = list(good)
    expected = re.escape(str(keys))
    cases = []
    for key in keys:
        missing = {k: v for k, v in good.items() if k != key}
        cases.append((f"missing-{key}", dict(state_dict=missing), ValueError,
                      rf"state_dict does not match this layer: missing keys "
                      rf"\[{re.escape(repr(key))}\].*expected keys {expected}"))
    for extra in ["extra", "in_proj_weight" if "q_proj_weight" in good else "q_proj_weight",
                  "out_proj.weight.T"]:
        cases.append((f"unexpected-{extra}", dict(state_dict=dict(good, **{extra: np.zeros(3)})),
                      ValueError, rf"unexpected keys \[{re.escape(repr(extra))}\]"))
    cases.append(("unexpected-int-key", dict(state_dict=dict(good, **{}) | {1: np.zeros(3)}),
                  ValueError, r"unexpected keys \[1\]"))

    def bad_value(key, value, what):
        shape = esc(good[key].shape)
        return (f"{key}-{what}", dict(state_dict=dict(good, **{key: value})), ValueError,
                rf"state_dict\[{re.escape(repr(key))}\] (must be a real array of shape {shape}|"
                rf"cannot be converted to an array)")

    for key, val in good.items():
        shape = val.shape
        cases.append(bad_value(key, np.zeros(shape[:-1] + (shape[-1] + 1,)), "wrong-shape"))
        cases.append(bad_value(key, np.zeros(shape[::-1] + (1,)), "wrong-ndim"))
    key = next(k for k, v in good.items() if v.ndim == 2 and v.shape[0] != v.shape[1])
    cases += [
        bad_value(key, good[key].T, "transposed"),
        bad_value(key, None, "None"),
        bad_value(key, "abc", "str"),
        bad_value(key, np.float32(0), "0d"),
        bad_value(key, [[1.0] * 8, [1.0]], "ragged"),
        bad_value(key, good[key].astype(complex), "complex"),
        bad_value(key, good[key].astype(bool), "bool"),
        bad_value(key, good[key].astype(object), "object"),
        bad_value(key, good[key].astype(str), "str-array"),
    ]
    # strict=False still checks shapes
    bad = dict(good, **{key: np.zeros((1, 1))})
    cases.append((f"{key}-wrong-shape-not-strict", dict(state_dict=bad, strict=False), ValueError,
                  rf"state_dict\[{re.escape(repr(key))}\] must be a real array of shape"))
    for name, value in [("None", None), ("int", 3)]:
        cases.append((f"state_dict-{name}", dict(state_dict=value), (TypeError, ValueError),
                      r"\bstate_dict\b"))
    return cases


LOAD_LAYERS = {
    "packed": pyattn.MultiHeadAttention(8, 2, rng=1),
    "separate": pyattn.MultiHeadAttention(8, 2, kdim=6, vdim=4, rng=2),
    "no-bias": pyattn.MultiHeadAttention(8, 2, bias=False, rng=3),
}
LOAD_SNAPSHOTS = {name: layer.state_dict() for name, layer in LOAD_LAYERS.items()}

MHA_MATRIX = [
    *_ctor_cases("MultiHeadAttention()", pyattn.MultiHeadAttention,
                 dict(embed_dim=8, num_heads=2), MHA_CTOR_ARGS),
    *[Case(f"MultiHeadAttention.__call__:{cid}", MHA, dict(dict(query=QB, key=KB, value=VB),
                                                           **changes), exc, match)
      for cid, changes, exc, match in _mha_call_cases()],
    # query is key is value: the fused path checks the same things
    *[Case(f"MultiHeadAttention.__call__:fused-{cid}", MHA_PACKED,
           dict(query=x, key=x, value=x), exc, match)
      for cid, x, exc, match in [
          ("width", f32(2, 3, 7), ValueError, r"query must have embed_dim = 8 features"),
          ("str", "abc", TypeError, r"query must hold real numbers; got dtype <U3"),
          ("ragged", [[1.0] * 8, [1.0]], ValueError, r"query cannot be converted"),
          ("0d", np.float32(1), ValueError, r"query .*got shape \(\)"),
          ("4d", f32(1, 2, 3, 8), ValueError, r"query must be 3-D \(batched\) or 2-D")]],
    *[Case(f"MultiHeadAttention.load_state_dict@{name}:{cid}", layer.load_state_dict, kwargs,
           exc, match)
      for name, layer in LOAD_LAYERS.items()
      for cid, kwargs, exc, match in _state_dict_cases(layer)],
]

MATRIX = SDPA_MATRIX + SA_MATRIX + MHA_MATRIX


def _ids(cases):
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]
    return ids


@pytest.mark.parametrize("case", MATRIX, ids=_ids(MATRIX))
def test_bad_input_raises_clear_error(case):
    with pytest.raises(case.exc) as info:
        case.fn(**case.kwargs)
    if not re.search(case.match, str(info.value)):
        pytest.fail(f"{type(info.value).__name__}: {info.value!s}\n  does not match "
                    f"{case.match!r}", pytrace=False)


@pytest.mark.parametrize("case", SDPA_MATRIX, ids=_ids(SDPA_MATRIX))
def test_failed_call_leaves_out_untouched(case):
    """Every failing call, given an `out` (a sentinel-filled one unless the
    case brings its own), leaves it and every input exactly as they were."""
    kwargs = dict(case.kwargs)
    if "out" not in kwargs:
        kwargs["out"] = np.full(OUT_SHAPE, SENTINEL, np.float32)
    before = {name: np.array(val, copy=True) for name, val in kwargs.items()
              if isinstance(val, np.ndarray)}
    with pytest.raises(case.exc):
        case.fn(**kwargs)
    for name, snapshot in before.items():
        np.testing.assert_array_equal(kwargs[name], snapshot, err_msg=f"{name} was modified")
    if "out" not in case.kwargs:
        assert (kwargs["out"] == SENTINEL).all()


LOAD_CASES = [c for c in MHA_MATRIX if ".load_state_dict@" in c.id]


@pytest.mark.parametrize("case", LOAD_CASES, ids=_ids(LOAD_CASES))
def test_failed_load_state_dict_leaves_layer_unchanged(case):
    name = case.id.split("@")[1].split(":")[0]
    with pytest.raises(case.exc):
        case.fn(**case.kwargs)
    after = LOAD_LAYERS[name].state_dict()
    snapshot = LOAD_SNAPSHOTS[name]
    assert list(after) == list(snapshot)
    for key in snapshot:
        np.testing.assert_array_equal(after[key], snapshot[key], err_msg=key)
        assert after[key].dtype == snapshot[key].dtype


# --------------------------------------------------------------------------
# scaled_dot_product_attention on small inputs: one test per rule, through
# the `sdpa` fixture (pyattn and its reference).  These cover inputs the
# matrix above does not (2-d and 3-d calls, more dtypes and mask shapes, the
# buffer a refused overlapping `out` shares); the cases the matrix already
# has (the same bad value and message) are not repeated here.
# --------------------------------------------------------------------------

@pytest.fixture(params=list(SDPA_IMPLS))
def sdpa(request):
    return SDPA_IMPLS[request.param]


# dtypes

BAD_DTYPES = {
    "int64": np.ones((2, 3), np.int64),
    "int32": np.ones((2, 3), np.int32),
    "uint8": np.ones((2, 3), np.uint8),
    "bool": np.ones((2, 3), bool),
    "complex128": np.ones((2, 3), np.complex128),
    "complex64": np.ones((2, 3), np.complex64),
    "longdouble": np.ones((2, 3), np.longdouble),
    "object": np.array([[1.0, 2.0, 3.0], [4.0, 5.0, None]], dtype=object),
    "str": np.array([["a", "b", "c"], ["d", "e", "f"]]),
    "int_list": [[1, 2, 3], [4, 5, 6]],
}


@pytest.mark.parametrize("which", ["query", "key", "value"])
@pytest.mark.parametrize("bad", list(BAD_DTYPES))
def test_unsupported_dtype_is_type_error(sdpa, bad, which):
    args = {"query": f32(2, 3), "key": f32(2, 3), "value": f32(2, 3)}
    args[which] = BAD_DTYPES[bad]
    dtype = np.asarray(BAD_DTYPES[bad]).dtype
    match = rf"{which} has dtype {esc(dtype)}.*float32, float64, float16"
    with pytest.raises(TypeError, match=match):
        sdpa(args["query"], args["key"], args["value"])


@pytest.mark.parametrize("dtypes", [(np.float32, np.float64, np.float64),
                                    (np.float64, np.float32, np.float64),
                                    (np.float64, np.float64, np.float32)])
def test_mixed_float_dtypes_are_type_error(sdpa, dtypes):
    q, k, v = (np.ones((4, 3), d) for d in dtypes)
    names = [np.dtype(d).name for d in dtypes]
    with pytest.raises(TypeError, match=(rf"share one dtype.*query {names[0]}, "
                                         rf"key {names[1]}, value {names[2]}")):
        sdpa(q, k, v)


def test_none_input_is_type_error(sdpa):
    with pytest.raises(TypeError, match="key must be an array of float32, float64, .*got None"):
        sdpa(f32(2, 3), None, f32(2, 3))


def test_ragged_input_is_value_error(sdpa):
    with pytest.raises(ValueError, match="value cannot be converted to an array"):
        sdpa(f32(2, 3), f32(2, 3), [[1.0, 2.0, 3.0], [1.0]])


# shapes

@pytest.mark.parametrize("which,shape", [("query", (4,)), ("query", ()), ("key", (3,)),
                                         ("value", (3,)), ("value", ())])
def test_fewer_than_two_dims_is_value_error(sdpa, which, shape):
    args = {"query": f32(2, 3), "key": f32(2, 3), "value": f32(2, 3)}
    args[which] = f32(*shape)
    with pytest.raises(ValueError, match=rf"{which} must have at least 2 dimensions.*"
                                         rf"got shape {esc(shape)}"):
        sdpa(args["query"], args["key"], args["value"])


def test_mismatched_head_dim_is_value_error(sdpa):
    with pytest.raises(ValueError, match=(rf"query and key .* last dimension E.*query "
                                          rf"{esc((2, 4, 5, 8))} and key {esc((2, 4, 6, 7))}")):
        sdpa(f32(2, 4, 5, 8), f32(2, 4, 6, 7), f32(2, 4, 6, 8))


def test_zero_head_dim_is_value_error(sdpa):
    with pytest.raises(ValueError, match=rf"head dimension E must be at least 1.*"
                                         rf"query {esc((2, 5, 0))}"):
        sdpa(f32(2, 5, 0), f32(2, 6, 0), f32(2, 6, 3))


def test_mismatched_sequence_length_is_value_error(sdpa):
    with pytest.raises(ValueError, match=(rf"key and value .* sequence length S.*key "
                                          rf"{esc((2, 3, 6, 8))} and value {esc((2, 3, 7, 8))}")):
        sdpa(f32(2, 3, 5, 8), f32(2, 3, 6, 8), f32(2, 3, 7, 8))


def test_non_broadcastable_batch_is_value_error(sdpa):
    with pytest.raises(ValueError, match=(rf"batch dimensions of query {esc((2,))}, "
                                          rf"key {esc((3,))} and value {esc((3,))}.*broadcast")):
        sdpa(f32(2, 4, 5, 8), f32(3, 4, 6, 8), f32(3, 4, 6, 8))
    with pytest.raises(ValueError, match=(rf"query {esc((2, 3))}, key {esc((2, 1))} and "
                                          rf"value {esc((4, 3))}")):
        sdpa(f32(2, 3, 1, 5, 8), f32(2, 1, 1, 6, 8), f32(4, 3, 1, 6, 8))


def test_key_value_heads_differ_is_value_error(sdpa):
    with pytest.raises(ValueError, match=r"key and value .* same number of heads.* 2 and 3"):
        sdpa(f32(6, 5, 8), f32(2, 6, 8), f32(3, 6, 8), enable_gqa=True)


def test_heads_differ_without_gqa_is_value_error(sdpa):
    with pytest.raises(ValueError, match=r"query has 8 heads and key/value have 2.*enable_gqa"):
        sdpa(f32(1, 8, 5, 4), f32(1, 2, 6, 4), f32(1, 2, 6, 4))
    # Not a multiple: no suggestion to enable GQA.
    with pytest.raises(ValueError, match=r"query has 6 heads and key/value have 4") as info:
        sdpa(f32(6, 5, 4), f32(4, 6, 4), f32(4, 6, 4))
    assert "enable_gqa" not in str(info.value)


@pytest.mark.parametrize("hq,hkv", [(6, 4), (8, 3), (2, 4)])
def test_gqa_heads_not_a_multiple_is_value_error(sdpa, hq, hkv):
    with pytest.raises(ValueError, match=rf"enable_gqa=True.*Hq={hq}.*multiple.*Hkv={hkv}"):
        sdpa(f32(hq, 5, 4), f32(hkv, 6, 4), f32(hkv, 6, 4), enable_gqa=True)


# attn_mask

@pytest.mark.parametrize("mask_shape", [(6, 6), (5, 7), (3, 5, 6), (3, 1, 1, 1), (5, 1, 1)])
def test_mask_not_broadcastable_is_value_error(sdpa, mask_shape):
    # scores (..., Hq, L, S) = (2, 2, 5, 6)
    with pytest.raises(ValueError, match=(rf"attn_mask of shape {esc(mask_shape)} does not "
                                          rf"broadcast.*{esc((2, 2, 5, 6))}")):
        sdpa(f32(2, 2, 5, 3), f32(2, 2, 6, 3), f32(2, 2, 6, 3), attn_mask=f32(*mask_shape) > 0)


def test_mask_with_more_dims_than_scores_is_value_error(sdpa):
    with pytest.raises(ValueError, match=(rf"attn_mask of shape {esc((1, 1, 5, 6))} has more "
                                          rf"dimensions than the scores.*{esc((1, 5, 6))}")):
        sdpa(f32(5, 3), f32(6, 3), f32(6, 3), attn_mask=np.zeros((1, 1, 5, 6), np.float32))


@pytest.mark.parametrize("dtype", [np.int64, np.int8, np.uint8, np.complex64, object])
def test_mask_of_non_bool_non_float_dtype_is_type_error(sdpa, dtype):
    mask = np.zeros((5, 6), dtype)
    with pytest.raises(TypeError, match=rf"attn_mask has dtype {esc(mask.dtype)}.*bool.*float"):
        sdpa(f32(5, 3), f32(6, 3), f32(6, 3), attn_mask=mask)


@pytest.mark.parametrize("value", [-1e300, 1e300, float(np.finfo(np.float64).min)])
def test_mask_values_beyond_the_compute_dtype_are_value_errors(sdpa, value):
    """A float64 mask on float32 inputs is converted to float32, where a finite
    value beyond its range would become inf (masking a key, or NaN); refused
    by name.  -inf masks as given, and float32's own finfo.min is a score."""
    mask = np.zeros((5, 6))
    mask[2, 3] = value
    with pytest.raises(ValueError, match=r"attn_mask holds 1 finite value.*float32"):
        sdpa(f32(5, 3), f32(6, 3), f32(6, 3), attn_mask=mask)
    mask[2, 3] = -np.inf
    assert np.isfinite(sdpa(f32(5, 3), f32(6, 3), f32(6, 3), attn_mask=mask)).all()
    mask[2] = np.finfo(np.float32).min
    assert np.isfinite(sdpa(f32(5, 3), f32(6, 3), f32(6, 3), attn_mask=mask)).all()


def test_mask_int_list_is_type_error(sdpa):
    with pytest.raises(TypeError, match="attn_mask has dtype int"):
        sdpa(f32(2, 3), f32(2, 3), f32(2, 3), attn_mask=[[1, 0], [0, 1]])


# flags

@pytest.mark.parametrize("flag", ["is_causal", "enable_gqa"])
@pytest.mark.parametrize("value", [np.array([True, False]), "yes", 1, None])
def test_non_bool_flag_is_type_error(sdpa, flag, value):
    with pytest.raises(TypeError, match=rf"{flag} must be a bool, got {type(value).__name__}"):
        sdpa(f32(2, 3), f32(2, 3), f32(2, 3), **{flag: value})


# num_threads

# 1025 and 2**70 are in SDPA_SPECS.
@pytest.mark.parametrize("n", [50_000, 2**31])
def test_num_threads_above_the_limit_is_value_error(sdpa, n):
    with pytest.raises(ValueError, match=rf"num_threads must be at most 1024; got {n}"):
        sdpa(f32(2, 3), f32(2, 3), f32(2, 3), num_threads=n)


# out

def test_out_wrong_shape_is_value_error(sdpa):
    with pytest.raises(ValueError, match=rf"out has shape {esc((2, 5, 4))}; the result has "
                                         rf"shape {esc((2, 5, 3))}"):
        sdpa(f32(2, 5, 4), f32(2, 6, 4), f32(2, 6, 3), out=f32(2, 5, 4))
    # A broadcastable but different shape is still wrong.
    with pytest.raises(ValueError, match=rf"out has shape {esc((1, 2, 5, 3))}"):
        sdpa(f32(2, 5, 4), f32(2, 6, 4), f32(2, 6, 3), out=f32(1, 2, 5, 3))


@pytest.mark.parametrize("name", ["query", "key", "value", "attn_mask"])
def test_out_overlapping_an_input_is_value_error(sdpa, name):
    buf = np.random.default_rng(0).standard_normal((4, 6, 3)).astype(np.float32)
    args = {"query": f32(5, 3), "key": f32(6, 3), "value": f32(6, 3), "attn_mask": f32(5, 6)}
    args[name] = buf[0] if name != "query" else buf[0, :5]
    if name == "attn_mask":
        args[name] = buf.reshape(-1)[:30].reshape(5, 6)
    out = buf[0, 1:, :] if name != "attn_mask" else buf[1, :5, :]  # overlaps the input
    assert np.shares_memory(out, args[name])
    before = buf.copy()
    with pytest.raises(ValueError, match=rf"out overlaps {name} in memory"):
        sdpa(args["query"], args["key"], args["value"], attn_mask=args["attn_mask"], out=out)
    assert np.array_equal(buf, before)


# A failed call writes nothing

FAILING_CALLS = {
    "dtype": (dict(query=np.ones((5, 4), np.int64)), TypeError),
    "mixed_dtype": (dict(key=np.ones((6, 4), np.float64)), TypeError),
    "head_dim": (dict(key=f32(6, 5)), ValueError),
    "seq_len": (dict(value=f32(7, 3)), ValueError),
    "mask_shape": (dict(attn_mask=np.ones((4, 6), bool)), ValueError),
    "mask_dtype": (dict(attn_mask=np.ones((5, 6), np.int32)), TypeError),
    "scale": (dict(scale=float("nan")), ValueError),
    "num_threads_zero": (dict(num_threads=0), ValueError),
    "num_threads_type": (dict(num_threads=2.0), TypeError),
    "gqa": (dict(query=f32(3, 5, 4), key=f32(2, 6, 4), value=f32(2, 6, 3), enable_gqa=True),
            ValueError),
}


@pytest.mark.parametrize("case", list(FAILING_CALLS))
def test_failed_small_call_leaves_out_untouched(sdpa, case):
    changes, exc = FAILING_CALLS[case]
    args = dict(query=f32(5, 4), key=f32(6, 4), value=f32(6, 3))
    args.update(changes)
    out_shape = (3, 5, 3) if case == "gqa" else (5, 3)
    out = np.full(out_shape, 12345.0, np.float32)
    with pytest.raises(exc):
        sdpa(args.pop("query"), args.pop("key"), args.pop("value"), out=out, **args)
    assert (out == 12345.0).all()


# --------------------------------------------------------------------------
# NaN and inf inside query, key or value
# --------------------------------------------------------------------------

SHAPES = {  # (L, S): one tile; several tiles (causal skips some); split-KV decode
    "small": (5, 7),
    "tiled": (264, 264),
    "decode": (1, 4096),
}
# Every kernel in float32, the chosen one in float64.
KERNEL_DTYPES = ([(k, np.float32) for k in USABLE_KERNELS]
                 + [(_dispatch.KERNEL, np.float64)])


def _excluded_band(S):
    """Keys the bool/float masks hide from every query: a whole split-KV chunk
    (1024 keys) for decode, a whole BLOCK_N (128) tile when tiled."""
    return (1024, 2048) if S >= 4096 else (128, 256) if S >= 256 else (0, 2)


def _nonfinite_problem(dtype, where, value, mask_kind, shape):
    L, S = SHAPES[shape]
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 1, L, 8)).astype(dtype)
    k = rng.standard_normal((2, 1, S, 8)).astype(dtype)
    v = rng.standard_normal((2, 1, S, 8)).astype(dtype)
    band = _excluded_band(S)
    bad_row = {"query": L // 2, "key": S // 2, "value": S // 2,
               "value-excluded-key": band[0] + 1}[where]
    {"query": q, "key": k}.get(where, v)[1, 0, bad_row, 3] = value
    mask, causal = None, mask_kind == "causal"
    if mask_kind in ("bool", "float"):
        keep = np.ones((L, S), bool)
        keep[::2, bad_row if where != "query" else 0] = False  # even rows do not see it
        keep[:, band[0]:band[1]] = False
        mask = keep if mask_kind == "bool" else np.where(keep, 0.0, -np.inf).astype(dtype)
    return dict(query=q, key=k, value=v, attn_mask=mask, is_causal=causal)


_REFERENCE_RESULTS = {}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "causal"])
@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["query", "key", "value", "value-excluded-key"])
@pytest.mark.parametrize("kernel_dtype", KERNEL_DTYPES,
                         ids=[f"{k}-{np.dtype(d).name}" for k, d in KERNEL_DTYPES])
def test_nonfinite_inputs_match_reference(kernel_dtype, where, value, mask_kind, shape,
                                          monkeypatch):
    """A NaN or inf in one element of query or key makes exactly the same
    output elements NaN / +inf / -inf as in pyattn.reference, and only in that
    (batch, head).  In a value row (README: NaN and inf) it reaches every row
    that gives its key a nonzero weight; rows that give it weight 0 may get
    NaN too (0 * NaN, as the reference always does), but only where the
    reference has one.  `value-excluded-key` puts it in a value row whose key
    the bool/float masks hide from every query row (a whole tile, or a whole
    split-KV chunk), and causality from the query rows before it."""
    kernel, dtype = kernel_dtype
    monkeypatch.setattr(_dispatch, "KERNEL", kernel)
    args = _nonfinite_problem(dtype, where, value, mask_kind, shape)
    got = pyattn.scaled_dot_product_attention(**args)
    key = (np.dtype(dtype).name, where, str(value), mask_kind, shape)
    if key not in _REFERENCE_RESULTS:
        with np.errstate(invalid="ignore", over="ignore"):
            _REFERENCE_RESULTS[key] = ref.scaled_dot_product_attention(**args)
    expected = _REFERENCE_RESULTS[key]
    if where.startswith("value"):
        # The weight each query row gives the poisoned value row: attention
        # over a value that is 1 there and 0 elsewhere.
        indicator = np.zeros_like(args["value"])
        indicator[~np.isfinite(args["value"])] = 1
        weight = ref.scaled_dot_product_attention(**dict(args, value=indicator))
        must = (weight > 0).any(-1)
        got_bad, ref_bad = ((~np.isfinite(a)).any(-1) for a in (got, expected))
        assert (got_bad >= must).all(), "a row that attends the poisoned value row is finite"
        assert (got_bad <= ref_bad).all(), "a non-finite row the reference does not have"
        assert np.isfinite(got[0]).all()
        return
    for name, test in [("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)]:
        ga, ea = test(got).any(-1), test(expected).any(-1)
        if not np.array_equal(test(got), test(expected)):
            pytest.fail(
                f"{name} differs from the reference: pyattn has it in {int(ga.sum())} rows, "
                f"the reference in {int(ea.sum())} rows; (batch, head, row) only in pyattn: "
                f"{np.argwhere(ga & ~ea)[:3].tolist()}, only in the reference: "
                f"{np.argwhere(ea & ~ga)[:3].tolist()}", pytrace=False)
    assert np.isfinite(got[0]).all()  # the other batch entry


def _sa_oracle(layer, x, is_causal):
    q, k, v = x @ layer.w_q, x @ layer.w_k, x @ layer.w_v
    return ref.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


def _mha_oracle(layer, query, key, value, key_padding_mask, is_causal):
    sd = layer.state_dict()
    wq, wk, wv = np.split(sd["in_proj_weight"], 3)
    bq, bk, bv = np.split(sd["in_proj_bias"], 3)
    H, D = layer.num_heads, layer.head_dim

    def heads(a):
        return a.reshape(a.shape[0], a.shape[1], H, D).swapaxes(1, 2)

    q, k, v = heads(query @ wq.T + bq), heads(key @ wk.T + bk), heads(value @ wv.T + bv)
    attend = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    o = ref.scaled_dot_product_attention(q, k, v, attn_mask=attend, is_causal=is_causal)
    o = o.swapaxes(1, 2).reshape(query.shape)
    return o @ sd["out_proj.weight"].T + sd["out_proj.bias"]


@pytest.mark.parametrize("L", [6, 300])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("token", ["first", "middle", "last"])
def test_self_attention_nonfinite_matches_reference(token, value, is_causal, L):
    layer = pyattn.SelfAttention(16, rng=0)
    x = np.random.default_rng(3).standard_normal((2, L, 16)).astype(np.float32)
    x[1, {"first": 0, "middle": L // 2, "last": L - 1}[token], 5] = value
    got = layer(x, is_causal=is_causal)
    with np.errstate(invalid="ignore", over="ignore"):
        expected = _sa_oracle(layer, x, is_causal)
    # x's bad token poisons q, k and v: its own row and (value rule, see
    # above) every row that attends it are non-finite, never more than in the
    # reference, and rows before it under causality stay finite.
    bad = {"first": 0, "middle": L // 2, "last": L - 1}[token]
    got_bad, ref_bad = ((~np.isfinite(a[1])).any(-1) for a in (got, expected))
    must = np.arange(L) >= bad if is_causal else np.ones(L, bool)
    assert (got_bad >= must).all() and (got_bad <= ref_bad).all()
    assert np.isfinite(got[0]).all()


@pytest.mark.parametrize("L", [6, 300])
@pytest.mark.parametrize("case", ["query", "key", "value", "padded-key", "causal-key"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_nonfinite_matches_reference(case, L, need_weights):
    """NaN in one token of query, key or value gives the same NaN rows as the
    reference oracle.  In a padded key token (garbage there is common) it
    reaches no row at all: a key_padding_mask that pads the end of each
    sequence becomes kv_lengths, and padded keys are never read (the oracle,
    like torch, spreads it through 0 * NaN)."""
    layer = pyattn.MultiHeadAttention(16, 2, rng=0)
    rng = np.random.default_rng(4)
    query, key, value = (rng.standard_normal((2, L, 16)).astype(np.float32) for _ in range(3))
    pad = None
    causal = case == "causal-key"
    tok = L // 2
    if case == "query":
        query[1, tok, 3] = np.nan
    elif case in ("key", "causal-key"):
        key[1, tok, 3] = np.nan
    elif case == "value":
        value[1, tok, 3] = np.nan
    else:  # padding: the last token of batch 1 is masked out, and holds garbage
        pad = np.zeros((2, L), bool)
        pad[1, -1] = True
        key[1, -1] = np.nan
        value[1, -1] = np.nan
    got, _ = layer(query, key, value, key_padding_mask=pad, is_causal=causal,
                   need_weights=need_weights)
    if case == "padded-key":
        assert np.isfinite(got).all()
        clean_key, clean_value = key.copy(), value.copy()
        clean_key[1, -1] = clean_value[1, -1] = 0
        expected = _mha_oracle(layer, query, clean_key, clean_value, pad, causal)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        return
    with np.errstate(invalid="ignore", over="ignore"):
        expected = _mha_oracle(layer, query, key, value, pad, causal)
    if not np.array_equal(np.isnan(got).any(-1), np.isnan(expected).any(-1)):
        pytest.fail(f"rows with NaN differ: pyattn {int(np.isnan(got).any(-1).sum())}, "
                    f"reference {int(np.isnan(expected).any(-1).sum())}", pytrace=False)
    assert np.isfinite(got[0]).all()


# --------------------------------------------------------------------------
# Huge claimed sizes, each in a child interpreter with a time limit
# --------------------------------------------------------------------------

# (id, callable, kwargs) as Python expressions evaluated in the child, the
# exception(s) expected, and a regex for the message.  `bc(shape, dtype)` is a
# zero-strided np.broadcast_to view that claims `shape` without allocating it.
_TOO_BIG = r"(too (big|large)|exceed|larger than|at most|limit|bytes|[KMGTPE]iB|elements)"


def _names(*args):
    """The message names one of `args` and says the size is the problem."""
    return rf"(?=.*\b({'|'.join(args)})\b)(?=.*{_TOO_BIG})"


MHA_EXPR = "pyattn.MultiHeadAttention(8, 2, rng=0)"
SDPA_FNS = {"pyattn": "pyattn.scaled_dot_product_attention",
            "reference": "pyattn.reference.scaled_dot_product_attention"}
ISOLATED = [
    *[Case(f"{impl}:{cid}", fn, kwargs, exc, match)
      for impl, fn in SDPA_FNS.items()
      for cid, kwargs, exc, match in [
          # The result itself would hold 2**40 elements (4 TiB).
          ("query-claims-2^40", "dict(query=bc((2**20, 2**9, 32, 64)), key=f32(1, 1, 1, 64), "
           "value=f32(1, 1, 1, 64))", ValueError, _names("query", "result", "out")),
          # A small result, but 2**40 claimed key/value elements to read.
          ("key-value-claim-2^40", "dict(query=f32(1, 64), key=bc((2**34, 64)), "
           "value=bc((2**34, 64)))", ValueError, _names("key", "value", "S")),
          ("key-value-claim-2^40-E1", "dict(query=f32(1, 1), key=bc((2**40, 1)), "
           "value=bc((2**40, 1)))", ValueError, _names("key", "value", "S")),
          # L * S = 2**64 scores: beyond any index, and the mask is not at fault.
          ("scores-beyond-int64", "dict(query=bc((2**31, 1)), key=bc((2**33, 1)), "
           "value=bc((2**33, 1)), attn_mask=np.zeros((1, 1), np.float32))", ValueError,
           r"^(?!.*does not broadcast)" + _names("query", "key", "scores")),
          # Every size within its limit, but 2**63 multiply-adds (the fast path's
          # shape): refused, not run for years.
          ("work-beyond-2^60", "dict(query=bc((1, 2**31 - 1, 1)), key=bc((1, 2**31 - 1, 1)), "
           "value=bc((1, 2**31 - 1, 1)))", ValueError,
           r"query, key and value claim 9\.22e\+18 multiply-adds.*2\*\*60"),
          # Batch dimensions that broadcast to 2**60 elements.
          ("batch-beyond-int64", "dict(query=bc((2**30, 1, 1, 64)), key=bc((1, 2**30, 1, 64)), "
           "value=f32(1, 1, 1, 64))", ValueError, _names("query", "key", "batch", "result")),
          # Huge masks that do not broadcast: the shape error, not an allocation.
          ("bool-mask-claims-2^40", "dict(query=f32(4, 64), key=f32(8, 64), value=f32(8, 64), "
           "attn_mask=bc((2**36, 4, 8), bool))", ValueError,
           r"attn_mask of shape \(68719476736, 4, 8\) does not broadcast"),
          ("float64-mask-claims-2^40", "dict(query=f32(4, 64), key=f32(8, 64), value=f32(8, 64), "
           "attn_mask=bc((2**36, 4, 8), np.float64))", ValueError,
           r"attn_mask of shape \(68719476736, 4, 8\) does not broadcast"),
          ("float64-mask-claims-2^38-2d", "dict(query=f32(4, 64), key=f32(8, 64), "
           "value=f32(8, 64), attn_mask=bc((4, 2**36), np.float64))", ValueError,
           r"attn_mask of shape \(4, 68719476736\) does not broadcast"),
          ("out-claims-2^40", "dict(query=f32(4, 64), key=f32(8, 64), value=f32(8, 64), "
           "out=bc((2**38, 4, 64)))", ValueError, r"out has shape \(274877906944, 4, 64\)"),
      ]],
    Case("SelfAttention():embed_dim-2^40", "pyattn.SelfAttention", "dict(embed_dim=2**40)",
         ValueError, _names("embed_dim")),
    Case("SelfAttention():embed_dim-2^20", "pyattn.SelfAttention", "dict(embed_dim=2**20)",
         ValueError, _names("embed_dim")),
    Case("SelfAttention():kdim-2^40", "pyattn.SelfAttention", "dict(embed_dim=8, kdim=2**40)",
         ValueError, _names("kdim")),
    Case("SelfAttention():vdim-2^40", "pyattn.SelfAttention", "dict(embed_dim=8, vdim=2**40)",
         ValueError, _names("vdim")),
    Case("MultiHeadAttention():embed_dim-2^40", "pyattn.MultiHeadAttention",
         "dict(embed_dim=2**40, num_heads=1)", ValueError, _names("embed_dim")),
    Case("MultiHeadAttention():embed_dim-2^40-heads-2^20", "pyattn.MultiHeadAttention",
         "dict(embed_dim=2**40, num_heads=2**20)", ValueError, _names("embed_dim")),
    Case("MultiHeadAttention():embed_dim-2^62", "pyattn.MultiHeadAttention",
         "dict(embed_dim=2**62, num_heads=1)", ValueError, _names("embed_dim")),
    Case("MultiHeadAttention():kdim-2^40", "pyattn.MultiHeadAttention",
         "dict(embed_dim=8, num_heads=2, kdim=2**40)", ValueError, _names("kdim")),
    Case("SelfAttention.__call__:x-claims-2^40", "pyattn.SelfAttention(8, rng=0)",
         "dict(x=bc((2**37, 8)))", ValueError, _names("x")),
    Case("SelfAttention.__call__:attn_mask-claims-2^40", "pyattn.SelfAttention(8, rng=0)",
         "dict(x=f32(2, 8), attn_mask=bc((2**38, 2, 2), bool))", ValueError,
         r"attn_mask of shape \(274877906944, 2, 2\) does not broadcast"),
    Case("MultiHeadAttention.__call__:key-value-claim-2^40", MHA_EXPR,
         "dict(query=f32(1, 1, 8), key=bc((1, 2**37, 8)), value=bc((1, 2**37, 8)), "
         "need_weights=False)", ValueError, _names("key", "value")),
    Case("MultiHeadAttention.__call__:query-claims-2^40-batch", MHA_EXPR,
         "dict(query=bc((2**37, 1, 8)), key=f32(1, 1, 8), value=f32(1, 1, 8))", ValueError,
         r"query and key must have the same batch size"),
    Case("MultiHeadAttention.__call__:key_padding_mask-claims-2^40",
         MHA_EXPR,
         "dict(query=f32(1, 1, 8), key=f32(1, 2, 8), value=f32(1, 2, 8), "
         "key_padding_mask=bc((2**40, 2), bool))", ValueError,
         r"key_padding_mask must have shape \(1, 2\)"),
    Case("MultiHeadAttention.__call__:attn_mask-claims-2^40", MHA_EXPR,
         "dict(query=f32(1, 2, 8), key=f32(1, 2, 8), value=f32(1, 2, 8), "
         "attn_mask=bc((2**40, 2, 2), np.float64))", ValueError, r"attn_mask must have shape"),
    # Allocations outside attention proper: merging, a cache, the reference's scores.
    Case("merge_attention:outputs-claim-2^41", "pyattn.merge_attention",
         "dict(outputs=bc((2, 2**20, 2**14, 64)), lses=bc((2, 2**20, 2**14)))", ValueError,
         _names("outputs", "merging")),
    Case("merge_attention:parts-claim-2^40", "pyattn.merge_attention",
         "dict(outputs=[bc((2**20, 2**14, 64))] * 2, lses=[bc((2**20, 2**14))] * 2)",
         ValueError, _names("outputs")),
    Case("KVCache():sizes-2^50", "pyattn.KVCache",
         "dict(batch=2**20, num_kv_heads=2**10, head_dim=2**10)", ValueError,
         _names("batch", "num_kv_heads", "head_dim")),
    Case("KVCache():max_len-4-sizes-2^50", "pyattn.KVCache",
         "dict(batch=2**20, num_kv_heads=2**10, head_dim=2**10, max_len=4)", ValueError,
         _names("batch", "num_kv_heads", "head_dim")),
    Case("KVCache.append:claims-2^40-positions", "pyattn.KVCache(1, 1, 64).append",
         "dict(k_new=bc((1, 1, 2**40, 64)), v_new=bc((1, 1, 2**40, 64)))", ValueError,
         _names("k_new", "v_new")),
    Case("reference:scores-2^40", "pyattn.reference.scaled_dot_product_attention",
         "dict(query=bc((2**20, 8)), key=bc((2**20, 8)), value=bc((2**20, 8)))", ValueError,
         _names("scores") + _names("query", "key")),
    Case("MultiHeadAttention.load_state_dict:claims-2^40",
         "pyattn.MultiHeadAttention(8, 2, rng=0).load_state_dict",
         "dict(state_dict={'in_proj_weight': bc((2**20, 2**20)), 'in_proj_bias': f32(24), "
         "'out_proj.weight': f32(8, 8), 'out_proj.bias': f32(8)})", ValueError,
         r"state_dict\['in_proj_weight'\] must be a real array of shape \(24, 8\)"),
]

ISOLATED_TIMEOUT = 15.0  # seconds per child; a correct refusal takes well under 1
ISOLATED_WORKERS = 4  # children running at once
_CHILD = r"""
import json, os, sys
if "asan" not in os.environ.get("LD_PRELOAD", ""):  # ASan needs its shadow address space
    import resource
    limit = 4 << 30
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
import numpy as np
import pyattn, pyattn.reference

def f32(*shape):
    return np.ones(shape, np.float32)

def bc(shape, dtype=np.float32):
    return np.broadcast_to(np.zeros((), dtype), shape)

fn, kwargs = eval(sys.argv[1]), eval(sys.argv[2])
try:
    fn(**kwargs)
except BaseException as exc:
    result = dict(type=type(exc).__name__, message=str(exc),
                  value_error=isinstance(exc, ValueError), type_error=isinstance(exc, TypeError))
else:
    result = dict(type=None, message="", value_error=False, type_error=False)
print(json.dumps(result))
"""


def _run_child(case, cwd, env):
    """(returncode or None on timeout, stdout, stderr) of one ISOLATED case."""
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, case.fn, case.kwargs], cwd=cwd,
                              env=env, capture_output=True, text=True, timeout=ISOLATED_TIMEOUT)
    except subprocess.TimeoutExpired:  # run() has killed the child
        return None, "", ""
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module", autouse=True)
def isolated_runs(helpers, tmp_path_factory):
    """Starts every ISOLATED case in a pool of child interpreters as soon as
    this module's first test runs; they work in the background while the
    other tests run, and each test below waits for its own result."""
    cwd = tmp_path_factory.mktemp("isolated")
    env = helpers.child_env(OMP_NUM_THREADS=1, OPENBLAS_NUM_THREADS=1, MKL_NUM_THREADS=1)
    with ThreadPoolExecutor(max_workers=ISOLATED_WORKERS) as pool:
        yield {case.id: pool.submit(_run_child, case, cwd, env) for case in ISOLATED}


@pytest.mark.parametrize("case", ISOLATED, ids=_ids(ISOLATED))
def test_huge_claimed_size_is_refused(case, isolated_runs):
    call = f"{case.fn}(**{case.kwargs})"
    returncode, stdout, stderr = isolated_runs[case.id].result()
    if returncode is None:
        pytest.fail(f"{call} neither returned nor raised within {ISOLATED_TIMEOUT:.0f} s "
                    f"(it hangs, or computes for ever)", pytrace=False)
    if returncode != 0:
        pytest.fail(f"{call}: the child died with exit code {returncode}\n{stderr}", pytrace=False)
    result = json.loads(stdout.strip().splitlines()[-1])
    expected = case.exc if isinstance(case.exc, tuple) else (case.exc,)
    flags = {ValueError: "value_error", TypeError: "type_error"}
    if not any(result[flags[e]] for e in expected):
        pytest.fail(f"{call} raised {result['type']}: {result['message']}\n  expected "
                    f"{' or '.join(e.__name__ for e in expected)}", pytrace=False)
    if not re.search(case.match, result["message"], re.S):
        pytest.fail(f"{call} raised {result['type']}: {result['message']}\n  does not match "
                    f"{case.match!r}", pytrace=False)


# --------------------------------------------------------------------------
# Found by an adversarial review: teams beyond the driver's tables, a claimed
# result size that overflows int64 on the fast path, an int softcap beyond
# float range, and an `out` whose elements share memory
# --------------------------------------------------------------------------

def test_openmp_default_beyond_1024_threads_is_capped(helpers, tmp_path):
    proc = helpers.run_python(
        "import numpy as np, pyattn\n"
        "q = np.ones((1, 1100, 64, 64), np.float32)\n"
        "print(pyattn.scaled_dot_product_attention(q, q, q).shape)\n",
        cwd=tmp_path, OMP_NUM_THREADS=1100)
    assert proc.stdout.strip() == "(1, 1100, 64, 64)"


def test_claimed_result_beyond_int64_is_value_error():
    z = np.zeros(1, np.float32)
    strided = np.lib.stride_tricks.as_strided
    q, k = strided(z, (1, 2**40, 1, 1), (0,) * 4), strided(z, (1, 1, 1, 1), (0,) * 4)
    v = strided(z, (1, 1, 1, 2**40), (0,) * 4)
    with pytest.raises(ValueError, match="the result, of shape"):
        pyattn.scaled_dot_product_attention(q, k, v)


def test_softcap_int_beyond_float_range_is_value_error():
    q = np.ones((1, 2, 4), np.float32)
    with pytest.raises(ValueError, match="softcap must be finite"):
        pyattn.scaled_dot_product_attention(q, q, q, softcap=2**1030)


def test_out_with_elements_sharing_memory_is_value_error():
    q = np.ones((1, 2, 3, 4), np.float32)
    shared = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), q.shape, (0,) * 4,
                                             writeable=True)
    with pytest.raises(ValueError, match="out has elements that share memory"):
        pyattn.scaled_dot_product_attention(q, q, q, out=shared)
    transposed = np.zeros(q.shape[::-1], np.float32).transpose(3, 2, 1, 0)  # fine
    pyattn.scaled_dot_product_attention(q, q, q, out=transposed)
    np.testing.assert_array_equal(transposed, pyattn.scaled_dot_product_attention(q, q, q))


def test_interleaved_out_with_distinct_elements_is_accepted():
    # byte offsets 0, 8, 16 and 12, 20, 28: no two elements share memory,
    # though the stride test alone (12 < 8 * 2 + 4) cannot show it
    interleaved = np.lib.stride_tricks.as_strided(np.zeros(8, np.float32), (2, 3), (12, 8))
    q, k, v = f32(2, 4), np.arange(20, dtype=np.float32).reshape(5, 4), f32(5, 3)
    pyattn.scaled_dot_product_attention(q, k, v, out=interleaved)
    np.testing.assert_array_equal(interleaved, pyattn.scaled_dot_product_attention(q, k, v))
    overlapping = np.lib.stride_tricks.as_strided(np.zeros(8, np.float32), (2, 3), (8, 4))
    with pytest.raises(ValueError, match="out has elements that share memory"):
        pyattn.scaled_dot_product_attention(q, k, v, out=overlapping)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 4), st.integers(-20, 20)), min_size=1, max_size=3),
       st.sampled_from([1, 2, 4]))
def test_self_overlap_check_is_exact(axes, itemsize):
    """_self_overlapping says whether two elements' bytes meet, for any strides
    (elements on whole multiples of their size or not)."""
    from pyattn._outputs import _self_overlapping

    shape, strides = zip(*axes)
    low = sum(min(0, (n - 1) * st) for n, st in axes)
    high = sum(max(0, (n - 1) * st) for n, st in axes) + itemsize
    base = np.zeros(high - low, np.uint8)
    view = np.ndarray(shape, dtype=f"V{itemsize}", buffer=base, offset=-low, strides=strides)
    offsets = sorted(sum(i * st for i, st in zip(index, strides)) for index in np.ndindex(*shape))
    meet = any(b - a < itemsize for a, b in zip(offsets, offsets[1:]))
    assert _self_overlapping(view) == meet


class _CountingArray:
    """An __array__ object (as dask, xarray or h5py arrays are) that counts
    its conversions; the first returns `first`, later ones copies."""

    def __init__(self, first):
        self.first, self.conversions = first, 0

    def __array__(self, dtype=None, copy=None):
        self.conversions += 1
        return self.first if self.conversions == 1 else self.first.copy()


@pytest.mark.parametrize("opts", [{}, {"is_causal": True}, {"window": 8}, {"return_lse": True}],
                         ids=str)
def test_array_like_inputs_are_converted_once(opts):
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((1, 2, 8, 16), np.float32), rng.standard_normal((1, 2, 32, 16),
                                                                              np.float32)
    inputs = [_CountingArray(x) for x in (q, k, k)]
    pyattn.scaled_dot_product_attention(*inputs, **opts)
    assert [x.conversions for x in inputs] == [1, 1, 1]


def test_out_checked_against_the_conversion_the_kernel_reads():
    """A query whose conversion is a view of out is refused, though a second
    conversion would give a copy (which overlaps nothing)."""
    out = np.zeros((1, 2, 64, 16), np.float32)
    query = _CountingArray(out[:, :, ::-1])
    k = np.ones((1, 2, 32, 16), np.float32)
    with pytest.raises(ValueError, match="out overlaps query"):
        pyattn.scaled_dot_product_attention(query, k, k, out=out, window=100)


def test_merge_ignores_parts_without_keys_whatever_their_output():
    # a part with lse -inf has no key: other libraries give NaN output there
    rng = np.random.default_rng(1)
    o1, l1 = rng.standard_normal((2, 4, 8)).astype(np.float32), rng.standard_normal((2, 4))
    merged, lse = pyattn.merge_attention([o1, np.full_like(o1, np.nan)],
                                         [l1.astype(np.float32), np.full((2, 4), -np.inf,
                                                                         np.float32)])
    np.testing.assert_allclose(merged, o1, rtol=1e-6)
    np.testing.assert_allclose(lse, l1, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn"])
def test_quantize_finite_beyond_float32_follows_the_narrowing_rule(dtype, recwarn):
    with pytest.raises(ValueError, match="x holds 32 finite value.*beyond the range of "
                                         "float32.*; scale them$"):  # inf is no way out here
        pyattn.QuantizedKV.quantize(np.full((1, 32), 1e300), dtype=dtype)
    # a broadcast view's values are counted as stored, not as claimed
    with pytest.raises(ValueError, match="x holds 1 finite value"):
        pyattn.QuantizedKV.quantize(np.broadcast_to(1e300, (64, 32)), dtype=dtype)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_decode_converts_an_array_like_query_once():
    """decode_attention checks the query's shape on the same conversion the
    kernel reads: a second, different conversion cannot slip past it."""
    cache = pyattn.KVCache(1, 2, 4)
    cache.append(np.ones((1, 2, 3, 4), np.float32), np.ones((1, 2, 3, 4), np.float32))
    query = _CountingArray(np.ones((1, 2, 1, 4), np.float32))
    out = pyattn.decode_attention(query, cache)
    assert query.conversions == 1 and out.shape == (1, 2, 1, 4)


def test_narrowing_message_shows_a_value_beyond_float64_as_it_is():
    """A longdouble mask value beyond float64 is shown as given, not as the
    inf a Python float would make of it."""
    q = np.ones((1, 2, 4), np.float32)
    mask = np.full((2, 2), np.longdouble("1e4000"))
    if not np.isfinite(mask).all():
        pytest.skip("this platform's longdouble is float64: no value lies beyond it")
    with pytest.raises(ValueError, match=r"attn_mask holds 4 finite value.* e\.g\. 1e\+4000,"):
        pyattn.scaled_dot_product_attention(q, q, q, attn_mask=mask)


def test_an_empty_result_numpy_cannot_describe_is_refused_by_name():
    """Batches of 2**40 against 2**40 with L = 0: the result is empty, but its
    other sizes multiply past what NumPy can describe.  A ValueError naming
    the result's shape, not NumPy's "array is too big" from inside."""
    def bc(shape):
        return np.broadcast_to(np.zeros((), np.float32), shape)
    q = bc((2**40, 1, 0, 1))
    k = bc((1, 2**40, 1, 1))
    with pytest.raises(ValueError, match=r"^the result, of shape \(1099511627776, "
                                         r"1099511627776, 0, 1\) \(from query, key and value\)"):
        pyattn.scaled_dot_product_attention(q, k, k)
    # the same sizes where NumPy can describe them: an empty result
    assert pyattn.scaled_dot_product_attention(bc((2**20, 1, 0, 1)), bc((1, 2**20, 1, 1)),
                                               bc((1, 2**20, 1, 1))).shape == (2**20, 2**20, 0, 1)
