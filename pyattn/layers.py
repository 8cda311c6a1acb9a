"""The two layers of the classic description of attention.

SelfAttention: one head; three linear maps make Q, K and V from the input,
softmax(Q K^T / sqrt(d_k)) V.  MultiHeadAttention: torch.nn.MultiheadAttention's
semantics, parameters and state_dict keys, on NumPy arrays.

Projections run through NumPy's BLAS, one call at a time and never inside
pyattn's OpenMP region; heads are split and joined through strided views, so
the attention kernel reads Q, K, V from the projection's output and writes
its result where the output projection reads it.
"""
import math
import sys
from collections.abc import Mapping

import numpy as np

from ._arrays import as_array, as_float_array, check_fits, checked_cast, compact, convert_stored
from ._dtypes import check_dtype, is_kernel_dtype, is_mask_dtype
from ._validation import check_flag, check_size
from .functional import attention, check_precision

__all__ = ["MultiHeadAttention", "SelfAttention"]

def _generator(rng):
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or (isinstance(rng, (int, np.integer)) and not isinstance(rng, bool)):
        if rng is not None and rng < 0:
            raise ValueError(f"rng must be a non-negative int seed, got {rng}")
        return np.random.default_rng(rng)
    raise TypeError(f"rng must be a numpy.random.Generator, an int seed or None, "
                    f"got {type(rng).__name__}")


def _layer_dtype(dtype):
    return check_dtype(dtype, ("float32", "float64"), "float32 or float64")


def _check_parameters(shapes, dtype, what):
    """Refuse parameters that cannot fit in memory before allocating them."""
    check_fits(sum(math.prod(shape) for shape in shapes), dtype.itemsize, what)


def _is_real(dtype):
    """Ints and floats, NumPy's own and ml_dtypes' bfloat16 (whose kind is "V")."""
    return dtype.kind in "fiu" or is_kernel_dtype(dtype)


def _parameter_array(value, name):
    """`value`, an array-like or a CPU torch tensor of any dtype, as an
    ndarray; ValueError naming `name` (and a tensor's dtype) when it cannot be
    one.  torch is never imported here: a tensor means that the caller did."""
    torch = sys.modules.get("torch")
    is_tensor = torch is not None and isinstance(value, torch.Tensor)
    if is_tensor:
        if value.device.type != "cpu":  # meta: no data; cuda: not host memory
            raise ValueError(f"{name} is a torch tensor on the {value.device} device; "
                             f"load CPU tensors (move it there with .cpu())")
        value = value.detach().resolve_neg()  # a lazily negated view: NumPy cannot read it
        if value.is_floating_point() and value.dtype not in (torch.float16, torch.float32,
                                                             torch.float64):
            value = value.float()  # bfloat16, float8: NumPy cannot read them; exact in float32
    try:
        return np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        what = f" (a torch tensor of dtype {value.dtype})" if is_tensor else ""
        raise ValueError(f"{name}{what} cannot be converted to an array: {exc}") from None


def _xavier_uniform(rng, shape, dtype):
    """Glorot & Bengio's uniform init for a (fan_out, fan_in) matrix (torch's rule)."""
    bound = math.sqrt(6.0 / (shape[0] + shape[1]))
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def _as_input(x, name, dtype, width, width_name):
    """`x` in the layer's dtype (converted like a Linear layer's input), with
    `width` features in its last axis."""
    arr = as_array(x, name)
    if not _is_real(arr.dtype):
        raise TypeError(f"{name} must hold real numbers; got dtype {arr.dtype}")
    arr = as_float_array(convert_stored(arr, name, dtype), name, min_ndim=1)
    if arr.shape[-1] != width:
        raise ValueError(f"{name} must have {width_name} = {width} features in its last axis; "
                         f"got shape {arr.shape}")
    return arr


def _linear(x, weight, bias, name, out=None):
    """x @ weight.T + bias over the last axis, as one 2-D BLAS call where the
    leading axes merge without a copy.  `name` is x's, for errors."""
    check_fits(math.prod(x.shape[:-1]) * weight.shape[0], x.itemsize,
               f"the projection of {name} {x.shape}")
    flat = x.reshape(-1, x.shape[-1])
    y = np.matmul(flat, weight.T, out=None if out is None else out.reshape(-1, weight.shape[0]))
    if bias is not None:
        y += bias
    return y.reshape(x.shape[:-1] + (weight.shape[0],))


