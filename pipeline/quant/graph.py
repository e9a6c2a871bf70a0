"""Small questions about the nodes of a traced graph, shared by the tracer, the passes and the reports."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata

from pipeline.models import inside
from pipeline.quant.target import _ACTS, _IDENTITY_FUNCS, _PASS_MODULES


def _calls(node: fx.Node, funcs: set, method: str) -> bool:
    """Whether ``node`` calls one of ``funcs`` or the tensor method ``method`` (``torch.matmul`` / ``x.matmul``)."""
    return (node.op == "call_function" and node.target in funcs) or (node.op == "call_method" and node.target == method)


def _flat(a) -> list:
    out: list = []
    fx.node.map_aggregate(a, out.append)
    return out


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("tensor_meta"), TensorMetadata)


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_act(node: fx.Node | None, gm: fx.GraphModule) -> bool:
    if node is None:
        return False
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _ACTS)
    return node.op == "call_function" and node.target in (F.relu, torch.relu)


def _is_hard(node: fx.Node | None, gm: fx.GraphModule) -> str | None:
    """"Hardswish" / "Hardsigmoid" for those activations (module or function), else None."""
    if node is None:
        return None
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return "Hardswish" if isinstance(mod, nn.Hardswish) else "Hardsigmoid" if isinstance(mod, nn.Hardsigmoid) \
            else None
    if node.op == "call_function":
        return {F.hardswish: "Hardswish", F.hardsigmoid: "Hardsigmoid"}.get(node.target)
    return None


def _behind_identities(node: fx.Node, gm: fx.GraphModule) -> fx.Node:
    """The tensor ``node`` passes on unchanged in the exported graph: through Dropout / Identity modules and
    ``F.dropout`` calls."""
    while (node.op == "call_module" and isinstance(gm.get_submodule(node.target), _PASS_MODULES)) or \
            (node.op == "call_function" and node.target in _IDENTITY_FUNCS):
        node = node.args[0]
    return node


def _float_test(prefixes: tuple[str, ...]):
    """node -> True when it lies inside one of the modules named in ``prefixes`` (kept in FP32)."""

    def is_float(node: fx.Node) -> bool:
        if node.meta.get("float"):
            return True
        names = list(node.meta.get("nn_module_stack", {}))
        if node.op == "call_module":
            names.append(str(node.target))
        return any(inside(n, prefixes) for n in names)

    return is_float
