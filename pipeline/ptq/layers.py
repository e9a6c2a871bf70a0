"""What the post-training steps share: the quantized layers of a prepared model in execution order, a float mode
of the same model (the reference the steps match), a layer's inputs captured on the calibration images, and its
output before the fused activation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from pipeline.quant import ActQuant, QConvBn, QLinear, fake_quant_weight, quantize_bias

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


def weight_and_bias(m: Layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's float weight and bias, batch norm folded in."""
    if isinstance(m, QConvBn):
        return m.folded()
    return m.linear.weight, m.linear.bias


def apply(m: Layer, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """The layer's output before its fused activation, with weight ``w`` and bias ``b``."""
    if isinstance(m, QConvBn):
        return m._conv(x, w, b)
    return F.linear(x, w, b)


def preact(m: Layer, x: torch.Tensor, quantized: bool = True) -> torch.Tensor:
    """The layer's output before its fused activation, as the quantized model (or its float form) computes it."""
    w, b = weight_and_bias(m)
    if not quantized:
        return apply(m, x, w, b)
    return apply(m, x, fake_quant_weight(w, m.bits), quantize_bias(b, w, m.bits, m.in_quant)[0])


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
