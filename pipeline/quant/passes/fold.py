"""Passes that fold and fuse layers into the QAT modules: a BatchNorm1d into the linear layer before or after it,
conv (+ BN) (+ activation) into ``QConvBn``, linears into ``QLinear``, a BatchNorm after no conv into a depthwise
``QConvBn``."""

from __future__ import annotations

import collections
from collections.abc import Callable

import torch
import torch.fx as fx
from torch import nn

from pipeline.quant.graph import _is_act, _is_hard, _only_user
from pipeline.quant.modules import QConvBn, QLinear
from pipeline.quant.spec import QuantSpec
from pipeline.quant.tracer import _SHAPE_METHODS

_RESHAPES = {"flatten", "reshape", "view", "contiguous"}  # keep the last dimension when it keeps its size


def _one_data_user(node: fx.Node) -> fx.Node | None:
    """The one user of ``node`` that reads its values; others may read its size only
    (``bn(x.flatten(0, 1)).reshape_as(x)``)."""
    data = [u for u in node.users if not (u.op == "call_method" and (
        u.target in _SHAPE_METHODS or (u.target in ("reshape_as", "view_as", "expand_as") and u.args[0] is not node)))]
    return data[0] if len(data) == 1 else None


def _linear_batchnorms(gm: fx.GraphModule, is_float: Callable[[fx.Node], bool]) -> bool:
    """A BatchNorm1d over a linear layer's output features (``bn(linear(x).flatten(0, 1))``) or over its
    input features (hybrid ViTs' heads: ``linear(drop(bn(x)))``) folds into that linear layer,
    as a BN folds into a conv: one INT8 kernel instead of a float BatchNormalization between DequantizeLinear
    and QuantizeLinear. The folded layer is a new module (the float model keeps its own); QAT fine-tunes it with
    the statistics frozen. True if anything changed."""
    graph, changed = gm.graph, False
    calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")

    def linear(n: object) -> nn.Linear | None:  # a linear layer called here only
        ok = isinstance(n, fx.Node) and n.op == "call_module" and calls[n.target] == 1 and not is_float(n)
        return m if ok and type(m := gm.get_submodule(n.target)) is nn.Linear else None

    def replace(n: fx.Node, weight: torch.Tensor, bias: torch.Tensor) -> None:
        new = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            new.weight.copy_(weight)
            new.bias.copy_(bias)
        gm.add_submodule(n.target, new)

    for node in list(graph.nodes):
        if node.op != "call_module" or is_float(node) or type(bn := gm.get_submodule(node.target)) is not \
                nn.BatchNorm1d or bn.running_mean is None or not isinstance(node.args[0], fx.Node):
            continue
        shape = getattr(node.args[0].meta.get("tensor_meta"), "shape", None)
        if shape is None or len(shape) != 2:  # (N, C): the features are the last dimension
            continue
        with torch.no_grad():
            scale = torch.rsqrt(bn.running_var + bn.eps) * (bn.weight if bn.affine else 1.0)
            shift = (bn.bias if bn.affine else 0.0) - bn.running_mean * scale
        src, nxt = node.args[0], node  # after a linear layer, through reshapes that keep its features last
        while src.op == "call_method" and src.target in _RESHAPES and _one_data_user(src) is nxt and \
                isinstance(src.args[0], fx.Node) and \
                getattr(src.args[0].meta.get("tensor_meta"), "shape", [None])[-1] == shape[-1]:
            src, nxt = src.args[0], src
        after = linear(src) if _one_data_user(src) is nxt else None
        before = []  # or before linear layers, through dropouts
        for u in node.users:
            while u.op == "call_module" and isinstance(gm.get_submodule(u.target), (nn.Dropout, nn.Identity)) and \
                    len(u.users) == 1:
                u = next(iter(u.users))
            before.append((u, linear(u)))
        with torch.no_grad():
            if after is not None and after.out_features == shape[-1]:
                b = after.bias if after.bias is not None else torch.zeros_like(shift)
                replace(src, after.weight * scale[:, None], b * scale + shift)
            elif before and all(m is not None and m.in_features == shape[-1] for _, m in before):
                for u, m in before:
                    b = m.bias if m.bias is not None else torch.zeros(m.out_features)
                    replace(u, m.weight * scale[None, :], b + m.weight @ shift)
            else:
                continue
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
        changed = True
    if changed:
        gm.recompile()
    return changed


