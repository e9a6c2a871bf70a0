"""ONNX export and ONNX Runtime helpers: sessions, batched inference, timing, kernel coverage."""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.artifacts import atomic_write_bytes
from pipeline.errors import PipelineError, first_line

log = logging.getLogger(__name__)

OPT_LEVELS = ("disable", "basic", "extended", "all")
INT8_KERNELS = {"QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "QGemm",
                "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "NhwcQLinearConv"}
FLOAT_KERNELS = {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul", "NchwcConv"}


def _mean_to_global_pool(x, dim, keepdim: bool = False, dtype=None):
    """aten.mean over H, W of a 4-D map -> GlobalAveragePool, which ORT can run as QLinearGlobalAveragePool;
    every other mean (over channels or tokens: ConvNeXt-V2's response norm) stays a ReduceMean."""
    from onnxscript import opset18 as op

    rank = len(x.shape) if x.shape is not None else None
    if not (rank == 4 and dim is not None and sorted(d % 4 for d in dim) == [2, 3]):
        if dim is None:
            return op.ReduceMean(x, keepdims=int(keepdim))
        return op.ReduceMean(x, op.Constant(value_ints=list(dim)), keepdims=int(keepdim))
    pooled = op.GlobalAveragePool(x)
    return pooled if keepdim else op.Squeeze(pooled, op.Constant(value_ints=[2, 3]))


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int,
                extra_translations: dict[Callable, Callable] | None = None) -> None:
    """``torch.onnx.export`` (dynamo) with a dynamic batch dimension, then ``onnx.checker``."""
    import onnx

    table = {torch.ops.aten.mean.dim: _mean_to_global_pool, **(extra_translations or {})}
    model = model.eval().cpu()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                model, (example.cpu(),), dynamo=True, opset_version=opset, input_names=["input"],
                output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                custom_translation_table=table, optimize=True, verbose=False,
            )
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            log.debug("torch.onnx.export failed", exc_info=True)
            raise PipelineError(f"torch.onnx.export failed: {msg[:300]}; run with HYDRA_FULL_ERROR=1 "
                                "and hydra.verbose=true for the exporter's report") from e
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp) / "model.onnx"
        program.save(str(tmp_path))
        proto = onnx.load(str(tmp_path))
    for node in proto.graph.node:  # exporter debug info (stack traces with local paths): not shipped
        del node.metadata_props[:]
    _unique_node_names(proto.graph)
    onnx.checker.check_model(proto, full_check=True)
    atomic_write_bytes(path, proto.SerializeToString())


def _unique_node_names(graph) -> int:
    """Rename nodes whose name another node already has (ONNX Runtime refuses such a model; torch 2.11's
    exporter wrote two ``node_conv2d_4`` into a QAT MobileNetV2, which ``onnx.checker`` lets pass).
    Returns how many were renamed."""
    taken = {n.name for n in graph.node}
    seen: set[str] = set()
    renamed = 0
    for node in graph.node:
        if not node.name or node.name not in seen:
            seen.add(node.name)
            continue
        k = 1
        while f"{node.name}_{k}" in taken:
            k += 1
        node.name = f"{node.name}_{k}"
        taken.add(node.name)
        seen.add(node.name)
        renamed += 1
    return renamed


def session(path: Path, threads: int = 0, opt_level: str = "all", providers: list[str] | None = None,
            optimized_path: Path | None = None, extra: dict[str, str] | None = None):
    """An ``onnxruntime.InferenceSession`` with explicit threads and graph optimisation level."""
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
    for k, v in (extra or {}).items():
        so.add_session_config_entry(k, v)
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    available = ort.get_available_providers()
    providers = [p for p in (providers or ["CPUExecutionProvider"]) if p in available] or ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:
        raise PipelineError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0][:300]}") from None


def _unshare_float_initializers(path: Path) -> None:
    """Give every node its own copy of a float initializer several nodes read (the exporter and ORT share equal
    constants: GroupNorm's InstanceNormalization scale of ones), which ORT's quantize_static refuses to
    quantize ("shared mode is not supported for weight")."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT,
                                                                            onnx.TensorProto.FLOAT16)}
    seen: dict[str, int] = {}
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name not in inits:
                continue
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > 1:
                copy = numpy_helper.from_array(numpy_helper.to_array(inits[name]), f"{name}__{seen[name]}")
                model.graph.initializer.append(copy)
                node.input[k] = copy.name
    if any(v > 1 for v in seen.values()):
        onnx.save(model, str(path))


def ort_static_quantize(src: Path, dst: Path, calib: np.ndarray, act_dtype: str, weight_bits: int,
                        work_dir: Path) -> None:
    """ONNX Runtime's own static QDQ quantization (per-channel S8 weights, MinMax calibration on ``calib``)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            # batches of 8: ORT's calibration session keeps every intermediate tensor of a batch alive
            # (Swin-T at 224 px: batches of 32 were killed at 24 GB, batches of 8 peak at 7.5 GB)
            self.it = iter([{"input": calib[i : i + 8]} for i in range(0, len(calib), 8)])

        def get_next(self):
            return next(self.it, None)

    def per_channel_fallback(record: logging.LogRecord) -> bool:
        # ORT asks for per-channel weights of every op it quantizes, LayerNorm's 1-D scale too, warns once per
        # such weight and quantizes it per tensor (ViT: 25 lines of "Axis 1 is out-of-range for weight ...")
        msg = record.getMessage()
        return not (msg.startswith("Axis ") and "is out-of-range for weight" in msg)

    import onnxruntime

    src, pre = Path(src).resolve(), (Path(work_dir) / "preprocessed.onnx").resolve()
    # where its symbolic shape inference fails, ORT saves the model it got to (sym_shape_infer_temp.onnx and its
    # external data) in the working directory: the work directory instead of the user's
    with contextlib.chdir(pre.parent):
        try:
            quant_pre_process(str(src), str(pre))
        except Exception as e:  # noqa: BLE001 - ORT's own tool; retried without the failing part
            # ORT 1.30's symbolic shape inference fails on ViT (Concat) and Swin (Range) exports; 1.32 on CoaT
            log.warning("ONNX Runtime %s's symbolic shape inference failed on %s (%s: %s); pre-processing without "
                        "it", onnxruntime.__version__, src.name, type(e).__name__, first_line(e))
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    _unshare_float_initializers(pre)
    root = logging.getLogger()
    root.addFilter(per_channel_fallback)
    try:
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8 if act_dtype == "uint8" else QuantType.QInt8,
                        weight_type=QuantType.QInt8, reduce_range=weight_bits == 7,
                        calibrate_method=CalibrationMethod.MinMax)
    except Exception as e:  # noqa: BLE001
        raise PipelineError(f"export/ort_static: ONNX Runtime {onnxruntime.__version__}'s quantize_static failed "
                            f"on this model ({type(e).__name__}: {first_line(e)}); set "
                            "export.ort_static_reference=false to skip the reference row") from e
    finally:
        root.removeFilter(per_channel_fallback)


