"""ONNX files: ``torch.onnx.export`` with the pipeline's translations, and reading graphs (op counts, what runs on
dequantized data). Running them is the inference runtimes' job (``pipeline.inference``)."""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.artifacts import atomic_write_bytes
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)
_TORCHLIB: dict = {}  # from_torchlib's arguments -> the exporter's registry of torchlib functions


@contextlib.contextmanager
def _torchlib_registry_built_once():
    """Within the block, the exporter's ``ONNXRegistry.from_torchlib`` (about 1 s: it walks every torchlib
    function on each ``torch.onnx.export`` call) returns a copy of a registry built once per process. The copy
    is the exporter's to extend with the custom translations. Private API: where it is missing, nothing changes."""
    try:
        from torch.onnx._internal.exporter import _registration
        registry_cls = _registration.ONNXRegistry
        build = registry_cls.__dict__["from_torchlib"]
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def from_torchlib(cls, *args, **kwargs):
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in _TORCHLIB:
            _TORCHLIB[key] = build.__func__(cls, *args, **kwargs)
        base, fresh = _TORCHLIB[key], cls()
        fresh.__dict__.update(base.__dict__)
        fresh.functions = {k: list(v) for k, v in base.functions.items()}
        return fresh

    registry_cls.from_torchlib = classmethod(from_torchlib)
    try:
        yield
    finally:
        registry_cls.from_torchlib = build


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


@contextlib.contextmanager
def _out_of_place(model: nn.Module):
    """Within the block, modules built with ``inplace=True`` (ReLU, Hardswish, ...) compute out of place. The
    exporter turns an in-place op into its functional form through the op's decomposition, which with a symbolic
    batch dimension costs seconds (MobileNetV3-Small's Hardswish: about half its export time); the functional op
    is translated directly, into the same ONNX graph."""
    flipped = []
    for m in model.modules():
        if getattr(m, "inplace", None) is True:
            try:
                m.inplace = False
            except (AttributeError, TypeError):  # a read-only property: left as it is
                continue
            flipped.append(m)
    try:
        yield
    finally:
        for m in flipped:
            m.inplace = True


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int,
                extra_translations: dict[Callable, Callable] | None = None) -> None:
    """``torch.onnx.export`` (dynamo) with a dynamic batch dimension, then ``onnx.checker``."""
    import onnx

    table = {torch.ops.aten.mean.dim: _mean_to_global_pool, **(extra_translations or {})}
    model = model.eval().cpu()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _torchlib_registry_built_once(), \
            _out_of_place(model):
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


def normalise(x_uint8: torch.Tensor, mean: list[float], std: list[float]) -> np.ndarray:
    m = torch.tensor(mean).view(1, 3, 1, 1) * 255
    s = torch.tensor(std).view(1, 3, 1, 1) * 255
    return ((x_uint8.float() - m) / s).numpy()


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
