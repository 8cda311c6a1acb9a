"""pyattn on torch tensors: ``torch.nn.functional.scaled_dot_product_attention``'s
signature, computed by pyattn's kernel, reading the tensors' memory in place.

Importing this module imports torch; ``import pyattn`` alone never does.
"""
import numpy as np
import torch

from . import functional
from ._dtypes import resolve_dtype

__all__ = ["scaled_dot_product_attention"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _as_array(tensor, name):
    """`tensor` as an ndarray sharing its memory and strides (bfloat16 through
    a bit-cast to ml_dtypes' bfloat16); anything but a tensor is returned as
    it is, for pyattn's own checks."""
    if not isinstance(tensor, torch.Tensor):
        return tensor
    if not tensor.is_cpu:  # cuda: not host memory; meta: no memory at all
        raise ValueError(f"{name} is on the {tensor.device} device; pyattn runs on CPU tensors "
                         f"(move it with .cpu())")
    if tensor.layout != torch.strided or tensor.is_nested or tensor.is_quantized:
        kind = "a nested" if tensor.is_nested else "a quantized" if tensor.is_quantized else (
            f"a {tensor.layout}")
        raise ValueError(f"{name} is {kind} tensor; pyattn reads dense (strided) tensors "
                         f"(convert it with .to_dense())")
    if tensor.requires_grad:
        if torch.is_grad_enabled():  # pyattn has no backward: a silent detach would cut the graph
            raise ValueError(f"{name} requires grad and grad mode is on; pyattn is inference "
                             f"only: call it under torch.no_grad() or torch.inference_mode(), or "
                             f"detach it")
        tensor = tensor.detach()
    if tensor.is_neg():  # a lazily negated view: its memory holds the values' negatives
        tensor = tensor.resolve_neg()
    if tensor.is_conj():  # complex only, which is refused by dtype below: no numpy() for it
        tensor = tensor.resolve_conj()
    if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16: same bits, ml_dtypes' type
        try:
            bfloat16 = resolve_dtype("bfloat16")
        except TypeError as exc:
            raise TypeError(f"{name} is bfloat16: {exc}") from None
        return tensor.view(torch.int16).numpy().view(bfloat16)
    try:
        return tensor.numpy()
    except TypeError:
        raise TypeError(f"{name} has dtype {tensor.dtype}, which NumPy cannot hold; pyattn "
                        f"takes {', '.join(map(str, _FLOAT_DTYPES))}") from None


def _as_tensor(array):
    """The ndarray `array` as a tensor sharing its memory."""
    if array.dtype.kind == "V":  # ml_dtypes' bfloat16
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False, *, out=None,
                                 num_threads=None, alignment="top_left", window=None,
                                 alibi_slopes=None, softcap=None, sinks=None, q_lengths=None,
                                 kv_lengths=None, return_lse=False, precision=None):
    """``torch.nn.functional.scaled_dot_product_attention`` on CPU tensors,
    computed by pyattn (inference only).

    The first eight arguments are torch's: ``dropout_p`` must be 0, and
    ``attn_mask`` combines with ``is_causal``.  The keywords are those of
    ``pyattn.scaled_dot_product_attention``; they take tensors or anything
    NumPy reads.  ``query``, ``key`` and ``value`` are float32, float64,
    float16 or bfloat16 CPU tensors of any strides, read in place.
    ``num_threads`` defaults to ``torch.get_num_threads()``.

    Returns a new tensor of the query's dtype, or ``out`` (a tensor) filled;
    with ``return_lse``, ``(output, lse)`` with ``lse`` in the compute dtype.
    """
    if dropout_p != 0:
        raise ValueError(f"dropout_p must be 0: pyattn is inference only; got {dropout_p}")
    # the NumPy API takes per-head values as NumPy reals: widen (exactly)
    # bfloat16 ones, such as a bfloat16 model's sinks
    alibi_slopes, sinks = (v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16
                           else v for v in (alibi_slopes, sinks))
    arrays = {name: _as_array(value, name) for name, value in (
        ("query", query), ("key", key), ("value", value), ("attn_mask", attn_mask),
        ("alibi_slopes", alibi_slopes), ("sinks", sinks), ("q_lengths", q_lengths),
        ("kv_lengths", kv_lengths))}
    if out is not None and not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch tensor; got {type(out).__name__}")
    if out is not None and (out.is_neg() or out.is_conj()):  # resolving: a copy, silently
        raise ValueError("out is a lazily negated or conjugated view (its memory does not hold "
                         "its values): pass a tensor without the neg or conj bit")
    result = functional.scaled_dot_product_attention(
        **arrays, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
        out=_as_array(out, "out") if out is not None else None,
        num_threads=torch.get_num_threads() if num_threads is None else num_threads,
        alignment=alignment, window=window, softcap=softcap, return_lse=return_lse,
        precision=precision)
    output, lse = result if return_lse else (result, None)
    output = out if out is not None else _as_tensor(output)
    return (output, _as_tensor(lse)) if return_lse else output
