"""The backend's entry points: ``prepare_qat`` (a float model through ``passes.PASSES``), ``load_quantized``,
``to_deploy`` (the export form), and what a prepared model reports (``quantized_layers``, ``float_ops``,
``activation_matmuls``)."""

from __future__ import annotations

import copy
import re

import torch.fx as fx
from torch import nn

from pipeline.errors import PipelineError
from pipeline.quant.graph import _behind_identities, _calls
from pipeline.quant.modules import DeployConv, NormGrad, QConvBn, QHardSwish, QLinear
from pipeline.quant.passes import PASSES, Context
from pipeline.quant.spec import ActQuant, QuantSpec, SharedQuant, act_quants
from pipeline.quant.target import _MATMUL


def prepare_qat(model: nn.Module, spec: QuantSpec, image_size: int = 32) -> fx.GraphModule:
    """Rewrite a float model into its QAT form (see the package docstring); raises on unknown layers.

    Layers named in ``spec.float_layers`` stay as they are (FP32 in ONNX Runtime); tensors crossing
    from them into the quantized part get an ``ActQuant`` for their quantized users only. The steps are
    ``passes.PASSES``, in order: trace, ops rewritten into ops ONNX Runtime has INT8 kernels for, conv (+ BN)
    (+ activation) fused into ``QConvBn`` / linears into ``QLinear``, every op classified, observers placed.
    """
    ctx = Context(model.cpu().eval(), spec, image_size)
    for step in PASSES:
        step(ctx)
    return ctx.gm


def float_ops(gm: fx.GraphModule) -> dict[str, list[str]]:
    """What stays float in a prepared model, by op type: {"Hardswish": [node names], ...}."""
    out: dict[str, list[str]] = {}
    for name, op, why in gm.meta.get("float_ops", []):
        out.setdefault(f"{op} ({why})", []).append(name)
    return out


def quantized_layers(model: nn.Module, calls: bool = False) -> list[str]:
    """Names of the convs/linears that run in INT8 (QAT or export form); a layer called in several places once,
    or (``calls``) once per call, as the ONNX graph has it."""
    names = [n for n, m in model.named_modules() if isinstance(m, (QConvBn, QLinear, DeployConv))]
    return names if calls else [n for n in names if not ((c := re.fullmatch(r"(.+)_call\d+", n)) and c[1] in names)]


def activation_matmuls(model: nn.Module) -> int:
    """Matmuls of two quantized activations (attention's q @ k^T and attn @ v): INT8 kernels in ORT
    (MatMulIntegerToFloat, QLinearMatMul) that are not layers."""
    graph = getattr(model, "graph", None)
    if graph is None:
        return 0

    def quantized(a) -> bool:
        a = _behind_identities(a, model) if isinstance(a, fx.Node) else a  # attn_drop(attn) @ v
        return isinstance(a, fx.Node) and a.op == "call_module" and \
            isinstance(model.get_submodule(a.target), (ActQuant, SharedQuant))

    return sum(1 for n in graph.nodes
               if _calls(n, _MATMUL, "matmul") and len(n.args) >= 2 and all(map(quantized, n.args[:2])))


def load_quantized(ckpt: dict, source: str, trusted_target: str | None) -> fx.GraphModule:
    """Rebuild a QAT model from a checkpoint: float model + shapes -> prepare_qat -> state dict."""
    from pipeline.artifacts import CKPT_EXTRA, CKPT_MODEL_CFG, CKPT_SHAPES, CKPT_STATE
    from pipeline.models import apply_shapes, build_model, check_trusted

    check_trusted(ckpt[CKPT_MODEL_CFG], trusted_target, source)
    spec = QuantSpec(**ckpt[CKPT_EXTRA]["quant"])
    model = apply_shapes(build_model(ckpt[CKPT_MODEL_CFG]), ckpt[CKPT_SHAPES])
    gm = prepare_qat(model, spec, ckpt[CKPT_MODEL_CFG].get("image_size", 32))
    try:
        gm.load_state_dict(ckpt[CKPT_STATE])
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise PipelineError(f"{source}: quantized checkpoint does not fit its model ({first}); a pipeline version "
                            "that quantized some layers differently wrote it: delete its folder to run qat again") \
            from None
    for a in act_quants(gm):
        a.enabled, a.observe = True, False
    return gm.eval()


def to_deploy(gm: fx.GraphModule) -> fx.GraphModule:
    """Export form of a QAT model: INT8 weight buffers and constant activation scales."""
    dep = copy.deepcopy(gm).eval()
    for node in list(dep.graph.nodes):  # the norms' gradient path: training only
        if node.op == "call_module" and isinstance(dep.get_submodule(node.target), NormGrad):
            quantized, unquantized = node.args
            node.replace_all_uses_with(quantized)
            dep.graph.erase_node(node)
            dep.graph.erase_node(unquantized)
            dep.delete_submodule(node.target)
    dep.recompile()
    for name, m in list(dep.named_modules()):
        if isinstance(m, (QConvBn, QLinear)):
            dep.add_submodule(name, DeployConv(m))
    for m in dep.modules():
        if isinstance(m, ActQuant):  # Python constants: baked into the graph as initializers
            m.export_mode, m.const_scale, m.const_zero_point = True, float(m.scale), int(m.zero_point)
        elif isinstance(m, QHardSwish):
            m.export_mode = True
    return dep