def _fuse_convs(gm: fx.GraphModule, spec: QuantSpec, is_float: Callable[[fx.Node], bool],
                gate_in_scale: bool = True) -> None:
    """conv (+ BN) (+ ReLU / ReLU6 / a Hardsigmoid gate) -> ``QConvBn``; Conv1d -> ``QConvBn`` (no BN folding);
    linear -> ``QLinear``. A conv in ``float_layers`` keeps its BN and activation FP32 with it.

    A Hardsigmoid gate folds in only with ``gate_in_scale``: its /6 lives in the scale of the quantizer after the
    conv, so a target that leaves the conv's output unquantized (OpenVINO, where the gate's Mul runs float) keeps
    the Hardsigmoid as its own op."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.Conv1d) and isinstance(mod.padding, tuple) and not is_float(node):
            gm.add_submodule(node.target, QConvBn(mod, None, None, spec))  # no BN folding in 1-D
        elif isinstance(mod, nn.Conv2d):
            last, bn, act = node, None, None
            nxt = _only_user(last)
            if nxt is not None and nxt.op == "call_module" and isinstance(gm.get_submodule(nxt.target), nn.BatchNorm2d):
                bn, last = gm.get_submodule(nxt.target), nxt
                nxt = _only_user(last)
            shift = 0.0
            if _is_act(nxt, gm):
                act = gm.get_submodule(nxt.target) if nxt.op == "call_module" else nn.ReLU()
                if isinstance(act, nn.ReLU6) and str(node.target) in spec.relu6_as_relu:
                    act = nn.ReLU()
                last = nxt
            elif gate_in_scale and _is_hard(nxt, gm) == "Hardsigmoid" and not is_float(node):
                act, shift, last = nn.ReLU6(), 3.0, nxt  # ReLU6(y + 3) / 6: the 3 in the bias, /6 in the scale
                node.meta["fixed_quant"] = (6.0, 1.0 / 6.0)
            if is_float(node):  # its BN and activation stay FP32 with it
                cur = last
                while cur is not node:
                    cur.meta["float"] = True
                    cur = cur.args[0]
                continue
            q = QConvBn(mod, bn, act, spec, shift)
            gm.add_submodule(node.target, q)
            if last is not node:
                last.replace_all_uses_with(node)
                cur = last
                while cur is not node:  # erase the absorbed bn / act nodes
                    prev = cur.args[0]
                    graph.erase_node(cur)
                    cur = prev
        elif isinstance(mod, nn.Linear) and not is_float(node):
            gm.add_submodule(node.target, QLinear(mod, spec))
    gm.recompile()


def _lone_batchnorms(gm: fx.GraphModule, spec: QuantSpec, is_float: Callable[[fx.Node], bool]) -> None:
    """A BatchNorm that follows no conv (DenseNet's pre-activation BN -> ReLU) -> a depthwise 1x1 ``QConvBn``
    (unit weights, the BN folded in, the ReLU fused): one QLinearConv instead of float BN between DQ and Q."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(bn := gm.get_submodule(node.target), nn.BatchNorm2d) \
                or is_float(node):
            continue
        conv = nn.Conv2d(bn.num_features, bn.num_features, 1, groups=bn.num_features, bias=False)
        nn.init.ones_(conv.weight)
        conv.weight.requires_grad_(False)
        act, nxt = None, _only_user(node)
        if _is_act(nxt, gm):
            act = gm.get_submodule(nxt.target) if nxt.op == "call_module" else nn.ReLU()
            nxt.replace_all_uses_with(node)
            graph.erase_node(nxt)
        gm.add_submodule(node.target, QConvBn(conv, bn, act, spec))
    gm.recompile()
