"""ONNX Runtime as an inference runtime: CPU, CUDA and TensorRT execution providers, INT8 kernel coverage from its
optimised graph. Registered as ``onnxruntime`` in ``pipeline.inference``."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.inference.base import InferenceRuntime, Session

# ops of ORT's optimised graph that are INT8 kernels / float kernels for a conv or matmul
INT8_KERNELS = {"QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "QGemm",
                "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "NhwcQLinearConv"}
FLOAT_KERNELS = {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul", "NchwcConv"}
CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


class OrtSession(Session):
    """An ``onnxruntime.InferenceSession`` (``.ort``) behind the runtime interface."""

    runtime = "onnxruntime"

    def __init__(self, sess, async_ok: bool = True):
        self.ort = sess
        self.supports_async = async_ok  # run_async needs intra-op pool threads (OnnxRuntime.session decides)
        inp, out = sess.get_inputs()[0], sess.get_outputs()[0]
        self._in, self._out = inp.name, [out.name]
        self.input_dtype = "uint8" if inp.type == "tensor(uint8)" else "float32"
        self.input_shape, self.output_shape = list(inp.shape), list(out.shape)
        self.metadata = dict(sess.get_modelmeta().custom_metadata_map)
        self.devices = list(sess.get_providers())

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.ort.run(self._out, {self._in: x})[0]

    def bound_call(self, x: np.ndarray) -> Callable[[], None]:
        if self.devices[0] in (CUDA, TENSORRT):  # IO binding: input on the GPU, output left there
            import onnxruntime as ort

            binding = self.ort.io_binding()
            binding.bind_ortvalue_input(self._in, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
            binding.bind_output(self._out[0], "cuda")

            def call() -> None:
                self.ort.run_with_iobinding(binding)
                binding.synchronize_outputs()
            return call
        feed, out, run = {self._in: x}, self._out, self.ort.run

        def call() -> None:
            run(out, feed)
        return call

    def run_async(self, x: np.ndarray, callback: Callable[[str | None], None]) -> None:
        self.ort.run_async(self._out, {self._in: x}, lambda _res, _data, err: callback(err or None), None)


class OnnxRuntime(InferenceRuntime):
    name = "onnxruntime"

    def version(self) -> str:
        import onnxruntime

        return onnxruntime.__version__

    def devices(self, choice: str) -> tuple[list[str], str]:
        """``cpu``; ``cuda`` (CUDA EP); ``tensorrt`` (TensorRT EP, CUDA and CPU behind it for what it cannot
        run); ``auto``: CUDA where onnxruntime-gpu and a GPU are both present, else CPU. Untested without a GPU."""
        import onnxruntime as ort
        import torch

        available = ort.get_available_providers()
        gpu = torch.cuda.is_available()
        have_cuda = CUDA in available
        if choice == "cpu" or (choice == "auto" and not (have_cuda and gpu)):
            note = ""
            if choice == "auto" and gpu:
                note = ("a GPU is present but onnxruntime has no CUDA provider (install onnxruntime-gpu); measured on "
                        "CPU")
            elif choice == "auto" and have_cuda:
                note = "onnxruntime-gpu is installed but no CUDA GPU is visible; measured on CPU"
            return [CPU], note
        want = TENSORRT if choice == "tensorrt" else CUDA
        if want not in available:
            raise PipelineError(f"validate.provider={choice} but onnxruntime has no {want} (its providers: "
                                f"{', '.join(available)}); install onnxruntime-gpu (with TensorRT for tensorrt) or "
                                "use validate.provider=cpu")
        if not gpu:
            raise PipelineError(f"validate.provider={choice} but no CUDA GPU is visible; use validate.provider=cpu "
                                "or auto")
        return ([TENSORRT] if choice == "tensorrt" else []) + [CUDA, CPU], ""

    def session(self, path: Path | str, threads: int = 0, opt_level: str = "all", devices: list[str] | None = None,
                optimized_path: Path | None = None, options: dict[str, str] | None = None) -> OrtSession:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[opt_level]
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        for k, v in (options or {}).items():
            so.add_session_config_entry(k, v)
        if optimized_path is not None:
            so.optimized_model_filepath = str(optimized_path)
        available = ort.get_available_providers()
        providers = [p for p in (devices or [CPU]) if p in available] or [CPU]
        # run_async hands requests to intra-op pool threads besides the caller's: one thread in all has none
        async_ok = threads > 1 or (threads == 0 and (os.cpu_count() or 1) > 1)
        try:
            return OrtSession(ort.InferenceSession(str(path), so, providers=providers), async_ok)
        except Exception as e:
            raise PipelineError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0][:300]}") from None

    def kernel_coverage(self, path: Path, threads: int = 1) -> dict:
        """Convs/matmuls ORT runs as INT8 kernels in its optimised (EXTENDED) graph, and the ops it runs in
        float on dequantized data there."""
        import onnx

        from pipeline.onnxio import dequantized_ops, op_counts

        with tempfile.TemporaryDirectory() as tmp:
            opt = Path(tmp) / "optimized.onnx"
            self.session(path, threads=threads, opt_level="extended", optimized_path=opt)
            proto = onnx.load(str(opt))  # once, for both counts
        counts, dequantized = op_counts(proto), dequantized_ops(proto)
        int8 = {k: v for k, v in counts.items() if k in INT8_KERNELS}
        fp = {k: v for k, v in counts.items() if k in FLOAT_KERNELS}
        total = sum(int8.values()) + sum(fp.values())
        return {"int8_kernels": sum(int8.values()), "float_kernels": sum(fp.values()),
                "coverage": (sum(int8.values()) / total) if total else 0.0,
                "int8_ops": int8, "float_ops": fp,
                "qdq_left": counts.get("QuantizeLinear", 0) + counts.get("DequantizeLinear", 0),
                "dequantized_ops": dequantized}

