"""pyattn as an attention backend of HuggingFace transformers.

    import pyattn.integrations.transformers as pyattn_hf
    pyattn_hf.register()
    model = AutoModel.from_pretrained(path, attn_implementation="pyattn")

``register()`` adds an attention function to ``transformers.AttentionInterface``
and a mask builder to ``transformers.AttentionMaskInterface``, both under
``"pyattn"``.  The mask builder hands the kernel the mask's structure instead
of an L×S mask: causality and sliding windows become ``is_causal``,
``alignment`` and ``window``, padding at the end of the sequences becomes
``kv_lengths``, and other padding a (B, 1, 1, S) bool view of the 2-D
attention mask.  Only patterns it does not recognise (custom mask functions,
packed sequences, chunked attention) get transformers' own 4-D mask.
"""
import dataclasses
from typing import ClassVar, Optional

import torch
import transformers
from transformers import masking_utils

from .. import torch as pyattn_torch

__all__ = ["NAME", "KernelMask", "attention_forward", "build_mask", "register"]

NAME = "pyattn"


@dataclasses.dataclass(frozen=True)
class KernelMask:
    """What build_mask hands attention_forward: the keywords of
    pyattn.torch.scaled_dot_product_attention that make up the mask, for
    queries of length `q_length` against keys of length `kv_length`."""

    # transformers reads the ndim of a model's attention_mask: 4 means built,
    # not a 2-D padding mask, so a KernelMask that generate() built ahead
    # (static caches) reaches build_mask, which keeps it
    ndim: ClassVar[int] = 4

    q_length: int
    kv_length: int
    is_causal: bool = False
    alignment: str = "top_left"
    window: Optional[tuple] = None
    kv_lengths: Optional[torch.Tensor] = None
    attn_mask: Optional[torch.Tensor] = None

    def keywords(self, query, key):
        if (query.shape[-2], key.shape[-2]) != (self.q_length, self.kv_length):
            raise ValueError(f"the attention mask was built for {self.q_length} queries and "
                             f"{self.kv_length} keys; got {query.shape[-2]} and {key.shape[-2]}")
        return {"is_causal": self.is_causal, "alignment": self.alignment, "window": self.window,
                "kv_lengths": self.kv_lengths, "attn_mask": self.attn_mask}


def _free_variables(function):
    """The variables a closure captured, by name."""
    cells = function.__closure__ or ()
    return dict(zip(function.__code__.co_freevars, (cell.cell_contents for cell in cells)))


# Closures are told apart by the code of the factory that made them
_AND_CODE = masking_utils.and_masks().__code__
_SLIDING_CODE = masking_utils.sliding_window_overlay(1).__code__
_SLIDING_BIDIRECTIONAL_CODE = masking_utils.sliding_window_bidirectional_overlay(1).__code__


def _pattern(mask_function):
    """(is_causal, window) of the mask functions transformers' create_*_mask
    build, or None for any other."""
    if mask_function is masking_utils.causal_mask_function:
        return True, None
    if mask_function is masking_utils.bidirectional_mask_function:
        return False, None
    if getattr(mask_function, "__code__", None) is not _AND_CODE:
        return None
    parts = _free_variables(mask_function)["mask_functions"]
    if len(parts) != 2 or getattr(parts[0], "__code__", None) is None:
        return None
    overlay, base = parts[0].__code__, parts[1]
    if overlay is _SLIDING_CODE and base is masking_utils.causal_mask_function:
        # kv > q - w: the w - 1 keys before the diagonal and the diagonal key
        return True, (_free_variables(parts[0])["sliding_window"] - 1, 0)
    if overlay is _SLIDING_BIDIRECTIONAL_CODE and base is masking_utils.bidirectional_mask_function:
        w = _free_variables(parts[0])["sliding_window"]  # |q - kv| <= w
        return False, (w, w)
    return None


def _diagonal(is_causal, window, q_length, kv_length, shift):
    """(alignment, kv_length limit or None) that put query i's diagonal on key
    i + shift, or None when the kernel cannot.  transformers numbers queries
    and keys from their offsets: shift = q_offset - kv_offset."""
    if not is_causal and window is None:
        return "top_left", None  # no diagonal
    if shift == 0:
        return "top_left", None
    if shift == kv_length - q_length:
        return "lower_right", None
    if is_causal and 0 <= shift + q_length < kv_length:
        # lower-right against the first shift + L keys; the keys after them
        # lie past every query's diagonal (a static cache's empty slots)
        return "lower_right", shift + q_length
    return None