def normalise(x_uint8: torch.Tensor, mean: list[float], std: list[float]) -> np.ndarray:
    m = torch.tensor(mean).view(1, 3, 1, 1) * 255
    s = torch.tensor(std).view(1, 3, 1, 1) * 255
    return ((x_uint8.float() - m) / s).numpy()


def predict_images(sessions: dict, images, mean: list[float], std: list[float],
                   batch_size: int = 256) -> dict[str, np.ndarray]:
    """Logits of every session on uint8 images (a tensor or a store view), in one pass over the images:
    each batch is read and normalised once for all sessions (bounded memory)."""
    outs: dict[str, list[np.ndarray]] = {name: [] for name in sessions}
    for i in range(0, len(images), batch_size):
        x = normalise(images[i : i + batch_size], mean, std)
        for name, sess in sessions.items():
            outs[name].append(predict(sess, x, batch_size))
    return {name: np.concatenate(o) for name, o in outs.items()}


def predict(sess, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs)


def time_runs(sess, x: np.ndarray, warmup: int, runs: int) -> np.ndarray:
    """Seconds per ``sess.run`` on the fixed input ``x`` (a bare loop: nothing else is timed).

    On the CUDA execution provider the input lives on the GPU and the output stays there (IO binding),
    so host-device copies are not timed, as in a serving loop that keeps tensors on the device.
    """
    name = sess.get_inputs()[0].name
    out = [sess.get_outputs()[0].name]
    if sess.get_providers()[0] == "CUDAExecutionProvider":
        import onnxruntime as ort

        binding = sess.io_binding()
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x), "cuda", 0))
        binding.bind_output(out[0], "cuda")

        def call() -> None:
            sess.run_with_iobinding(binding)
            binding.synchronize_outputs()
    else:
        feed = {name: np.ascontiguousarray(x)}

        def call() -> None:
            sess.run(out, feed)
    for _ in range(warmup):
        call()
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        call()
        times[i] = time.perf_counter() - t0
    return times


def runs_for(sess, x: np.ndarray, seconds: float, least: int = 3, most: int = 2000) -> int:
    """Timed runs of ``sess`` on ``x`` that take about ``seconds`` (at least ``least``): fast models need
    hundreds of calls per timed block, or one scheduler hiccup decides a ratio."""
    once = float(np.median(time_runs(sess, x, 1, 2)))
    return max(least, min(most, int(seconds / max(once, 1e-6))))


def _nodes(model) -> list:
    """The graph nodes of an ONNX file (a path) or of an already loaded ``ModelProto``."""
    import onnx

    return list((onnx.load(str(model)) if isinstance(model, (str, Path)) else model).graph.node)


def op_counts(model) -> collections.Counter:
    """Op types with counts, of an ONNX file or a loaded ``ModelProto``."""
    return collections.Counter(n.op_type for n in _nodes(model))


def dequantized_ops(model) -> dict[str, int]:
    """Op types (with counts) that read a DequantizeLinear's output: in ORT's optimised graph, the ops it runs
    in float between DequantizeLinear and QuantizeLinear, whatever the exporter or quantizer intended. Takes
    an ONNX file or a loaded ``ModelProto``."""
    nodes = _nodes(model)
    dq = {o for n in nodes if n.op_type == "DequantizeLinear" for o in n.output}
    skip = ("DequantizeLinear", "QuantizeLinear", "Shape", "Size")  # Shape and Size read no data
    found = collections.Counter(n.op_type for n in nodes if n.op_type not in skip and any(i in dq for i in n.input))
    return dict(found.most_common())


def kernel_coverage(path: Path, threads: int = 1) -> dict:
    """Count convs/matmuls that ORT runs as INT8 kernels in its optimised (EXTENDED) graph, and the ops it runs
    in float on dequantized data there."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "optimized.onnx"
        session(path, threads=threads, opt_level="extended", optimized_path=opt)
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


def cpu_info() -> dict:
    info = {"cpu": "unknown", "cores": os.cpu_count(), "flags": []}
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name") and info["cpu"] == "unknown":
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["flags"] = sorted(f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
                                       if f in flags)
                break
    return info
