"""What the benchmarks measure: pyattn and its NumPy reference
(``IMPLEMENTATIONS``, always there), pyattn's own float32 beside its
bfloat16 products (``F32``, on the cases that ask for it) and the optional
other libraries (``PEERS``: PyTorch's SDPA, ONNX Runtime's
MultiHeadAttention, OpenVINO's ScaledDotProductAttention), each turned into
a zero-argument call on a case's inputs outside the timing."""
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
    if case.precision is not None:
        kwargs["precision"] = case.precision
    return lambda: pyattn.scaled_dot_product_attention(q, k, v, num_threads=threads, **kwargs)


def _pyattn_f32(case, q, k, v, threads):
    """pyattn's own float32 on the case: its inputs as float32 (bfloat16 ones
    widened, exactly, outside the timing) with precision="exact"."""
    if case.cache:
        raise NotApplicable("pyattn-f32 runs scaled_dot_product_attention cases only")
    q, k, v = (np.ascontiguousarray(x, dtype=np.float32) for x in (q, k, v))
    kwargs = case.sdpa_kwargs
    return lambda: pyattn.scaled_dot_product_attention(q, k, v, num_threads=threads,
                                                       precision="exact", **kwargs)


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
# run besides IMPLEMENTATIONS on the cases with Case.with_f32, as they are
F32 = "pyattn-f32"
ALONGSIDE = {F32: _pyattn_f32}


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
    """torch.nn.functional.scaled_dot_product_attention on torch.from_numpy views.

    bfloat16 inputs reach torch as bfloat16 tensors (torch's bfloat16 SDPA);
    float32 with precision="bf16" runs with
    ``torch.backends.mkldnn.matmul.fp32_precision = "bf16"`` for the case,
    which torch's CPU SDPA follows (its float32 products then in bfloat16).
    """

    name, label = "torch", "torch"

    def probe(self):
        import torch
        self.torch = torch
        return {"version": torch.__version__,
                "api": "torch.nn.functional.scaled_dot_product_attention",
                "default_threads": torch.get_num_threads(),
                "threads": "torch.set_num_threads(threads) for the run",
                "bf16_products": "bfloat16 tensors; float32 with precision=bf16: "
                                 "torch.backends.mkldnn.matmul.fp32_precision = 'bf16'"}

    @contextlib.contextmanager
    def _fp32_precision(self, case):
        """torch's float32 products in bfloat16 for the case when it asks for it."""
        if case.precision != "bf16" or case.dtype != "float32":
            yield
            return
        matmul = getattr(self.torch.backends.mkldnn, "matmul", None)
        if not hasattr(matmul, "fp32_precision"):
            raise NotApplicable("this torch has no torch.backends.mkldnn.matmul.fp32_precision")
        before = matmul.fp32_precision
        try:
            matmul.fp32_precision = "bf16"
        except (RuntimeError, ValueError) as exc:
            raise NotApplicable(f"fp32_precision = 'bf16' refused: {exc}") from None
        try:
            yield
        finally:
            matmul.fp32_precision = before

    @contextlib.contextmanager
    def prepared(self, case, q, k, v, threads):
        torch = self.torch
        if case.window:
            raise NotApplicable("no sliding window in torch's SDPA (only a materialised mask)")
        if case.precision is not None and case.precision != "bf16":
            raise NotApplicable(f"precision={case.precision}: torch has no such switch")
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
            with self._fp32_precision(case), torch.inference_mode():
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
        if case.precision == "bf16":
            raise NotApplicable("no bfloat16 products in MultiHeadAttention's CPU kernel")
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


