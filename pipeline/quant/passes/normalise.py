"""Passes that put the model and its traced graph into the forms the later passes know: layers that compute their
weights on every call as plain layers (on the model, before tracing), timm's BatchNormAct2d split, softmax modules
as calls, 'SAME' padding fixed for the input size, zero pads folded into their conv, ``F.conv2d`` with a fixed
filter and ``x @ w`` with a parameter as layers."""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from pipeline import families
from pipeline.models import inside, replace_module
from pipeline.quant.graph import _calls, _only_user
from pipeline.quant.modules import SamePadConv2d, _SamePadPool
from pipeline.quant.target import _MATMUL
from pipeline.quant.tracer import _NORM_ACT, _SAME


def plain_layers(model: nn.Module, float_layers: tuple[str, ...]) -> nn.Module:
    """A copy of ``model`` whose layers that compute their weights from other parameters on every call hold
    those weights instead, as BN folds into a conv (same outputs; QAT then fine-tunes the folded weights): the
    layers the families register (``pipeline.families.plain_layer``: weight-standardised convs, concatenated
    q / v biases) are folded their way. fx would trace that arithmetic and leave the conv or linear float.
    ``model`` itself when there is none."""
    rules = families.plain_layers()

    def rule(m: nn.Module) -> families.PlainLayer | None:
        return next((r for r in rules if r.matches(m)), None)

    names = [n for n, m in model.named_modules() if rule(m) is not None and not inside(n, float_layers)]
    if not names:
        return model
    model = copy.deepcopy(model)
    for name in names:
        mod = model.get_submodule(name)
        if (new := rule(mod).fold(mod)) is not None:
            replace_module(model, name, new)
    return model


def _split_norm_act(gm: fx.GraphModule) -> None:
    """timm's BatchNormAct2d -> a plain BatchNorm2d (same state dict keys) followed by its activation."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(mod := gm.get_submodule(node.target)).__name__ not in _NORM_ACT:
            continue
        bn = nn.BatchNorm2d(mod.num_features, mod.eps, mod.momentum, mod.affine, mod.track_running_stats)
        bn.load_state_dict(mod.state_dict(), strict=False)
        bn.train(mod.training)
        gm.add_submodule(node.target, bn)
        last = node
        for part in ("drop", "act"):
            sub_mod = getattr(mod, part, None)
            if sub_mod is None or isinstance(sub_mod, nn.Identity):
                continue
            name = f"{node.target.replace('.', '_')}_{part}"
            gm.add_submodule(name, sub_mod)
            with gm.graph.inserting_after(last):
                new = gm.graph.call_module(name, (last,))
            last.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)
            new.meta = dict(node.meta)
            last = new
    gm.recompile()


def _softmax_modules_as_calls(gm: fx.GraphModule) -> None:
    """``nn.Softmax`` modules (DaViT's, cosine attention's) -> ``F.softmax`` calls, which the rest treats as softmax."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(m := gm.get_submodule(node.target), nn.Softmax) and \
                m.dim is not None:
            with gm.graph.inserting_after(node):
                call = gm.graph.call_function(F.softmax, node.args[:1], {"dim": m.dim})
            node.replace_all_uses_with(call)
            gm.graph.erase_node(node)


