"""pyattn's local windows, sequence lengths, GQA and masks against
``jax.nn.dot_product_attention``, which offers the same features (CI installs
JAX; without it this file is skipped).

JAX's layout is (batch, length, heads, head_dim); its windows and causality
are aligned top-left like pyattn's default.  Rows that see no key are left
out of the comparison: JAX gives them a uniform average, pyattn zeros (see the
README), and padded query rows are unspecified in JAX.
"""
import numpy as np
import pytest

import pyattn

jax = pytest.importorskip("jax")
jnn = jax.nn
# JAX computes in float32 here; a wrong window, length or mask is off by O(0.1)
TOL = dict(rtol=1e-5, atol=1e-6)


def to_jax(x):  # (B, H, N, D) -> (B, N, H, D)
    return np.ascontiguousarray(np.swapaxes(x, 1, 2))


def jax_attention(q, k, v, **kwargs):
    out = jnn.dot_product_attention(to_jax(q), to_jax(k), to_jax(v), **kwargs)
    return np.swapaxes(np.asarray(out), 1, 2)


def visible(L, S, window=None, causal=False, kv_len=None):
    """(L, S) bool: which keys row i sees (top-left diagonal)."""
    off = np.arange(S)[None, :] - np.arange(L)[:, None]
    keep = np.ones((L, S), bool)
    if window is not None:
        left, right = window
        keep &= (off >= -left) & (off <= right)
    if causal:
        keep &= off <= 0
    if kv_len is not None:
        keep &= np.arange(S)[None, :] < kv_len
    return keep


@pytest.mark.parametrize("L, S", [(37, 37), (130, 130), (20, 90)])
@pytest.mark.parametrize("window", [(0, 0), (5, 3), (16, 0), (0, 40)])
@pytest.mark.parametrize("causal", [False, True])
def test_local_window_matches_jax(L, S, window, causal, rng):
    q, k, v = (rng.standard_normal(s) for s in [(2, 4, L, 16), (2, 4, S, 16), (2, 4, S, 16)])
    got = pyattn.scaled_dot_product_attention(q, k, v, window=window, is_causal=causal)
    want = jax_attention(q, k, v, local_window_size=window, is_causal=causal)
    rows = visible(L, S, window, causal).any(-1)
    np.testing.assert_allclose(got[:, :, rows], want[:, :, rows], **TOL)
    assert (got[:, :, ~rows] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_sequence_lengths_match_jax(causal, rng):
    B, H, L, S = 3, 2, 40, 40
    q, k, v = (rng.standard_normal(s) for s in [(B, H, L, 16), (B, H, S, 16), (B, H, S, 16)])
    q_len, kv_len = np.array([40, 17, 1]), np.array([40, 25, 3])
    got = pyattn.scaled_dot_product_attention(q, k, v, is_causal=causal, q_lengths=q_len,
                                              kv_lengths=kv_len)
    want = jax_attention(q, k, v, is_causal=causal, query_seq_lengths=q_len.astype(np.int32),
                         key_value_seq_lengths=kv_len.astype(np.int32))
    for b in range(B):
        rows = np.arange(L) < q_len[b]
        rows &= visible(L, S, causal=causal, kv_len=kv_len[b]).any(-1)
        np.testing.assert_allclose(got[b][:, rows], want[b][:, rows], **TOL)
        assert (got[b][:, q_len[b]:] == 0).all()  # padded query rows: zeros


def test_grouped_query_attention_matches_jax(rng):
    q = rng.standard_normal((2, 8, 33, 16))
    k, v = rng.standard_normal((2, 2, 50, 16)), rng.standard_normal((2, 2, 50, 16))
    got = pyattn.scaled_dot_product_attention(q, k, v, enable_gqa=True, window=(7, 2))
    want = jax_attention(q, k, v, local_window_size=(7, 2))
    np.testing.assert_allclose(got, want, **TOL)


def test_bias_and_mask_match_jax(rng):
    L, S = 24, 31
    q, k, v = (rng.standard_normal(s) for s in [(2, 3, L, 8), (2, 3, S, 8), (2, 3, S, 8)])
    bias = rng.standard_normal((2, 3, L, S))
    keep = rng.random((2, 3, L, S)) > 0.3
    keep[..., 0] = True  # every row sees a key
    # pyattn takes one mask: the bias, with -inf where the bool mask drops a key
    got = pyattn.scaled_dot_product_attention(q, k, v, attn_mask=np.where(keep, bias, -np.inf))
    want = jax_attention(q, k, v, bias=bias, mask=keep)
    np.testing.assert_allclose(got, want, **TOL)
