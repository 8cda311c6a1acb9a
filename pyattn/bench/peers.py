"""What the benchmarks measure: pyattn and its NumPy reference
(``IMPLEMENTATIONS``, always there) and the optional other libraries
(``PEERS``: PyTorch's SDPA, ONNX Runtime's MultiHeadAttention), each turned
into a zero-argument call on a case's inputs outside the timing."""
import contextlib

import numpy as np

import pyattn

REFERENCE_MAX_SCORES = 1 << 31  # bytes: the reference declines cases whose scores need more
REFERENCE_MAX_REPEAT = 5        # the reference is slow: at most this many timed runs


class NotApplicable(Exception):
    """Raised by Peer.prepared when the peer cannot run a case; the message says why."""


def _pyattn(case, q, k, v, threads):
    """A call of pyattn on the case; a cache case fills a KVCache first."""
    if case.cache:
        cache = pyattn.KVCache(case.B, case.Hkv, case.D, dtype=q.dtype)
        cache.append(k, v)
        return lambda: pyattn.decode_attention(q, cache, num_threads=threads)
    kwargs = case.sdpa_kwargs
    return lambda: pyattn.scaled_dot_product_attention(q, k, v, num_threads=threads, **kwargs)


def _reference(case, q, k, v, threads):
    scores = case.B * case.H * case.L * case.S * (8 if case.dtype == "float64" else 4)
    if scores > REFERENCE_MAX_SCORES:
        raise NotApplicable(f"its score matrix would need {scores / 2**30:.0f} GiB")
    # num_threads is only validated by the reference; NumPy's BLAS decides
    # (main() limits the BLAS pool to --threads when threadpoolctl is present)
    kwargs = case.sdpa_kwargs
    return lambda: pyattn.reference.scaled_dot_product_attention(q, k, v, num_threads=threads,
                                                                 **kwargs)


IMPLEMENTATIONS = {"pyattn": _pyattn, "reference": _reference}
SUBJECT, BASELINE = "pyattn", "reference"


@contextlib.contextmanager
def plain_prepared(prepare, case, q, k, v, threads):
    """An IMPLEMENTATIONS entry in Peer.prepared's form (its result needs no conversion)."""
    yield prepare(case, q, k, v, threads), None


class Peer:
    """An optional other library, measured when it imports.

    ``probe()`` imports it and returns a description (version, API used);
    an ImportError means absent.  ``prepared(case, q, k, v, threads)`` is a
    context manager that does all the per-case work outside the timing
    (conversions, sessions, thread settings; undone on exit) and yields
    ``(call, to_bhld)``: ``call()`` runs the attention once, ``to_bhld(out)``
    turns its result into a (B, H, L, D) NumPy array for the check.
    """

    name = ""    # key in the results and the JSON
    label = ""   # short column label

    def probe(self):
        raise NotImplementedError

    def prepared(self, case, q, k, v, threads):
        raise NotImplementedError


class TorchPeer(Peer):
    """torch.nn.functional.scaled_dot_product_attention on torch.from_numpy views."""

    name, label = "torch", "torch"

    def probe(self):
        import torch
        self.torch = torch
        return {"version": torch.__version__,
                "api": "torch.nn.functional.scaled_dot_product_attention",
                "default_threads": torch.get_num_threads(),
                "threads": "torch.set_num_threads(threads) for the run"}

    @contextlib.contextmanager
    def prepared(self, case, q, k, v, threads):
        torch = self.torch
        if case.window:
            raise NotApplicable("no sliding window in torch's SDPA (only a materialised mask)")
        if case.dtype == "bfloat16":  # NumPy's bfloat16 (ml_dtypes) reaches torch by its bits
            tq, tk, tv = (torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
                          for x in (q, k, v))
        else:
            tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))  # views, no copy
        sdpa = torch.nn.functional.scaled_dot_product_attention
        kwargs = {"is_causal": case.causal, "enable_gqa": case.Hkv != case.H}
        if case.lower_right and case.L > 1:
            from torch.nn.attention.bias import causal_lower_right
            kwargs.update(is_causal=False, attn_mask=causal_lower_right(case.L, case.S))
        elif case.lower_right:  # one query at the end sees every key
            kwargs["is_causal"] = False
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                yield (lambda: sdpa(tq, tk, tv, **kwargs)), (lambda out: out.float().numpy())
        finally:
            torch.set_num_threads(before)


