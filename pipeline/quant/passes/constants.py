"""Passes on what the model computes from its constants alone: a layer whose parameters the forward also reads, or
a module fx cannot trace, stays float; tensors that depend on no input stay float (exact, and ORT folds them); such
a constant expanded to the batch is computed at batch 1."""

from __future__ import annotations

import copy

import torch
import torch.fx as fx

from pipeline.quant.graph import _calls, _flat, _is_tensor
from pipeline.quant.tracer import _SHAPE_ATTRS, _SHAPE_METHODS


def _mark_float_modules(gm: fx.GraphModule, untraceable: dict[str, str]) -> None:
    """A layer whose parameters the forward code also reads (EdgeNeXt's positional encoding takes its conv's
    weight dtype) stays float: its quantized replacement has other parameters; so does a module fx cannot
    trace."""
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for node in gm.graph.nodes:
        if node.op == "call_module" and (node.target in untraceable or
                                         any(r.startswith(f"{node.target}.") for r in read)):
            node.meta["float"] = True


def _mark_constants(gm: fx.GraphModule) -> None:
    """Tensors the model computes from its parameters and buffers alone (at most expanded to the input's size)
    stay float: a gated positional attention's ``softmax(pos_proj(rel_indices))`` and its gates, a class token
    expanded to the batch. Quantized, such relative positions at 224 px (-13 to 338) shared one scale of 1.38,
    and offsets 1 and 2 became the same value; float, they are exact, and ONNX Runtime folds them into
    initializers where no input size enters. A quantized op reads them through a quantizer, as a parameter."""
    data: set[fx.Node] = set()  # nodes whose value depends on the input's values (not only on its size)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            data.add(node)
        elif (node.op == "call_method" and node.target in _SHAPE_METHODS) or \
                (node.op == "call_function" and node.target is getattr and node.args[1] in _SHAPE_ATTRS):
            continue  # x.size(0), x.shape: sizes, not data
        elif any(a in data for a in _flat((node.args, node.kwargs)) if isinstance(a, fx.Node)):
            data.add(node)
        elif node.op in ("call_module", "call_function", "call_method") and _is_tensor(node):
            node.meta["float"] = node.meta["constant"] = True


def _constants_at_batch_1(gm: fx.GraphModule, image_size: int) -> bool:
    """A constant expanded to the batch and computed on further (``pos_proj(rel_indices.expand(B, ...))``
    and a softmax) is computed at batch 1 and broadcast where it meets the input instead, so ONNX Runtime folds
    the chain into an initializer; it ran it on every call (10 float MatMuls of the batch's size in one such model).
    Kept as it was where that changes the model's outputs (checked on weights of its own, so a model rebuilt
    from a checkpoint, before its weights are loaded, gets the same graph). True if anything changed."""
    expands = [n for n in gm.graph.nodes if n.meta.get("constant") and _calls(n, set(), "expand") and n.users
               and isinstance(src := n.args[0], fx.Node) and (src.op == "get_attr" or src.meta.get("constant"))
               and all(u.meta.get("constant") for u in n.users)]
    if not expands:
        return False
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))

    def outputs() -> object:  # on weights of the check's own (a rebuilt model's may be uninitialised yet)
        probe, g = copy.deepcopy(gm), torch.Generator().manual_seed(2)
        with torch.no_grad():
            for t in (*probe.parameters(), *probe.buffers()):
                if t.is_floating_point():
                    t.uniform_(0.5, 1.5, generator=g)
            return probe(x)

    want = outputs()
    users = {n: list(n.users) for n in expands}
    for n in expands:
        n.replace_all_uses_with(n.args[0])
    gm.recompile()
    try:
        got = outputs()
        same = isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor) and got.shape == want.shape and \
            torch.allclose(got, want, rtol=1e-4, atol=1e-5 * (1.0 + want.abs().max().item()))
    except Exception:
        same = False
    for n in expands:
        if same:
            gm.graph.erase_node(n)
        else:
            for u in users[n]:
                u.replace_input_with(n.args[0], n)
    gm.recompile()
    return same
