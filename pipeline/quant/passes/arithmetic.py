"""Passes that write arithmetic ONNX Runtime has no INT8 kernel for into ops it has: ``x ** 2`` as ``x * x``, a sum
over a short dimension as adds of slices, a stack as a concatenation, an ``expand`` before a broadcasting Add / Mul
dropped, Python numbers in Add / Mul / Div / Sub as constants with their own quantizer."""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import TensorMetadata

from pipeline.quant.graph import _calls
from pipeline.quant.target import _ADD, _MUL
from pipeline.quant.tracer import _shapes


def _square_as_mul(gm: fx.GraphModule, is_float: Callable[[fx.Node], bool]) -> None:
    """``x ** 2`` -> ``x * x`` (MetaFormer's StarReLU): QLinearMul instead of a float Pow."""
    graph = gm.graph
    for node in list(graph.nodes):
        squared = (_calls(node, {operator.pow, torch.pow}, "pow") and node.args[1:] in ((2,), (2.0,))) or \
            _calls(node, {torch.square}, "square")
        if squared and isinstance(node.args[0], fx.Node) and not node.kwargs and not is_float(node):
            with graph.inserting_after(node):
                mul = graph.call_function(operator.mul, (node.args[0], node.args[0]))
            mul.meta = dict(node.meta)
            node.replace_all_uses_with(mul)
            graph.erase_node(node)
    gm.recompile()


_MAX_SUM_TERMS = 4  # a sum over a dimension this short becomes adds (each add one QLinearAdd)


def _sums_to_adds(gm: fx.GraphModule, is_float: Callable[[fx.Node], bool], image_size: int) -> bool:
    """``torch.stack(xs, dim)`` -> ``torch.cat([x.unsqueeze(dim) ...], dim)``, and ``x.sum(dim)`` over a dimension
    of 2 to ``_MAX_SUM_TERMS`` -> ``x.unbind(dim)[0] + x.unbind(dim)[1] + ...`` (``split(1, dim)`` with
    ``keepdim``); returns whether any changed. Needs the shapes (``_shapes``)."""
    graph, changed = gm.graph, False
    for node in list(graph.nodes):  # torch.stack -> unsqueezes concatenated: QLinearConcat (multi-path branches)
        if node.op == "call_function" and node.target is torch.stack and not node.kwargs.keys() - {"dim"} and \
                isinstance(node.args[0], (list, tuple)) and all(isinstance(t, fx.Node) for t in node.args[0]) and \
                not is_float(node):
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            with graph.inserting_before(node):
                parts = [graph.call_method("unsqueeze", (t, dim)) for t in node.args[0]]
                cat = graph.call_function(torch.cat, (parts, dim))
            node.replace_all_uses_with(cat)
            graph.erase_node(node)
            changed = True
    gm.recompile()
    if changed:
        _shapes(gm, image_size)
    for node in list(graph.nodes):
        if not _calls(node, {torch.sum}, "sum") or is_float(node) or not isinstance(node.args[0], fx.Node):
            continue
        x, kw = node.args[0], dict(node.kwargs)
        dim = node.args[1] if len(node.args) > 1 else kw.pop("dim", None)
        keepdim = node.args[2] if len(node.args) > 2 else kw.pop("keepdim", False)
        meta = x.meta.get("tensor_meta")
        if isinstance(dim, (list, tuple)) and len(dim) == 1:
            dim = dim[0]
        if kw or not isinstance(dim, int) or not isinstance(meta, TensorMetadata) or not \
                meta.dtype.is_floating_point or not 2 <= meta.shape[dim] <= _MAX_SUM_TERMS:
            continue
        with graph.inserting_before(node):
            parts = graph.call_method("split", (x, 1, dim)) if keepdim else graph.call_method("unbind", (x, dim))
            out = graph.call_function(operator.getitem, (parts, 0))
            for i in range(1, meta.shape[dim]):
                out = graph.call_function(operator.add, (out, graph.call_function(operator.getitem, (parts, i))))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        changed = True
    gm.recompile()
    return changed


def _drop_broadcast_expands(gm: fx.GraphModule) -> bool:
    """``x * y.expand_as(x)`` -> ``x * y`` where the Add / Mul broadcasts to the same shape anyway (ECA's gate):
    a float Expand of a whole feature map between DequantizeLinear and QuantizeLinear saved. Needs the shapes."""
    changed = False
    for node in list(gm.graph.nodes):
        if not (node.op == "call_method" and node.target in ("expand_as", "expand")) or \
                not isinstance(src := node.args[0], fx.Node) or not node.users:
            continue
        shape = getattr(node.meta.get("tensor_meta"), "shape", None)
        ok = shape is not None
        for u in node.users:
            others = [a for a in u.args if a is not node]
            ok &= (_calls(u, _ADD, "add") or _calls(u, _MUL, "mul")) and not u.kwargs and len(u.args) == 2 and \
                len(others) == 1 and isinstance(others[0], fx.Node) and \
                getattr(others[0].meta.get("tensor_meta"), "shape", None) == shape
        if ok:
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            changed = True
    gm.recompile()
    return changed


def _scalar_operands(gm: fx.GraphModule, is_float: Callable[[fx.Node], bool]) -> bool:
    """``x * c``, ``x + c``, ``x / c`` and ``x - c`` with ``c`` a Python number -> ``x * t`` / ``x + t`` with ``t``
    a constant of the model (a buffer): then ``t`` gets its own quantizer where ``x`` is INT8 (as a parameter an
    Add / Mul reads does), so ORT runs QLinearMul / QLinearAdd; with ``c`` a float initializer it ran the op
    float between DequantizeLinear and QuantizeLinear (MobileNetV4's and EfficientViT-M's ``q * scale``).
    True if anything changed."""
    graph, changed, count = gm.graph, False, 0
    ops = {**dict.fromkeys(_ADD, "add"), **dict.fromkeys(_MUL, "mul"), operator.truediv: "div", operator.sub: "sub"}
    for node in list(graph.nodes):
        op = ops.get(node.target) if node.op == "call_function" else None
        if op is None or len(node.args) != 2 or node.kwargs or is_float(node):
            continue
        x, c = node.args
        if op in ("add", "mul") and isinstance(x, (int, float)):
            x, c = c, x  # c + x, c * x
        meta = x.meta.get("tensor_meta") if isinstance(x, fx.Node) else None
        if not (isinstance(c, (int, float)) and not isinstance(c, bool) and isinstance(meta, TensorMetadata)
                and meta.dtype.is_floating_point) or c == 0:  # a zero: no range to quantize on
            continue
        value = 1.0 / c if op == "div" else -c if op == "sub" else c
        while hasattr(gm, f"_scalar_{count}"):
            count += 1
        name = f"_scalar_{count}"
        gm.register_buffer(name, torch.tensor(float(value), dtype=meta.dtype), persistent=False)
        with graph.inserting_before(node):
            const = graph.get_attr(name)
            new = graph.call_function(operator.mul if op in ("mul", "div") else operator.add, (x, const))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        changed = True
    gm.recompile()
    return changed
