"""The "pyattn" mask builder against transformers' own 4-D masks: for every
mask pattern transformers builds, cache geometry (prefill, decode, chunked
prefill, static and sliding caches) and padding (none, left, right, a hole),
attention with the builder's KernelMask equals attention with sdpa_mask's
4-D bool mask; patterns it does not know fall back to that 4-D mask."""
import itertools

import pytest

torch = pytest.importorskip("torch", reason="the transformers integration needs torch")
transformers = pytest.importorskip("transformers", reason="the integration needs transformers")
import pyattn.torch as pt  # noqa: E402
from pyattn.integrations.transformers import KernelMask, build_mask  # noqa: E402

mu = transformers.masking_utils
WINDOW = 4
PATTERNS = {
    "causal": lambda: mu.causal_mask_function,
    "bidirectional": lambda: mu.bidirectional_mask_function,
    "sliding": lambda: mu.sliding_window_causal_mask_function(WINDOW),
    "sliding_bidirectional": lambda: mu.sliding_window_bidirectional_mask_function(WINDOW),
}
# (q_length, kv_length, q_offset, kv_offset), as caches report them
GEOMETRIES = {
    "prefill": (7, 7, 0, 0),
    "decode": (1, 9, 8, 0),
    "chunked_prefill": (3, 9, 6, 0),
    "static_prefill": (5, 12, 0, 0),
    "static_decode": (1, 12, 7, 0),
    "sliding_cache_decode": (1, WINDOW, 9, 6),
    "sliding_cache_chunk": (2, WINDOW + 1, 9, 6),
}
PADDINGS = ["none", "left", "right", "hole"]
B, H, E = 3, 2, 8


def padding_mask(kind, length):
    """(B, length) bool, True = a real token."""
    keep = torch.ones(B, length, dtype=torch.bool)
    if kind == "left":
        keep[1, :3] = keep[2, :1] = False
    elif kind == "right":
        keep[1, length - 3:] = keep[2, length - 1:] = False
    elif kind == "hole":
        keep[1, 2:4] = False
    return keep


@pytest.mark.parametrize("pattern, geometry, padding",
                         list(itertools.product(PATTERNS, GEOMETRIES, PADDINGS)))
def test_kernel_mask_equals_transformers_mask(pattern, geometry, padding):
    L, S, q_offset, kv_offset = GEOMETRIES[geometry]
    # a static cache's 2-D mask covers the tokens seen, not its empty slots
    seen = q_offset + L if geometry.startswith("static") else kv_offset + S
    keep = None if padding == "none" else padding_mask(padding, seen)
    sizes = dict(batch_size=B, q_length=L, kv_length=S, q_offset=q_offset, kv_offset=kv_offset,
                 attention_mask=keep)
    ours = build_mask(**sizes, mask_function=PATTERNS[pattern](), allow_is_causal_skip=True)
    theirs = mu.sdpa_mask(**sizes, mask_function=PATTERNS[pattern](), allow_is_causal_skip=False)
    # only a two-sided window needs the diagonal where the kernel can put it
    if pattern != "sliding_bidirectional" or q_offset - kv_offset in (0, S - L):
        assert isinstance(ours, KernelMask)
    if isinstance(ours, KernelMask):
        assert ours.attn_mask is None or ours.attn_mask.shape == (B, 1, 1, S)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, E, generator=g) for n in (L, S, S))
    structure = ours.keywords(q, k) if isinstance(ours, KernelMask) else {"attn_mask": ours}
    got = pt.scaled_dot_product_attention(q, k, v, **structure)
    want = pt.scaled_dot_product_attention(q, k, v, attn_mask=theirs)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_right_padding_becomes_kv_lengths():
    keep = padding_mask("right", 7)
    ours = build_mask(B, 7, 7, mask_function=mu.causal_mask_function, attention_mask=keep)
    assert ours.attn_mask is None and ours.kv_lengths.tolist() == [7, 4, 6]
    assert (ours.is_causal, ours.alignment, ours.window) == (True, "top_left", None)


def test_decode_steps_are_lower_right_without_a_mask():
    ours = build_mask(B, 1, 9, 8, 0, mask_function=mu.causal_mask_function)
    assert (ours.alignment, ours.kv_lengths, ours.attn_mask) == ("lower_right", None, None)
    # a sliding cache holds the window only: no window left to apply
    ours = build_mask(B, 1, WINDOW, 9, 6, mask_function=PATTERNS["sliding"]())
    assert (ours.alignment, ours.window, ours.attn_mask) == ("lower_right", None, None)


def test_unknown_patterns_get_the_4d_mask():
    chunked = mu.chunked_causal_mask_function(3, torch.zeros(B, dtype=torch.long))
    custom = mu.and_masks(mu.causal_mask_function, lambda b, h, q, kv: kv % 2 == 0)
    for function in (chunked, custom):
        ours = build_mask(B, 6, 6, mask_function=function, allow_is_causal_skip=True)
        want = mu.sdpa_mask(B, 6, 6, mask_function=function, allow_is_causal_skip=False)
        assert isinstance(ours, torch.Tensor) and torch.equal(ours, want)


def test_a_mask_built_for_other_sizes_is_refused():
    ours = build_mask(B, 4, 4, mask_function=mu.causal_mask_function)
    q = torch.randn(B, H, 5, E)
    with pytest.raises(ValueError, match="built for 4 queries and 4 keys; got 5 and 5"):
        ours.keywords(q, q)