class SelfAttention:
    """Single-head self-attention, in the math convention Q = x @ w_q.

    Parameters
    ----------
    embed_dim : int
        Width of the input x.
    kdim, vdim : int, optional
        Width of the queries/keys (d_k) and of the values (the output);
        default embed_dim.
    bias : bool
        Give the three linear maps biases (zeros at init).
    dtype : float32 or float64
    rng : numpy.random.Generator or int, optional
        Seeds the xavier-uniform init of w_q (embed_dim, kdim), w_k
        (embed_dim, kdim) and w_v (embed_dim, vdim).
    precision : None, "exact" or "bf16"
        The attention's products, as scaled_dot_product_attention's
        ``precision`` (the projections stay in the layer's dtype).
    """

    def __init__(self, embed_dim, kdim=None, vdim=None, bias=False, dtype=np.float32, rng=None,
                 precision=None):
        check_precision(precision)
        self.precision = precision
        self.embed_dim = check_size(embed_dim, "embed_dim")
        self.kdim = self.embed_dim if kdim is None else check_size(kdim, "kdim")
        self.vdim = self.embed_dim if vdim is None else check_size(vdim, "vdim")
        self.dtype = _layer_dtype(dtype)
        bias = check_flag(bias, "bias")
        rng = _generator(rng)
        shapes = {"q": self.kdim, "k": self.kdim, "v": self.vdim}
        _check_parameters([(self.embed_dim, w) for w in shapes.values()], self.dtype,
                          f"the weights for embed_dim={self.embed_dim}, kdim={self.kdim}, "
                          f"vdim={self.vdim}")
        for name, width in shapes.items():
            w = _xavier_uniform(rng, (width, self.embed_dim), self.dtype).T.copy()
            setattr(self, f"w_{name}", w)
            setattr(self, f"b_{name}", np.zeros(width, self.dtype) if bias else None)

    def __repr__(self):
        return (f"SelfAttention(embed_dim={self.embed_dim}, kdim={self.kdim}, vdim={self.vdim}, "
                f"bias={self.b_q is not None}, dtype={self.dtype.name})")

    def __call__(self, x, attn_mask=None, is_causal=False, return_weights=False, *,
                 num_threads=None):
        """Attend x (..., L, embed_dim) to itself: (..., L, vdim), and with
        ``return_weights`` also the (..., L, L) softmax weights.  attn_mask
        follows scaled_dot_product_attention (bool True = attend, float
        added), broadcastable to (..., L, L)."""
        return_weights = check_flag(return_weights, "return_weights")
        x = _as_input(x, "x", self.dtype, self.embed_dim, "embed_dim")
        if x.ndim < 2:
            raise ValueError(f"x must have shape (..., L, embed_dim); got shape {x.shape}")
        # One GEMM for the three maps: x @ [w_q | w_k | w_v].
        w = np.concatenate([self.w_q, self.w_k, self.w_v], axis=1)
        b = None if self.b_q is None else np.concatenate([self.b_q, self.b_k, self.b_v])
        qkv = _linear(x, w.T, b, "x")
        q, k, v = np.split(qkv, [self.kdim, 2 * self.kdim], axis=-1)
        out, weights, _ = attention(q, k, v, attn_mask, is_causal, num_threads=num_threads,
                                    weights="heads" if return_weights else None,
                                    precision=self.precision)
        return (out, weights) if return_weights else out


