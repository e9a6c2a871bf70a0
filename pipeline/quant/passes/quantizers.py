"""Placement of the quantizers: every op classified by the tables of ``target`` (``_classify``), then an ``ActQuant``
(``FixedQuant`` for a fixed range, ``SharedQuant`` on a source's grid) after each op that needs one and at every
FP32 -> INT8 boundary (``_place_quants``)."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from pipeline.quant.graph import _calls, _flat, _is_act, _is_tensor, _only_user
from pipeline.quant.modules import QConvBn, QHardSwish, QLinear
from pipeline.quant.spec import ActQuant, FixedQuant, QuantSpec, SharedQuant
from pipeline.quant.target import (
    _ADD,
    _CAST_METHODS,
    _MATMUL,
    _MOVE_FUNCS,
    _MOVE_METHODS,
    _MOVE_MODULES,
    _MUL,
    _PASS_FUNCS,
    _PASS_METHODS,
    _PASS_MODULES,
    _SOFTMAX,
    _SPLIT_FUNCS,
    _SPLIT_METHODS,
    OpTable,
)

# what _classify says of each node: "input" (placeholder or parameter: quantized for its quantized users),
# "quant_after" (an ActQuant follows), "boundary" (an INT8 op whose output is quantized for its quantized users
# only: OpenVINO's convs), "shared" (on its source's grid: SharedQuant), "pass" (no quantizer: an identity, a
# shape, or its users take float), "float" (no INT8 kernel: runs float between DQ and Q)
_Kind = Literal["input", "quant_after", "boundary", "shared", "pass", "float"]


def _op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    return node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))


def _same_dtype(node: fx.Node) -> bool:
    src = node.args[0] if node.args else None
    return isinstance(src, fx.Node) and _is_tensor(node) and _is_tensor(src) and \
        node.meta["tensor_meta"].dtype == src.meta["tensor_meta"].dtype


def _sliced_from(node: fx.Node) -> fx.Node | None:
    """The tensor a getitem cuts from (``x[i]``, or ``x.chunk(...)[i]`` and the like), or a move reads."""
    src = node.args[0]
    if not isinstance(src, fx.Node):
        return None
    if (src.op == "call_method" and src.target in _SPLIT_METHODS) or \
            (src.op == "call_function" and src.target in _SPLIT_FUNCS):
        src = src.args[0]
    return src if isinstance(src, fx.Node) else None


def _moves(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Data movement only: the output holds input values (reshape, transpose, max pool, ...)."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _MOVE_MODULES)
    if node.op == "call_function" and node.target is F.pad:  # reflect / replicate: copies of input values
        return node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant") in ("reflect", "replicate")
    return (node.op == "call_method" and node.target in _MOVE_METHODS) or \
        (node.op == "call_function" and node.target in _MOVE_FUNCS)


def _classify(gm: fx.GraphModule, untraceable: dict[str, str], is_float: Callable[[fx.Node], bool],
              table: OpTable) -> tuple[dict[fx.Node, _Kind], list[tuple[str, str, str]]]:
    """Every op by the target runtime's ``table`` (``_Kind``), and the ops that stay float as (node, op, why)."""
    def on_grid(src: object) -> bool:  # quantized with a read-back of 1: a slice or move may share its quantizer
        return isinstance(src, fx.Node) and kind.get(src) in ("quant_after", "shared") and \
            src.meta.get("fixed_quant", (1.0, 1.0))[1] == 1.0

    kind: dict[fx.Node, _Kind] = {}
    float_ops: list[tuple[str, str, str]] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            kind[node] = "input"
        elif node.op == "get_attr" and _is_tensor(node) and node.meta["tensor_meta"].dtype.is_floating_point:
            kind[node] = "input"  # a parameter an op reads (layer scale, StarReLU's scale): quantized for it
        elif node.op not in ("call_module", "call_function", "call_method"):
            continue
        elif node.op == "call_module" and node.target in untraceable:
            kind[node] = "float"
            float_ops.append((node.name, _op_name(gm, node), "torch.fx cannot trace it"))
            continue
        elif is_float(node):
            kind[node] = "float"
            layer = node.op == "call_module" and isinstance(gm.get_submodule(node.target), (nn.Conv2d, nn.Linear))
            if node.meta.get("constant") and (layer or any(not u.meta.get("constant") for u in node.users)):
                float_ops.append((node.name, _op_name(gm, node), "input-independent: a constant of the model"))
            elif layer:
                float_ops.append((node.name, _op_name(gm, node), "qat.float_layers"))
            continue
        elif _moves(gm, node) and _is_tensor(node) and on_grid(node.args[0]):
            # a reshape, transpose or max pool of a quantized tensor keeps its grid (SharedQuant), as ORT's own
            # quantizer does: an own observer sees the fake-quantized values, whose range differs by up to half
            # a step, and ORT runs the op float between DQ and Q when the two scales differ (path gates' unsqueezes,
            # a softmax's 1/256 grid reshaped in ResNeSt)
            kind[node] = "shared"
        elif table.layer_output == "boundary" and _moves(gm, node):
            kind[node] = "pass"  # a reshape of a float tensor: quantized, if at all, before it
        elif node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, QConvBn):
                kind[node] = table.layer_output
            elif isinstance(mod, QHardSwish):  # the gate is quantized inside; x * gate needs its own
                kind[node] = "pass" if mod.gate_only else "quant_after"
                src = node.args[0]
                if src.op == "call_module" and isinstance(gm.get_submodule(src.target), QLinear):
                    kind[src] = "quant_after"  # QLinearAdd needs a quantized input (a head's Linear)
            elif isinstance(mod, QLinear):
                kind[node] = "pass" if table.layer_output == "quant_after" else "boundary"
            elif isinstance(mod, _PASS_MODULES):
                kind[node] = "pass"
            elif isinstance(mod, table.quant_after_modules):
                kind[node] = "quant_after"
            else:
                kind[node] = "float"
        elif node.target is operator.getitem and _is_tensor(node) and on_grid(_sliced_from(node)):
            kind[node] = "shared"  # a slice of a quantized tensor keeps its scale (SharedQuant)
        elif node.target in (_PASS_FUNCS if node.op == "call_function" else _PASS_METHODS) or \
                (node.op == "call_method" and node.target in _CAST_METHODS and _same_dtype(node)):
            kind[node] = "pass"
        elif node.target in (table.quantized_input_funcs if node.op == "call_function" else
                             table.quantized_input_methods):
            kind[node] = "boundary"
        elif node.target in (table.quant_after_funcs if node.op == "call_function" else table.quant_after_methods):
            kind[node] = "quant_after"
            if node.target in _ADD and _is_act(_only_user(node), gm):
                kind[node] = "pass"  # quantize after the activation that follows the add
            if _calls(node, _SOFTMAX, "softmax"):
                node.meta["fixed_quant"] = (255 / 256, 1.0)  # [0, 1) in steps of 1/256, as ORT's QLinearSoftmax
        else:
            kind[node] = "float"
        if kind.get(node) in ("quant_after", "input", "boundary") and not _is_tensor(node):
            kind[node] = "pass"  # shapes and tuples (x.shape, chunk) are not quantized
        if kind[node] == "float" and _is_tensor(node):
            float_ops.append((node.name, _op_name(gm, node), table.float_why))
    _no_quantizer_before_float(kind)
    return kind, float_ops


