"""Passes that write activations ONNX Runtime would run float into INT8 kernels: SiLU as ``x * sigmoid(x)``,
Hardswish / Hardsigmoid not folded into a conv as ``QHardSwish``."""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from pipeline.quant.graph import _is_hard
from pipeline.quant.modules import QHardSwish
from pipeline.quant.spec import QuantSpec


def _silu_as_sigmoid_mul(gm: fx.GraphModule, is_float: Callable[[fx.Node], bool]) -> None:
    """SiLU/Swish -> ``x * sigmoid(x)``: ORT runs both as INT8 kernels (QLinearSigmoid, QLinearMul), as its own
    quantizer does with the exported Sigmoid + Mul; left whole, SiLU would run float between DQ and Q."""
    graph = gm.graph
    for node in list(graph.nodes):
        is_silu = (node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.SiLU)) or \
                  (node.op == "call_function" and node.target is F.silu)
        if is_silu and not is_float(node):
            x = node.args[0]
            with graph.inserting_after(node):
                sig = graph.call_function(torch.sigmoid, (x,))
            with graph.inserting_after(sig):
                mul = graph.call_function(operator.mul, (x, sig))
            for n in (sig, mul):
                n.meta = dict(node.meta)
            node.replace_all_uses_with(mul)
            graph.erase_node(node)
    gm.recompile()


def _hard_activations(gm: fx.GraphModule, spec: QuantSpec, is_float: Callable[[fx.Node], bool]) -> None:
    """Hardswish / Hardsigmoid not folded into a conv -> ``QHardSwish`` (QLinearAdd + QLinearMul in ORT)."""
    graph = gm.graph
    for node in list(graph.nodes):
        hard = _is_hard(node, gm)
        if hard is None or is_float(node):
            continue
        q = QHardSwish(spec, gate_only=hard == "Hardsigmoid")
        if node.op == "call_module":
            gm.add_submodule(node.target, q)
        else:
            name = f"{node.name}_q"
            gm.add_submodule(name, q)
            with graph.inserting_after(node):
                new = graph.call_module(name, (node.args[0],))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
    gm.recompile()
