"""ONNX Runtime's own static quantization (``quantize_static``, QDQ), the reference the report compares the
pipeline's QAT model with."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError, first_line

log = logging.getLogger(__name__)


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


def static_quantize(src: Path, dst: Path, calib: np.ndarray, act_dtype: str, weight_bits: int,
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
