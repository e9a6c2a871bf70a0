"""What the post-training steps share: the quantized layers of a prepared model in execution order, a float mode
of the same model (the reference the steps match), a layer's inputs captured on the calibration images, a walk
through the model that visits every layer with all the images' inputs in one pass, and a layer's output before the
fused activation."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from pipeline.data import available_memory
from pipeline.quant import ActQuant, QConvBn, QLinear

Layer = QConvBn | QLinear


def layers(gm: fx.GraphModule) -> list[tuple[str, Layer]]:
    """The quantized convs/linears of ``gm`` in execution order (each once)."""
    out, seen = [], set()
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(m := gm.get_submodule(n.target), (QConvBn, QLinear)) and \
                id(m) not in seen:
            seen.add(id(m))
            out.append((str(n.target), m))
    return out


@contextlib.contextmanager
def float_mode(gm: nn.Module) -> Iterator[None]:
    """``gm`` without fake quantization (float weights and activations, float biases): the float model it came
    from, with whatever the steps changed (equalized weights) in it."""
    qs = [m for m in gm.modules() if isinstance(m, ActQuant) and m.observe]  # FixedQuant gates keep their grid
    ls = [m for m in gm.modules() if isinstance(m, (QConvBn, QLinear))]
    before = [a.enabled for a in qs]
    for a in qs:
        a.enabled = False
    for m in ls:
        m.quantize_weight = False
    try:
        yield
    finally:
        for a, e in zip(qs, before, strict=True):
            a.enabled = e
        for m in ls:
            m.quantize_weight = True


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_inputs(gm: nn.Module, layer: nn.Module, images: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The input ``layer`` receives for each batch of ``images`` (the forward stops at the layer)."""
    got: list[torch.Tensor] = []

    def hook(_m, args):
        got.append(args[0].detach())
        raise _Stop

    handle = layer.register_forward_pre_hook(hook)
    try:
        for xb in images:
            got.clear()
            with contextlib.suppress(_Stop):
                gm(xb)
            if got:
                yield got[0]
    finally:
        handle.remove()


Visit = Callable[[str, "Layer", list[torch.Tensor], list[torch.Tensor] | None], bool | None]


def _value(gm: nn.Module, n: fx.Node, env: dict[fx.Node, object], x: torch.Tensor) -> object:
    """Node ``n`` of ``gm``'s graph evaluated on the values in ``env`` (``x``: the placeholder's)."""
    if n.op == "placeholder":
        return x
    args = fx.node.map_arg(n.args, env.__getitem__)
    kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
    if n.op == "get_attr":
        obj = gm
        for part in str(n.target).split("."):
            obj = getattr(obj, part)
        return obj
    if n.op == "call_module":
        return gm.get_submodule(str(n.target))(*args, **kwargs)
    if n.op == "call_function":
        return n.target(*args, **kwargs)
    if n.op == "call_method":
        return getattr(args[0], str(n.target))(*args[1:], **kwargs)
    raise ValueError(f"cannot evaluate node {n.name} ({n.op})")


def _plan(gm: fx.GraphModule) -> tuple[list[fx.Node], list[list[fx.Node]]]:
    """The graph's nodes in order (its output aside) and, for each, the values no later node reads."""
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    last = {a: i for i, n in enumerate(nodes) for a in n.all_input_nodes}
    dead: list[list[fx.Node]] = [[] for _ in nodes]
    for a, i in last.items():
        dead[i].append(a)
    return nodes, dead


def walk(gm: fx.GraphModule, images: Sequence[torch.Tensor], visit: Visit, ref: fx.GraphModule | None = None
         ) -> None:
    """One pass through ``gm`` over all ``images`` at once, node by node: before each quantized layer first runs,
    ``visit(name, layer, inputs, ref_inputs)`` gets its input for every batch (``ref_inputs``: those of ``ref``, a
    copy of ``gm``, run in float beside it; else None) and may change the layer, which then runs as changed. A layer
    thus sees the inputs the layers before it give after their visits, for the cost of one forward pass (not one
    per layer); the memory is the values alive at a point of the graph, for all images. ``visit`` runs with autograd
    on (adaptive rounding optimises in it); returning True ends the walk."""
    nodes, dead = _plan(gm)
    envs: list[dict] = [{} for _ in images]
    renvs: list[dict] | None = [{} for _ in images] if ref is not None else None
    seen: set[int] = set()
    with float_mode(ref) if ref is not None else contextlib.nullcontext():
        for i, n in enumerate(nodes):
            if n.op == "call_module" and isinstance(m := gm.get_submodule(str(n.target)), (QConvBn, QLinear)) and \
                    id(m) not in seen:
                seen.add(id(m))
                arg = n.args[0]
                xs = [env[arg] for env in envs]
                rxs = [env[arg] for env in renvs] if renvs is not None else None
                if visit(str(n.target), m, xs, rxs):
                    return
            with torch.no_grad():
                for env, x in zip(envs, images, strict=True):
                    env[n] = _value(gm, n, env, x)
                if renvs is not None:
                    for env, x in zip(renvs, images, strict=True):
                        env[n] = _value(ref, n, env, x)
            for env in envs + (renvs or []):  # free what no later node reads
                for a in dead[i]:
                    del env[a]