class MultiHeadAttention:
    """torch.nn.MultiheadAttention on NumPy arrays (inference: no dropout,
    no add_bias_kv, no add_zero_attn).

    Parameters follow torch, with batch_first=True by default (torch: False).
    Weights use torch's layout, y = x @ W.T + b, and torch's names:
    ``in_proj_weight`` (3E, E) when kdim == vdim == embed_dim, else
    ``q_proj_weight`` (E, E), ``k_proj_weight`` (E, kdim), ``v_proj_weight``
    (E, vdim); ``in_proj_bias`` (3E,), ``out_proj_weight`` (E, E),
    ``out_proj_bias`` (E,).  Init as torch: xavier-uniform input projections,
    zero biases, out_proj.weight uniform(+-1/sqrt(E)), seeded by ``rng``.
    ``precision`` chooses the attention's products, as in
    scaled_dot_product_attention (the projections stay in the layer's dtype).
    """

    def __init__(self, embed_dim, num_heads, bias=True, kdim=None, vdim=None, batch_first=True,
                 dtype=np.float32, rng=None, precision=None):
        check_precision(precision)
        self.precision = precision
        self.embed_dim = E = check_size(embed_dim, "embed_dim")
        self.num_heads = check_size(num_heads, "num_heads")
        if E % self.num_heads:
            raise ValueError(f"embed_dim ({E}) must be divisible by num_heads ({self.num_heads})")
        self.head_dim = E // self.num_heads
        self.kdim = E if kdim is None else check_size(kdim, "kdim")
        self.vdim = E if vdim is None else check_size(vdim, "vdim")
        self.batch_first = check_flag(batch_first, "batch_first")
        self.dtype = dt = _layer_dtype(dtype)
        rng = _generator(rng)
        self._qkv_same_embed_dim = self.kdim == E and self.vdim == E
        self._bias = check_flag(bias, "bias")
        _check_parameters(self._parameter_shapes().values(), dt,
                          f"the weights for embed_dim={E}, kdim={self.kdim}, vdim={self.vdim}")
        if self._qkv_same_embed_dim:
            self.in_proj_weight = _xavier_uniform(rng, (3 * E, E), dt)
            self.q_proj_weight = self.k_proj_weight = self.v_proj_weight = None
        else:
            self.in_proj_weight = None
            self.q_proj_weight = _xavier_uniform(rng, (E, E), dt)
            self.k_proj_weight = _xavier_uniform(rng, (E, self.kdim), dt)
            self.v_proj_weight = _xavier_uniform(rng, (E, self.vdim), dt)
        bound = 1.0 / math.sqrt(E)  # torch's Linear default, kept by MultiheadAttention
        self.out_proj_weight = rng.uniform(-bound, bound, size=(E, E)).astype(dt)
        self.in_proj_bias = np.zeros(3 * E, dt) if bias else None
        self.out_proj_bias = np.zeros(E, dt) if bias else None

    def __repr__(self):
        return (f"MultiHeadAttention(embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"bias={self.in_proj_bias is not None}, kdim={self.kdim}, vdim={self.vdim}, "
                f"batch_first={self.batch_first}, dtype={self.dtype.name})")

    _attention = staticmethod(attention)  # the kernel (benchmarks swap in a baseline)

    # -- parameters ---------------------------------------------------------
    _ATTRIBUTE = {"out_proj.weight": "out_proj_weight", "out_proj.bias": "out_proj_bias"}

    def _parameter_shapes(self):
        """torch's state_dict keys, in its order, with their shapes."""
        E = self.embed_dim
        shapes = {}
        if self._qkv_same_embed_dim:
            shapes["in_proj_weight"] = (3 * E, E)
        else:
            shapes.update(q_proj_weight=(E, E), k_proj_weight=(E, self.kdim),
                          v_proj_weight=(E, self.vdim))
        if self._bias:
            shapes["in_proj_bias"] = (3 * E,)
        shapes["out_proj.weight"] = (E, E)
        if self._bias:
            shapes["out_proj.bias"] = (E,)
        return shapes

    def state_dict(self):
        """The parameters under torch's key names, as NumPy copies."""
        return {key: getattr(self, self._ATTRIBUTE.get(key, key)).copy()
                for key in self._parameter_shapes()}

    def load_state_dict(self, state_dict, strict=True):
        """Load parameters saved by state_dict() here or by torch: NumPy
        arrays, or CPU torch tensors of any float dtype, bfloat16 and float8
        included.  They take the layer's dtype (float32 or float64, as the
        inputs do): float16, bfloat16 and float8 widen exactly, float64 rounds
        into a float32 layer.  strict=False ignores missing and unexpected keys; shapes are
        always checked."""
        strict = check_flag(strict, "strict")
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping of parameter names to arrays, "
                            f"got {type(state_dict).__name__}")
        shapes = self._parameter_shapes()
        missing = [k for k in shapes if k not in state_dict]
        unexpected = [k for k in state_dict if k not in shapes]
        if strict and (missing or unexpected):
            raise ValueError(f"state_dict does not match this layer: missing keys {missing}, "
                             f"unexpected keys {unexpected}; expected keys {list(shapes)}")
        loaded = {}
        for key, shape in shapes.items():
            if key not in state_dict:
                continue
            arr = _parameter_array(state_dict[key], f"state_dict[{key!r}]")
            if not _is_real(arr.dtype) or arr.shape != shape:
                raise ValueError(f"state_dict[{key!r}] must be a real array of shape {shape}; "
                                 f"got {arr.dtype} of shape {arr.shape}")
            # a copy (no aliasing of the caller's), refusing what the dtype cannot hold
            loaded[key] = checked_cast(arr, self.dtype, f"state_dict[{key!r}]")
        for key, arr in loaded.items():  # all checked first: an error changes nothing
            setattr(self, self._ATTRIBUTE.get(key, key), arr)

    # -- forward ------------------------------------------------------------
    def __call__(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                 average_attn_weights=True, is_causal=False, *, num_threads=None):
        """Attend `query` to `key`/`value`, as torch.nn.MultiheadAttention.

        Shapes (batch_first=True): query (B, L, E), key (B, S, kdim), value
        (B, S, vdim); batch_first=False swaps B and L/S; unbatched (L, E),
        (S, kdim), (S, vdim) also work.  Masks follow torch: bool True =
        masked out, float = added to the scores.  key_padding_mask (B, S);
        attn_mask (L, S) or (B * num_heads, L, S).  is_causal applies a causal
        mask (with or without attn_mask).  A query row whose keys are all
        masked attends to nothing: zeros before out_proj (torch gives NaN).

        Returns (output like query, weights or None); weights are (B, L, S)
        averaged over heads, or (B, num_heads, L, S) with
        average_attn_weights=False, and cost B*H*L*S memory.
        """
        need_weights = check_flag(need_weights, "need_weights")
        average_attn_weights = check_flag(average_attn_weights, "average_attn_weights")
        E, H, D = self.embed_dim, self.num_heads, self.head_dim
        fused = query is key and key is value and self._qkv_same_embed_dim
        query = _as_input(query, "query", self.dtype, E, "embed_dim")
        key = query if fused else _as_input(key, "key", self.dtype, self.kdim, "kdim")
        value = query if fused else _as_input(value, "value", self.dtype, self.vdim, "vdim")
        batched = self._check_shapes(query, key, value)

        def batch_major(x):  # (B, N, width) view of an input or projection
            if not batched:
                return x[np.newaxis]
            return x if self.batch_first else x.swapaxes(0, 1)

        def heads(x):  # (B, N, E) -> (B, H, N, D); splitting an axis is always a view
            b, n = x.shape[:2]
            return x.reshape(b, n, H, D).swapaxes(1, 2)

        if fused:  # one GEMM makes Q, K and V
            qkv = batch_major(_linear(query, self.in_proj_weight, self.in_proj_bias, "query"))
            q, k, v = (heads(qkv[..., i * E:(i + 1) * E]) for i in range(3))
        else:
            w_q, w_k, w_v = self._input_projections()
            if self.in_proj_bias is None:
                b_q = b_k = b_v = None
            else:
                b_q, b_k, b_v = np.split(self.in_proj_bias, 3)
            q = heads(batch_major(_linear(query, w_q, b_q, "query")))
            k = heads(batch_major(_linear(key, w_k, b_k, "key")))
            v = heads(batch_major(_linear(value, w_v, b_v, "value")))

        B, L, S = q.shape[0], q.shape[2], k.shape[2]
        mask, kv_lengths = self._sdpa_mask(key_padding_mask, attn_mask, B, L, S, batched)
        # The heads' outputs land in the query's own layout, heads side by side:
        # concatenating them is free and out_proj reads them with one GEMM.
        context = np.empty(query.shape, dtype=self.dtype)
        _, weights, _ = self._attention(q, k, v, mask, is_causal, out=heads(batch_major(context)),
                                        num_threads=num_threads, kv_lengths=kv_lengths,
                                        precision=self.precision,
                                        weights=None if not need_weights
                                        else "mean" if average_attn_weights else "heads")
        output = _linear(context, self.out_proj_weight, self.out_proj_bias, "the heads' output")
        if weights is not None and not batched:
            weights = weights[0]
        return output, weights

    def _input_projections(self):
        if self._qkv_same_embed_dim:
            return np.split(self.in_proj_weight, 3)
        return self.q_proj_weight, self.k_proj_weight, self.v_proj_weight

    def _check_shapes(self, query, key, value):
        """Whether the call is batched; raises on inconsistent shapes."""
        if query.ndim not in (2, 3):
            raise ValueError("query must be 3-D (batched) or 2-D (unbatched); "
                             f"got shape {query.shape}")
        for name, arr in (("key", key), ("value", value)):
            if arr.ndim != query.ndim:
                raise ValueError(f"{name} must have as many dimensions as query ({query.ndim}); "
                                 f"got query {query.shape} and {name} {arr.shape}")
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"key and value must agree in all but the last axis; "
                             f"got key {key.shape} and value {value.shape}")
        batched = query.ndim == 3
        if batched:
            axis = 0 if self.batch_first else 1
            if query.shape[axis] != key.shape[axis]:
                raise ValueError(f"query and key must have the same batch size (axis {axis}); "
                                 f"got query {query.shape} and key {key.shape}")
        return batched

    def _sdpa_mask(self, key_padding_mask, attn_mask, B, L, S, batched):
        """torch's two masks (True = masked out) in scaled_dot_product_attention's
        terms: (mask, kv_lengths).  A bool key_padding_mask that pads the end
        of each sequence becomes kv_lengths, so padded keys cost nothing; the
        rest is one mask broadcastable to (B, H, L, S), bool (True = attend)
        when both masks are bool, else float."""
        H = self.num_heads
        masks, kv_lengths = [], None
        if key_padding_mask is not None:
            kpm = self._mask_array(key_padding_mask, "key_padding_mask")
            expected = (B, S) if batched else (S,)
            if kpm.shape != expected:
                raise ValueError(f"key_padding_mask must have shape {expected} (batch, keys); "
                                 f"got {kpm.shape}")
            kpm = kpm.reshape(B, S)
            lengths = S - kpm.sum(axis=-1) if kpm.dtype == np.bool_ else None
            if lengths is not None and np.array_equal(kpm, np.arange(S) >= lengths[:, None]):
                kv_lengths = lengths
            else:
                masks.append(("key_padding_mask", kpm.reshape(B, 1, 1, S)))
        if attn_mask is not None:
            am = self._mask_array(attn_mask, "attn_mask")
            if am.shape == (L, S):
                masks.append(("attn_mask", am))
            elif am.shape == ((B * H, L, S) if batched else (H, L, S)):
                masks.append(("attn_mask", am.reshape(B, H, L, S)))
            else:
                full = f"({B * H}, {L}, {S})" if batched else f"({H}, {L}, {S})"
                raise ValueError(f"attn_mask must have shape ({L}, {S}) or {full}; got {am.shape}")
        if not masks:
            return None, kv_lengths
        # combined on their stored elements: a broadcast mask stays a view
        names, masks = [n for n, _ in masks], [compact(m) for _, m in masks]
        if all(m.dtype == np.bool_ for m in masks):
            return (~masks[0] if len(masks) == 1 else ~(masks[0] | masks[1])), kv_lengths
        additive = [np.where(m, -np.inf, 0).astype(self.dtype) if m.dtype == np.bool_
                    else m if m.dtype == self.dtype else checked_cast(m, self.dtype, name)
                    for name, m in zip(names, masks)]
        return (additive[0] if len(additive) == 1 else additive[0] + additive[1]), kv_lengths

    def _mask_array(self, mask, name):
        arr = as_array(mask, name)
        if not is_mask_dtype(arr.dtype):
            raise TypeError(f"{name} must be bool (True = masked out) or float (added to the "
                            f"scores); got dtype {arr.dtype}")
        return arr  # cast once its shape is known to be right
