"""OpenVINO as an inference runtime (CPU plugin): f32 or bf16 inference precision, INT8 kernel coverage from the
compiled model's runtime graph. Registered as ``openvino`` in ``pipeline.inference``; needs the optional extra
``pip install -e ".[openvino]"``. The only module of the pipeline that imports ``openvino``.

OpenVINO reads the same ONNX files as ONNX Runtime, QDQ INT8 models included (it fuses the
DequantizeLinear -> Conv/MatMul -> QuantizeLinear patterns into INT8 kernels). Its float precision is a compile
setting (``INFERENCE_PRECISION_HINT``): ``f32``, or ``bf16`` on CPUs with native bfloat16 (AVX512_BF16, AMX).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.inference.base import InferenceRuntime, Session

EXTRA = 'pip install -e ".[openvino]"'
CPU = "CPU"
# layer types of the compiled (runtime) model that are convs or matmuls
KERNEL_LAYERS = {"Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution"}
INT8_PRECISIONS = {"i8", "u8"}


def _openvino():
    try:
        import openvino
    except ImportError:
        raise PipelineError(f"the openvino runtime needs the OpenVINO package: {EXTRA}") from None
    return openvino


def native_bf16() -> str | None:
    """Which of this CPU's flags run bfloat16 natively (``avx512_bf16``, ``amx_bf16``), or None."""
    from pipeline.env import BF16_FLAGS, cpu_info

    found = [f for f in BF16_FLAGS if f in cpu_info()["flags"]]
    return ", ".join(found) or None


