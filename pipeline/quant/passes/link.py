"""Passes after the quantizers are placed: a conv / linear called in several places gets a module per call, a
LayerNorm / GroupNorm on a quantized tensor its gradient from the unquantized one (``NormGrad``), and each conv /
linear learns which observer quantizes its input (its INT32 bias is on that scale)."""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from pipeline.quant.graph import _behind_identities
from pipeline.quant.modules import NormGrad, QConvBn, QLinear
from pipeline.quant.spec import ActQuant, SharedQuant


def _one_module_per_call(gm: fx.GraphModule) -> None:
    """A conv / linear called in several places (CoaT's shared position encodings) gets a module per call, with
    the same weights: its INT32 bias is quantized on the scale of its input, which differs between the calls."""
    seen: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(m := gm.get_submodule(node.target), (QConvBn, QLinear)):
            continue
        if node.target not in seen:
            seen.add(node.target)
            continue
        i = 2
        while f"{node.target}_call{i}" in seen:
            i += 1
        call = copy.copy(m)  # the same weights, BatchNorm and activation: only `in_quant` is its own
        call._parameters, call._buffers, call._modules = dict(m._parameters), dict(m._buffers), dict(m._modules)
        node.target = f"{node.target}_call{i}"
        seen.add(node.target)
        gm.add_submodule(node.target, call)


_NORM_FUNCS = {F.layer_norm, F.group_norm, torch.layer_norm, torch.group_norm}


def _norm_grads(gm: fx.GraphModule) -> None:
    """Each LayerNorm / GroupNorm reading a fake-quantized tensor also runs on the unquantized one, for its
    gradient only (``NormGrad``)."""
    count = 0
    for node in list(gm.graph.nodes):
        is_norm = (node.op == "call_function" and node.target in _NORM_FUNCS) or (
            node.op == "call_module" and isinstance(gm.get_submodule(node.target), (nn.LayerNorm, nn.GroupNorm)))
        src = node.args[0] if is_norm and node.args else None
        if not (isinstance(src, fx.Node) and src.op == "call_module" and
                isinstance(gm.get_submodule(src.target), (ActQuant, SharedQuant))):
            continue
        name = f"norm_grad_{count}"
        count += 1
        gm.add_submodule(name, NormGrad())
        with gm.graph.inserting_after(node):
            unquantized = gm.graph.create_node(node.op, node.target, (src.args[0], *node.args[1:]), node.kwargs)
        with gm.graph.inserting_after(unquantized):
            grad = gm.graph.call_module(name, (node, unquantized))
        node.replace_all_uses_with(grad, delete_user_cb=lambda u, g=grad: u is not g)


def _link_input_quants(gm: fx.GraphModule) -> None:
    """Tell each conv / linear which observer quantizes its input (its bias is quantized on that scale)."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(m := gm.get_submodule(node.target), (QConvBn, QLinear)):
            src = _behind_identities(node.args[0], gm)  # an eval-mode F.dropout keeps the quantized input
            aq = gm.get_submodule(src.target) if src.op == "call_module" else None
            if isinstance(aq, SharedQuant):
                aq = aq.source
            if isinstance(aq, ActQuant):
                object.__setattr__(m, "in_quant", aq)