class OnnxRuntimePeer(Peer):
    """ONNX Runtime's com.microsoft MultiHeadAttention contrib op, CPU provider.

    The model is one MultiHeadAttention node (num_heads=H) with inputs
    query (B, L, H*D), key and value (B, S, H*D) and output (B, L, H*D), all
    float32; causal uses its ``unidirectional`` attribute.  The (B, H, L, D)
    inputs are transposed to (B, L, H*D) once per case, outside the timing.
    """

    name, label = "onnxruntime", "ort"
    OPSET = 17

    def probe(self):
        import onnx
        import onnxruntime
        if "CPUExecutionProvider" not in onnxruntime.get_available_providers():
            raise ImportError("onnxruntime has no CPUExecutionProvider")
        self.onnx, self.ort = onnx, onnxruntime
        return {"version": onnxruntime.__version__, "onnx": onnx.__version__,
                "api": "com.microsoft MultiHeadAttention (one-node ONNX model), "
                       "CPUExecutionProvider",
                "threads": "SessionOptions.intra_op_num_threads = threads, inter_op 1"}

    def model(self, case):
        """The serialized one-node model for `case` (float32, fixed shapes)."""
        helper, TensorProto = self.onnx.helper, self.onnx.TensorProto
        B, H, L, S, D = case.B, case.H, case.L, case.S, case.D
        attrs = {"num_heads": H}
        if case.causal and not case.lower_right:
            attrs["unidirectional"] = 1
        node = helper.make_node("MultiHeadAttention", ["query", "key", "value"], ["output"],
                                domain="com.microsoft", **attrs)
        value = lambda name, n: helper.make_tensor_value_info(  # noqa: E731
            name, TensorProto.FLOAT, [B, n, H * D])
        graph = helper.make_graph([node], "mha", [value("query", L), value("key", S),
                                                  value("value", S)], [value("output", L)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.OPSET),
                                                        helper.make_opsetid("com.microsoft", 1)])
        return model.SerializeToString()

    @contextlib.contextmanager
    def prepared(self, case, q, k, v, threads):
        if case.dtype != "float32":
            raise NotApplicable(f"{case.dtype}: MultiHeadAttention's CPU kernel takes float32 only")
        if case.Hkv != case.H or case.window:
            raise NotApplicable("GQA and windows are GroupQueryAttention's, "
                                "not MultiHeadAttention's")
        if case.lower_right and case.L > 1:
            raise NotApplicable("several new queries against a cache need a lower-right mask")
        if case.causal and case.L != case.S:
            # unidirectional masks bottom-right aligned when L < S; is_causal is top-left
            raise NotApplicable("causal with L != S: unidirectional is aligned differently")
        ort = self.ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(self.model(case), options,
                                       providers=["CPUExecutionProvider"])

        def to_blhd(x):  # (B, H, N, D) -> (B, N, H*D), contiguous
            return np.ascontiguousarray(x.transpose(0, 2, 1, 3)).reshape(x.shape[0], x.shape[2], -1)

        feeds = {"query": to_blhd(q), "key": to_blhd(k), "value": to_blhd(v)}
        B, H, L, D = case.B, case.H, case.L, case.D
        try:
            yield ((lambda: session.run(["output"], feeds)[0]),
                   (lambda out: out.reshape(B, L, H, D).transpose(0, 2, 1, 3)))
        finally:
            session = None  # its thread pool goes now, not at the next collection


PEERS = {p.name: p for p in [TorchPeer(), OnnxRuntimePeer()]}


def probe_peers(names):
    """{name: description} for the requested peers: available ones carry the
    Peer under "peer" (dropped from the JSON), absent ones the reason."""
    found = {}
    for name in names:
        peer = PEERS[name]
        try:
            info = peer.probe()
        except Exception as exc:  # ImportError, or a broken install: absent either way
            found[name] = {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
        else:
            found[name] = dict(available=True, peer=peer, **info)
    return found