class OpenVINOPeer(Peer):
    """OpenVINO's ScaledDotProductAttention (opset13), CPU plugin.

    The model is one ScaledDotProductAttention node on query (B, H, L, D),
    key and value (B, H, S, D) parameters of the case's element type (bf16,
    f32 or f16; ``causal`` for top-left causal), compiled for the CPU with
    INFERENCE_NUM_THREADS = threads and INFERENCE_PRECISION_HINT bf16 where
    pyattn runs bfloat16 products (Case.bf16_products), else f32: the plugin
    would pick bf16 by itself on a CPU with bfloat16 units, also for float32.
    The inputs are set once on a prepared InferRequest as ov.Tensors sharing
    the arrays' memory (bfloat16: its raw uint16 bits as type bf16); the
    timed call is that request's infer(), its output shared, not copied.
    """

    name, label = "openvino", "ov"
    ELEMENT_TYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}

    def probe(self):
        import openvino
        try:
            from openvino import opset13
        except ImportError:  # older releases have the opsets under openvino.runtime only
            from openvino.runtime import opset13
        core = openvino.Core()
        if "CPU" not in core.available_devices:
            raise ImportError("openvino has no CPU device")
        self.ov, self.ops, self.core = openvino, opset13, core
        return {"version": openvino.__version__.split("-")[0], "build": openvino.__version__,
                "api": "opset13 ScaledDotProductAttention (one-node model), CPU plugin, "
                       "InferRequest.infer",
                "threads": "INFERENCE_NUM_THREADS = threads",
                "bf16_products": "INFERENCE_PRECISION_HINT bf16 (f32 otherwise)"}

    def compiled(self, case, threads):
        """The one-node model for `case`, compiled for the CPU."""
        ov, ops = self.ov, self.ops
        etype = getattr(ov.Type, self.ELEMENT_TYPES[case.dtype])
        params = [ops.parameter([case.B, heads, n, case.D], etype, name=name)
                  for name, heads, n in (("query", case.H, case.L), ("key", case.Hkv, case.S),
                                         ("value", case.Hkv, case.S))]
        causal = case.causal and not case.lower_right  # lower-right here: one query, all keys
        node = ops.scaled_dot_product_attention(*params, causal=causal)
        model = ov.Model([node.output(0)], params, "sdpa")
        config = {"INFERENCE_PRECISION_HINT": "bf16" if case.bf16_products else "f32",
                  "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        return self.core.compile_model(model, "CPU", config)

    @contextlib.contextmanager
    def prepared(self, case, q, k, v, threads):
        if case.dtype not in self.ELEMENT_TYPES:
            raise NotApplicable(f"{case.dtype}: the CPU plugin computes in float32 at most")
        if case.precision == "exact" and case.dtype == "bfloat16":
            raise NotApplicable("bfloat16 inputs computed in float32: no such setting")
        if case.Hkv != case.H:
            raise NotApplicable("GQA: key and value heads must broadcast against the query's")
        if case.window:
            raise NotApplicable("no sliding window in ScaledDotProductAttention "
                                "(only a materialised mask)")
        if case.lower_right and case.L > 1:
            raise NotApplicable("its causal mask is top-left; lower-right needs a "
                                "materialised mask")
        ov = self.ov
        request = self.compiled(case, threads).create_infer_request()
        arrays = [np.ascontiguousarray(x) for x in (q, k, v)]  # the tensors share these
        for i, x in enumerate(arrays):
            if case.dtype == "bfloat16":
                tensor = ov.Tensor(x.view(np.uint16), list(x.shape), ov.Type.bf16)
            else:
                tensor = ov.Tensor(x, shared_memory=True)
            request.set_input_tensor(i, tensor)

        def to_bhld(out):  # a view of the request's output, rewritten by every call
            out = np.array(out, copy=True)
            if case.dtype == "bfloat16":  # bf16 bits, whatever NumPy dtype they come as
                from ml_dtypes import bfloat16
                out = out.view(np.uint16).view(bfloat16)
            return out

        try:
            yield (lambda: request.infer(share_outputs=True)[0]), to_bhld
        finally:
            request = None  # its buffers go now, not at the next collection


PEERS = {p.name: p for p in [TorchPeer(), OnnxRuntimePeer(), OpenVINOPeer()]}


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
