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


def _translatable_as_captured(program, implemented: set) -> bool:
    """Whether the exporter can translate the captured graph of ``program`` without decomposing it: no input or
    buffer is mutated and every op has a translation. A global ``adaptive_avg_pool2d`` (the ``AdaptiveAvgPool2d(1)``
    of every zoo classifier; not itself translated) becomes ``mean`` over H, W, i.e. ``GlobalAveragePool`` (what its
    decomposition and ``_mean_to_global_pool`` give too)."""
    import operator

    sig = program.graph_signature
    if sig.buffers_to_mutate or sig.user_inputs_to_mutate:
        return False
    graph = program.graph
    rewrites = {}  # node -> how to rewrite it (applied only if the whole graph is translatable)
    for n in graph.nodes:
        if n.op != "call_function" or n.target in implemented or n.target is operator.getitem:
            continue
        if n.target is torch.ops.aten.adaptive_avg_pool2d.default and len(n.args) == 2 and not n.kwargs \
                and list(n.args[1]) == [1, 1]:
            rewrites[n] = "pool"
        elif n.target is torch.ops.aten.batch_norm.default and len(n.args) == 9 and not n.kwargs \
                and n.args[5] is False and None not in n.args[3:5] and "val" in n.meta:
            rewrites[n] = "batch_norm"
        elif (f := _functional_form(n)) is not None and f in implemented:
            rewrites[n] = f
        else:
            return False
    for n, how in rewrites.items():
        if how == "pool":
            n.target, n.args = torch.ops.aten.mean.dim, (n.args[0], [-1, -2], True)
        elif how == "batch_norm":  # what the decomposition makes of an eval batch norm: output 0 of
            x, w, b, mean, var, _, momentum, eps, _ = n.args  # _native_batch_norm_legit_no_training
            with graph.inserting_before(n):
                bn = graph.call_function(torch.ops.aten._native_batch_norm_legit_no_training.default,
                                         (x, w, b, mean, var, momentum, eps))
                out = graph.call_function(operator.getitem, (bn, 0))
            val = n.meta["val"]
            bn.meta.update(n.meta)
            bn.meta["val"] = (val, val.new_empty((0,)), val.new_empty((0,)))
            out.meta.update(n.meta)
            n.replace_all_uses_with(out)
            graph.erase_node(n)
        else:  # an in-place op on a value nothing else reads: its functional form
            n.target = how
    program.graph_module.recompile()
    return True


def _functional_form(node):
    """``aten.add.Tensor`` for an ``aten.add_.Tensor`` node that mutates a fresh tensor (not a view, not an input)
    read by this node only: the capture already reads the mutated value through this node's output, so the
    functional op computes the same; else None."""
    schema = getattr(node.target, "_schema", None)
    name = schema.name if schema is not None else ""
    if not (name.startswith("aten::") and name.endswith("_") and node.args):
        return None
    src = node.args[0]
    if not (isinstance(src, torch.fx.Node) and src.op == "call_function" and len(src.users) == 1):
        return None
    returns = getattr(getattr(src.target, "_schema", None), "returns", None)
    if returns is None or any(r.alias_info is not None for r in returns):  # a view: the mutation reaches its base
        return None
    packet = getattr(torch.ops.aten, name[len("aten::"):-1], None)
    return getattr(packet, node.target._overloadname, None) if packet is not None else None


@contextlib.contextmanager
def _decompose_only_when_needed():
    """Within the block, the exporter skips its decomposition pass when the captured graph needs none
    (``_translatable_as_captured``: the CNNs of the zoo and their QAT deploy graphs). The pass traces the whole
    model a second time, with functionalization and a symbolic batch dimension: about half the export time
    (MobileNetV3-Small's QAT graph about 9 of 19 s); the ONNX graph is the same. Private API: where it is
    missing, nothing changes."""
    try:
        from torch.onnx._internal.exporter import _decomp, _fx_passes
        decompose = _fx_passes.decompose_with_registry
    except (ImportError, AttributeError):
        yield
        return

    def decompose_with_registry(program, registry):
        if _translatable_as_captured(program, set(_decomp.get_onnx_implemented_overloads(registry))):
            return program
        return decompose(program, registry)

    _fx_passes.decompose_with_registry = decompose_with_registry
    try:
        yield
    finally:
        _fx_passes.decompose_with_registry = decompose


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


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's graph passes (onnxscript, onnx_ir) log each rewrite at INFO, hundreds of lines per model;
    within the block only their warnings pass (the pipeline's own runs quiet them anyway, a search's speed probe
    and library callers did not)."""
    loggers = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int,
                extra_translations: dict[Callable, Callable] | None = None, single_trace: bool = True) -> None:
    """``torch.onnx.export`` (dynamo) with a dynamic batch dimension, then ``onnx.checker``. ``single_trace=False``
    always runs the exporter's decomposition pass (see ``_decompose_only_when_needed``)."""
    import onnx

    table = {torch.ops.aten.mean.dim: _mean_to_global_pool, **(extra_translations or {})}
    model = model.eval().cpu()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _torchlib_registry_built_once(), \
            _out_of_place(model), _quiet_exporter(), \
            (_decompose_only_when_needed() if single_trace else contextlib.nullcontext()):
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