def _live_bytes(gm: fx.GraphModule, x: torch.Tensor) -> int:
    """The most bytes of values alive at once when ``walk`` runs ``gm`` on the one batch ``x``."""
    nodes, dead = _plan(gm)
    env: dict = {}
    peak = 0
    with torch.no_grad():
        for i, n in enumerate(nodes):
            env[n] = _value(gm, n, env, x)
            live = sum(v.numel() * v.element_size() for k, v in env.items()
                       if isinstance(v, torch.Tensor) and k.op != "get_attr")
            peak = max(peak, live)
            for a in dead[i]:
                del env[a]
    return peak


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_memory() or 8 << 30  # unknown: assume 8 GiB


def affordable(gm: fx.GraphModule, images: Sequence[torch.Tensor], copies: int = 1, share: float = 0.5
               ) -> list[torch.Tensor]:
    """The leading batches of ``images`` whose ``walk`` (``copies`` models side by side) keeps its live values
    within ``share`` of the free memory of their device (at least one batch)."""
    if not images:
        return []
    per_image = _live_bytes(gm, images[0]) / len(images[0]) * copies
    budget = _free_bytes(images[0].device) * share
    out, used = [], 0.0
    for xb in images:
        used += per_image * len(xb)
        if out and used > budget:
            break
        out.append(xb)
    return out


def weight_and_bias(m: Layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's float weight and bias, batch norm folded in."""
    return m.float_weights()


def apply(m: Layer, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The layer's output before its fused activation, with weight ``w`` and bias ``b``."""
    if isinstance(m, QConvBn):
        return m._conv(x, w, b)
    return F.linear(x, w, b)


def preact(m: Layer, x: torch.Tensor, quantized: bool = True) -> torch.Tensor:
    """The layer's output before its fused activation, as the quantized model (or its float form) computes it."""
    if not quantized:
        return apply(m, x, *weight_and_bias(m))
    return apply(m, x, *m.quantized())


def activation(m: Layer, y: torch.Tensor) -> torch.Tensor:
    act = getattr(m, "act", None)
    return act(y) if act is not None else y


def channel_mean(y: torch.Tensor) -> torch.Tensor:
    """Per-channel mean of a layer output (N, C, ...) or (N, ..., C) for linears over everything else."""
    return y.transpose(0, 1).reshape(y.shape[1], -1).mean(1) if y.dim() > 2 else y.mean(0)


def set_folded_bias(m: Layer, delta: torch.Tensor) -> bool:
    """Add ``delta`` to the layer's folded bias (BN's shift, or the conv/linear bias); False where the layer
    has no bias to carry it (adding one would change the checkpoint's keys)."""
    with torch.no_grad():
        if isinstance(m, QConvBn) and m.bn is not None:
            m.bn.bias.add_(delta)
        elif (b := (m.conv.bias if isinstance(m, QConvBn) else m.linear.bias)) is not None:
            b.add_(delta)
        else:
            return False
    return True


def set_folded_weight(m: Layer, w: torch.Tensor) -> None:
    """Make the layer's folded weight ``w`` (BN's scale divided out of the conv weight)."""
    with torch.no_grad():
        if isinstance(m, QConvBn):
            if m.bn is not None:
                sf = m.bn.weight / torch.sqrt(m.bn.running_var + m.bn.eps)
                sf = torch.where(sf == 0, torch.ones_like(sf), sf).reshape(-1, *([1] * (w.dim() - 1)))
                w = w / sf
            m.conv.weight.copy_(w)
        else:
            m.linear.weight.copy_(w)