def build_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0,
               mask_function=masking_utils.causal_mask_function, attention_mask=None,
               local_size=None, **kwargs):
    """transformers' mask builder for "pyattn" (see sdpa_mask for the
    arguments): a KernelMask, or transformers' 4-D bool mask for patterns the
    kernel cannot take as structure."""
    if isinstance(attention_mask, KernelMask):  # built ahead by generate()
        return attention_mask
    q_offset = int(q_offset)  # a tensor with static caches
    pattern = _pattern(mask_function)
    diagonal = pattern and _diagonal(*pattern, q_length, kv_length, q_offset - kv_offset)
    if not diagonal:
        kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
        return masking_utils.sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset,
                                       mask_function, attention_mask, local_size, **kwargs)
    (is_causal, window), (alignment, limit) = pattern, diagonal
    if is_causal and window is not None and window[0] >= q_offset - kv_offset + q_length - 1:
        # a sliding cache keeps only the window: the window hides no key (so
        # decode steps can take the kernel's fast path)
        window = None
    kv_lengths = None if limit is None else torch.full((batch_size,), limit)
    keep = None
    if attention_mask is not None:
        keep = masking_utils.prepare_padding_mask(attention_mask, kv_length, kv_offset)
        keep = keep[:, kv_offset:kv_offset + kv_length].to(torch.bool)
        if bool(keep.all()):
            keep = None
    if keep is not None and alignment == "top_left":
        valid = keep.sum(-1)
        if torch.equal(keep, torch.arange(kv_length, device=keep.device) < valid[:, None]):
            # padding at the end only; kv_lengths moves no top-left diagonal
            kv_lengths, keep = valid, None
    return KernelMask(q_length, kv_length, is_causal, alignment, window, kv_lengths,
                      None if keep is None else keep[:, None, None, :])


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      is_causal=None, softcap=None, s_aux=None, position_bias=None,
                      output_attentions=False, **kwargs):
    """transformers' attention function for "pyattn", called as its
    sdpa_attention_forward: query (B, Hq, L, E), key (B, Hkv, S, E), value
    (B, Hkv, S, Ev) → ((B, L, Hq, Ev), None).  `softcap` (Gemma 2) and
    `s_aux` (the sinks of gpt-oss) go to the kernel; the other keywords
    (sliding_window, position_ids, ...) are in the mask already or unused."""
    if dropout:
        raise ValueError(f"pyattn is inference only: the attention dropout must be 0 (call "
                         f"model.eval()); got dropout={dropout}")
    if position_bias is not None:
        raise ValueError("pyattn does not take a position_bias; use attn_implementation='sdpa'")
    if output_attentions:
        raise ValueError("pyattn does not return attention weights (output_attentions=True); "
                         "use attn_implementation='eager'")
    if isinstance(attention_mask, KernelMask):
        structure = attention_mask.keywords(query, key)
    else:  # None, or a 4-D mask made elsewhere: sdpa_attention_forward's rule
        causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        structure = {"attn_mask": attention_mask,
                     "is_causal": query.shape[2] > 1 and attention_mask is None and causal}
    options = dict(structure, scale=scaling, enable_gqa=query.shape[1] != key.shape[1],
                   softcap=softcap, sinks=s_aux)
    if query.shape[2] == 1:
        # a decode step: (B, H, 1, Ev) is (B, 1, H, Ev) already, and without
        # out= the call can take the kernel's fast path
        out = pyattn_torch.scaled_dot_product_attention(query, key, value, **options)
        return out.transpose(1, 2), None
    batch = torch.broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3])
    # written straight in the (B, L, H, Ev) layout transformers wants back
    out = query.new_empty(batch + (query.shape[2], query.shape[1], value.shape[-1]))
    pyattn_torch.scaled_dot_product_attention(query, key, value, out=out.transpose(1, 2),
                                              **options)
    return out, None


def register():
    """Make "pyattn" an attn_implementation: from_pretrained(...,
    attn_implementation="pyattn") or model.set_attn_implementation("pyattn").
    Calling it again changes nothing."""
    transformers.AttentionInterface.register(NAME, attention_forward)
    transformers.AttentionMaskInterface.register(NAME, build_mask)