def _static_same_padding(gm: fx.GraphModule) -> bool:
    """timm's 'SAME' convs and pools (padding computed from the input size on every call, which fx cannot
    trace) -> the same layer with the fixed padding of the input size this graph saw (state dict keys
    unchanged; the conv folds with its BN like any other). True if anything changed."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(mod := gm.get_submodule(node.target)).__name__ not in _SAME:
            continue
        k, st, dil = (tuple(v) if isinstance(v, (tuple, list)) else (v, v)
                      for v in (mod.kernel_size, mod.stride, getattr(mod, "dilation", 1)))
        if isinstance(mod, nn.Conv2d):
            k = tuple(mod.weight.shape[-2:])
        ph, pw = (max((-(-n // s_) - 1) * s_ + (k_ - 1) * d + 1 - n, 0)
                  for n, k_, s_, d in zip(node.args[0].meta["tensor_meta"].shape[-2:], k, st, dil, strict=True))
        pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
        if isinstance(mod, nn.Conv2d):
            new: nn.Module = SamePadConv2d(mod, pad)
        else:
            pool = nn.MaxPool2d(k, st, 0, dil, ceil_mode=mod.ceil_mode) if isinstance(mod, nn.MaxPool2d) else \
                nn.AvgPool2d(k, st, 0, ceil_mode=mod.ceil_mode, count_include_pad=True)
            new = _SamePadPool(pool, pad)
        new.train(mod.training)
        gm.add_submodule(node.target, new)
        changed = True
    if changed:
        gm.recompile()
    return changed


def _fold_zero_pads(gm: fx.GraphModule) -> bool:
    """A zero pad whose only user is a conv (HGNetV2's stem pads one row and column after) becomes part of that
    conv (``SamePadConv2d``), so ORT folds it into QLinearConv instead of running it float between DQ and Q.
    True if anything changed."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is F.pad and len(node.args) == 2 and \
                node.kwargs.get("mode", "constant") == "constant" and not node.kwargs.get("value"):
            pad = node.args[1]
        elif node.op == "call_module" and isinstance(m := gm.get_submodule(node.target), nn.ZeroPad2d):
            pad = m.padding
        else:
            continue
        conv = _only_user(node)
        if not (isinstance(pad, (tuple, list)) and len(pad) == 4 and all(isinstance(p, int) and p >= 0 for p in pad)
                and conv is not None and conv.op == "call_module" and conv.args[:1] == (node,)
                and type(mod := gm.get_submodule(conv.target)) in (nn.Conv2d, SamePadConv2d)
                and mod.padding_mode == "zeros" and not isinstance(mod.padding, str)):
            continue
        own = mod.same_pad if isinstance(mod, SamePadConv2d) else (mod.padding[1],) * 2 + (mod.padding[0],) * 2
        new = SamePadConv2d(mod, tuple(a + b for a, b in zip(pad, own, strict=True)))
        new.train(mod.training)
        gm.add_submodule(conv.target, new)
        conv.replace_input_with(node, node.args[0])
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.recompile()
    return changed


def _functional_convs(gm: fx.GraphModule) -> bool:
    """``F.conv2d(x, w, b, ...)`` with ``w`` (and ``b``) a parameter or buffer of the model (a fixed filter:
    anti-aliased downsampling) -> an ``nn.Conv2d`` holding them, which ``_fuse_convs`` then quantizes (a QLinearConv
    instead of a float Conv between DequantizeLinear and QuantizeLinear). True if anything changed."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (F.conv2d, torch.conv2d):
            continue
        a = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
        a.update(zip(("input", "weight", "bias", "stride", "padding", "dilation", "groups"), node.args, strict=False))
        a.update(node.kwargs)
        given = [t for t in (a.get("weight"), a["bias"]) if t is not None]
        if not (isinstance(a.get("weight"), fx.Node) and not isinstance(a["padding"], str) and
                all(isinstance(t, fx.Node) and t.op == "get_attr" for t in given)):
            continue
        weight, bias = (operator.attrgetter(t.target)(gm) if t is not None else None for t in (a["weight"], a["bias"]))
        if weight.dim() != 4:
            continue
        conv = nn.Conv2d(weight.shape[1] * a["groups"], weight.shape[0], tuple(weight.shape[2:]), a["stride"],
                         a["padding"], a["dilation"], a["groups"], bias=bias is not None)
        with torch.no_grad():
            conv.weight.copy_(weight)
            if bias is not None:
                conv.bias.copy_(bias)
        trained = any(isinstance(t, nn.Parameter) and t.requires_grad for t in (weight, bias))
        conv.requires_grad_(trained)  # a buffer (a fixed filter) stays fixed in QAT
        _call_instead(gm, node, conv, "conv", a["input"])
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return changed


def _call_instead(gm: fx.GraphModule, node: fx.Node, module: nn.Module, kind: str, x: fx.Node) -> None:
    """``node`` replaced by a call of ``module`` (registered as ``<node>_<kind>``) on ``x``."""
    name = f"{node.name}_{kind}"
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, (x,))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _parameter_matmuls(gm: fx.GraphModule) -> bool:
    """``x @ w`` with ``w`` a 2-D parameter of the model (SwiftFormer's attention weights) -> an ``nn.Linear``
    holding ``w.T``, which ``_fuse_convs`` then quantizes (a float MatMul between DequantizeLinear and
    QuantizeLinear before). True if anything changed."""
    changed = False
    for node in list(gm.graph.nodes):
        if not (_calls(node, _MATMUL, "matmul") and len(node.args) == 2 and
                isinstance(w := node.args[1], fx.Node) and w.op == "get_attr"):
            continue
        weight = operator.attrgetter(w.target)(gm)
        if not (isinstance(weight, nn.Parameter) and weight.dim() == 2):
            continue
        linear = nn.Linear(*weight.shape, bias=False)
        with torch.no_grad():
            linear.weight.copy_(weight.T)
        _call_instead(gm, node, linear, "linear", node.args[0])
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return changed