def _onnx_metadata(path: Path) -> dict[str, str]:
    """The ONNX file's ``metadata_props`` (OpenVINO does not keep them)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ONNX (an OpenVINO IR): no pipeline metadata
        return {}
    return {p.key: p.value for p in model.metadata_props}


def _dims(shape) -> list:
    return [d.get_length() if d.is_static else None for d in shape]


class OpenVinoSession(Session):
    """An OpenVINO ``CompiledModel`` (``.compiled``) behind the runtime interface; one infer request per thread."""

    runtime = "openvino"
    supports_async = True

    def __init__(self, compiled, metadata: dict[str, str], precision: str, path: Path | None = None,
                 options: dict[str, str] | None = None):
        self.compiled = compiled
        self.path, self.options = path, dict(options or {})  # what it was compiled from, with the caller's options
        inp, out = compiled.inputs[0], compiled.outputs[0]
        self.input_dtype = "uint8" if inp.get_element_type().get_type_name() == "u8" else "float32"
        self.input_shape, self.output_shape = _dims(inp.get_partial_shape()), _dims(out.get_partial_shape())
        self.metadata = metadata
        self.devices = [CPU]
        self.precision = precision
        self._local = threading.local()
        self._queue = None
        self._queue_lock = threading.Lock()

    def _request(self):
        req = getattr(self._local, "request", None)
        if req is None:
            req = self._local.request = self.compiled.create_infer_request()
        return req

    def run(self, x: np.ndarray) -> np.ndarray:
        req = self._request()
        req.infer({0: x}, share_inputs=True)
        return req.get_output_tensor(0).data.copy()

    def bound_call(self, x: np.ndarray) -> Callable[[], None]:
        req = self._request()
        req.set_input_tensor(0, _openvino().Tensor(x, shared_memory=True))
        infer = req.infer

        def call() -> None:
            infer()
        return call

    def layer_times(self, x: np.ndarray, runs: int = 20) -> dict[tuple[str, str], float]:
        """Milliseconds per call that each (layer type, kernel) of the compiled model spends on ``x``, from
        OpenVINO's performance counters: a session compiled with ``options={"PERF_COUNT": "YES"}``."""
        req = self._request()
        total: dict[tuple[str, str], float] = {}
        for _ in range(runs):
            req.infer({0: x}, share_inputs=True)
            for p in req.profiling_info:
                if p.status == p.Status.EXECUTED:
                    key = (p.node_type, p.exec_type)
                    total[key] = total.get(key, 0.0) + p.real_time.total_seconds() * 1e3
        if not total:
            raise PipelineError("OpenVINO reported no layer times: compile the session with "
                                'options={"PERF_COUNT": "YES"}')
        return {k: v / runs for k, v in total.items()}

    def run_async(self, x: np.ndarray, callback: Callable[[str | None], None]) -> None:
        with self._queue_lock:
            if self._queue is None:
                ov = _openvino()
                jobs = max(2, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
                self._queue = ov.AsyncInferQueue(self.compiled, jobs)
                self._queue.set_callback(lambda _req, done: done(None))
        self._queue.start_async({0: x}, callback)


class OpenVinoRuntime(InferenceRuntime):
    """OpenVINO's CPU plugin. ``session(..., options=...)`` passes OpenVINO properties through (e.g.
    ``{"INFERENCE_PRECISION_HINT": "bf16"}``); ``precision_options`` makes them from a precision name."""

    name = "openvino"

    def __init__(self):
        self.ov = _openvino()
        self.core = self.ov.Core()

    def version(self) -> str:
        return self.ov.__version__.split("-")[0]

    def devices(self, choice: str) -> tuple[list[str], str]:
        if choice in ("cuda", "tensorrt"):
            raise PipelineError(f"validate.provider={choice} is an ONNX Runtime execution provider; the openvino "
                                "runtime runs on the CPU here: use validate.provider=auto or cpu, or drop openvino "
                                "from validate.runtimes")
        return [CPU], ""

    def float_precisions(self) -> list[str]:
        """f32 everywhere; bf16 too where the CPU runs it natively (elsewhere OpenVINO would emulate it)."""
        return ["f32", "bf16"] if native_bf16() else ["f32"]

    def precision_options(self, precision: str) -> dict[str, str]:
        if precision not in ("f32", "bf16"):
            raise PipelineError(f"openvino precision {precision!r}: choose f32 or bf16")
        return {"INFERENCE_PRECISION_HINT": precision}

    def session(self, path: Path | str, threads: int = 0, opt_level: str = "all", devices: list[str] | None = None,
                optimized_path: Path | None = None, options: dict[str, str] | None = None) -> OpenVinoSession:
        """Compile ``path`` for the CPU: ``threads`` inference threads (0: OpenVINO's default, one per core), one
        stream (sequential calls, as ONNX Runtime's session). OpenVINO always optimises the graph (``opt_level``
        is not used); ``optimized_path`` saves the compiled model's blob (``core.import_model`` loads it).
        Without an ``INFERENCE_PRECISION_HINT`` option the session runs in f32 (OpenVINO's own default is bf16 on
        CPUs that have it)."""
        config: dict[str, object] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
                                     "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        config.update(options or {})
        try:
            compiled = self.core.compile_model(str(path), CPU, config)
        except Exception as e:
            raise PipelineError(f"OpenVINO cannot load {path}: {str(e).strip().splitlines()[0][:300]}") from None
        if optimized_path is not None:
            Path(optimized_path).write_bytes(compiled.export_model())
        precision = str(compiled.get_property("INFERENCE_PRECISION_HINT")).removeprefix("<Type: '").rstrip("'>")
        return OpenVinoSession(compiled, _onnx_metadata(Path(path)), {"float32": "f32", "bfloat16": "bf16"}.get(
            precision, precision), Path(path), options)

    def kernel_coverage(self, path: Path, threads: int = 1) -> dict:
        """Convs/matmuls of the compiled model's runtime graph that run in INT8 (``runtimePrecision`` i8/u8), with
        the float ones by layer type (f32 compile precision, so bf16 does not hide a float layer)."""
        sess = self.session(path, threads)
        int8: dict[str, int] = {}
        fp: dict[str, int] = {}
        for op in sess.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            kind = info["layerType"].astype(str)
            if kind not in KERNEL_LAYERS:
                continue
            into = int8 if info["runtimePrecision"].astype(str) in INT8_PRECISIONS else fp
            into[kind] = into.get(kind, 0) + 1
        total = sum(int8.values()) + sum(fp.values())
        return {"int8_kernels": sum(int8.values()), "float_kernels": sum(fp.values()),
                "coverage": (sum(int8.values()) / total) if total else 0.0, "int8_ops": int8, "float_ops": fp,
                "qdq_left": 0, "dequantized_ops": {}}
