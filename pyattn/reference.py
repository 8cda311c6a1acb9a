"""Pure-NumPy attention: the oracle for pyattn's tests and the baseline of its
benchmarks.  Same signature and rules as ``pyattn.scaled_dot_product_attention``,
written as the classic four steps; it materialises the full (..., L, S) score
matrix, which is exactly what the compiled kernel avoids."""
import numpy as np

from ._validation import check_num_threads, cpu_count, prepare_attention, prepare_out

__all__ = ["scaled_dot_product_attention", "softmax"]


def softmax(scores, axis=-1):
    """Softmax along `axis`; a row that is all -inf gives zeros, not NaN."""
    row_max = scores.max(axis=axis, keepdims=True, initial=-np.inf)  # S = 0 too
    row_max = np.where(row_max == -np.inf, 0, row_max)  # all masked: shift by 0
    e = np.exp(scores - row_max)
    total = e.sum(axis=axis, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total != 0)


def scaled_dot_product_attention(query, key, value, attn_mask=None, is_causal=False,
                                 scale=None, enable_gqa=False, *, out=None,
                                 num_threads=None):
    prob = prepare_attention(query, key, value, attn_mask, is_causal, scale, enable_gqa)
    check_num_threads(num_threads, cpu_count)  # validated for parity; NumPy's BLAS decides
    inputs = {"query": query, "key": key, "value": value, "attn_mask": attn_mask}
    result = prepare_out(out, prob, {n: a for n, a in inputs.items() if isinstance(a, np.ndarray)})

    q, k, v = prob.q, prob.k, prob.v
    if prob.kv_group > 1:  # GQA: query head h reads key/value head h // group
        k = np.repeat(k, prob.num_heads // k.shape[-3], axis=-3)
        v = np.repeat(v, prob.num_heads // v.shape[-3], axis=-3)

    # 1. scores: every query against every key
    scores = q @ np.swapaxes(k, -1, -2)
    # 2. scaling
    scores = scores * prob.scale
    if prob.mask is not None:
        if prob.mask.dtype == np.bool_:
            scores = np.where(prob.mask, scores, -np.inf)
        else:
            scores = scores + prob.mask
    if prob.is_causal:
        L, S = scores.shape[-2:]
        scores = np.where(np.tri(L, S, dtype=bool), scores, -np.inf)
    # 3. softmax over the keys
    weights = softmax(scores)
    # 4. weighted sum of the values
    attended = weights @ v
    result[...] = np.broadcast_to(attended, prob.work_shape).reshape(prob.out_shape)
    return result