def _no_quantizer_before_float(kind: dict[fx.Node, _Kind]) -> None:
    """An op whose users all take float inputs is not quantized after (``pass``). Softmax takes float inputs (ORT's
    QLinearSoftmax is several times slower than its float Softmax): attention scores (q @ k^T into the softmax or
    into a float position bias) come out float from MatMulIntegerToFloat, an INT8 kernel all the same."""
    takes_float = {n for n in kind if (kind[n] == "float" and _is_tensor(n)) or _calls(n, _SOFTMAX, "softmax")}
    for node in reversed(list(kind)):
        if kind[node] == "quant_after" and node.op != "call_module" and node.users and \
                all(u in takes_float for u in node.users):
            kind[node] = "pass"
            if not _calls(node, _MATMUL, "matmul"):  # a matmul still takes INT8 inputs
                takes_float.add(node)


_INPLACE_FUNCS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, torch.relu_}


def _writes_into(user: fx.Node, node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``user`` writes into ``node``'s tensor in place (``x.mul_(2)``, ``x[i] = y``, ``ReLU(inplace=True)``)."""
    if not user.args or user.args[0] is not node:
        return False
    if user.op == "call_method":
        return user.target.endswith("_") and not user.target.startswith("_")
    if user.op == "call_function":
        return user.target in _INPLACE_FUNCS or user.kwargs.get("inplace") is True
    return user.op == "call_module" and getattr(gm.get_submodule(user.target), "inplace", False) is True


def _place_quants(gm: fx.GraphModule, kind: dict[fx.Node, _Kind], spec: QuantSpec) -> None:
    """An ``ActQuant`` (``FixedQuant`` for a fixed range) after every "quant_after" node, a ``SharedQuant`` of
    its source's after every "shared" one, and one for the quantized users of every float or input tensor
    (the FP32 -> INT8 boundary)."""
    graph = gm.graph
    count = 0

    def quantized(a: object) -> bool:  # a tensor that reaches its users through an ActQuant (placed or to come)
        while isinstance(a, fx.Node) and kind.get(a) == "pass" and a.args and (  # identities, dropout, casts
                a.op != "call_module" or isinstance(gm.get_submodule(a.target), _PASS_MODULES)):
            a = a.args[0]
        return isinstance(a, fx.Node) and (kind.get(a) in ("quant_after", "shared", "input") or (
            a.op == "call_module" and isinstance(gm.get_submodule(a.target), (ActQuant, SharedQuant))))

    def insert_after(node: fx.Node, only_quantized_users: bool = False, module: nn.Module | None = None) -> None:
        nonlocal count
        users = [u for u in node.users
                 if not (only_quantized_users and (kind.get(u) == "float" or u.op == "output" or
                                                   _calls(u, _SOFTMAX, "softmax")))]
        if node.op == "get_attr":  # a parameter into an Add / Mul whose other input is INT8: QLinearAdd / QLinearMul
            users = [u for u in users if (_calls(u, _ADD, "add") or _calls(u, _MUL, "mul")) and
                     kind.get(u) == "quant_after" and
                     all(quantized(a) for a in _flat(u.args) if isinstance(a, fx.Node) and a is not node)]
        writes = [u for u in node.users if _writes_into(u, node, gm)]
        order = {n: i for i, n in enumerate(graph.nodes)} if writes else {}
        # an in-place write that other users follow (not `x = act_(x)`, the last use) writes the unquantized
        # tensor, and the users after it read the written one through a quantizer placed after the write
        writes = [w for w in writes if any(order[u] > order[w] for u in node.users)]
        users = [u for u in users if u not in writes]
        if not users:
            return
        fixed = node.meta.get("fixed_quant")
        first = module or (FixedQuant(spec, *fixed) if fixed else ActQuant(spec))
        points = [node, *sorted(writes, key=order.get)]
        for i, point in enumerate(points):
            last = order[points[i + 1]] if i + 1 < len(points) else math.inf
            part = [u for u in users if not writes or order[point] < order[u] < last]
            if not part:
                continue
            name = f"act_quant_{count}"
            count += 1
            gm.add_submodule(name, first if point is node else ActQuant(spec))
            with graph.inserting_after(point):
                q = graph.call_module(name, (node,))
            for u in part:
                u.replace_input_with(node, q)

    for node, k in list(kind.items()):
        if k == "quant_after":
            insert_after(node)
        elif k == "shared":  # its source's ActQuant is in place by now (sources come first)
            source = gm.get_submodule(_sliced_from(node).target)
            insert_after(node, module=SharedQuant(source.source if isinstance(source, SharedQuant) else source))
        elif k in ("float", "input", "boundary") and _is_tensor(node):
            insert_after(node, only_quantized_users=True)  # FP32 -> INT8 boundary
