"""Inference runtimes behind one interface: sessions, kernel coverage, timing and accuracy.

Validate, the serving measurements, ``pipeline.predict``, the INT8 placement search and the search probe
talk to a runtime only through :class:`InferenceRuntime` and :class:`Session`. A runtime lives in one
module of this package and registers itself (``register``); ONNX Runtime (CPU and CUDA execution
providers) is ``pipeline/inference/ort.py``, its static quantizer ``pipeline/inference/ort_quantize.py``.
Those two are the only modules of the pipeline that import ``onnxruntime``. OpenVINO (optional extra
``openvino``) is ``pipeline/inference/openvino.py``, the only module that imports ``openvino``.

    from pipeline import inference
    rt = inference.get("onnxruntime")
    sess = rt.session("model.onnx", threads=2)
    logits = inference.predict(sess, x)
    seconds = inference.time_runs(sess, x, warmup=5, runs=20)
"""

from __future__ import annotations

import importlib

from pipeline.errors import PipelineError
from pipeline.inference.base import (
    OPT_LEVELS,
    InferenceRuntime,
    Session,
    predict,
    predict_images,
    runs_for,
    startup_seconds,
    time_runs,
)

__all__ = ["DEFAULT", "OPT_LEVELS", "InferenceRuntime", "Session", "get", "names", "predict", "predict_images",
           "register", "runs_for", "startup_seconds", "time_runs"]
DEFAULT = "onnxruntime"

# name -> "module:Class"; a runtime's module is imported only when the runtime is used (its package may be absent)
_REGISTRY: dict[str, str] = {"onnxruntime": "pipeline.inference.ort:OnnxRuntime",
                             "openvino": "pipeline.inference.openvino:OpenVinoRuntime"}
_INSTANCES: dict[str, InferenceRuntime] = {}


def register(name: str, target: str) -> None:
    """Make a runtime available under ``name``: ``target`` is ``"package.module:Class"``."""
    _REGISTRY[name] = target


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str = DEFAULT) -> InferenceRuntime:
    """The runtime registered as ``name``; an unknown name is a one-line error listing the known ones."""
    if name not in _REGISTRY:
        raise PipelineError(f"unknown inference runtime {name!r}; choose one of {', '.join(names())}")
    if name not in _INSTANCES:
        module, cls = _REGISTRY[name].split(":")
        _INSTANCES[name] = getattr(importlib.import_module(module), cls)()
    return _INSTANCES[name]
