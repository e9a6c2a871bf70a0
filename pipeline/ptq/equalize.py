"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization"): for a conv whose output reaches one other
conv through ReLU, ReLU6 or nothing, output channel i of the first is scaled by 1/s_i and input channel i of the
second by s_i, with s_i = sqrt(r1_i / r2_i) (r: the channel's weight range, batch norm folded in), so both layers'
per-channel weight ranges match and the function stays the same (ReLU is positively homogeneous). Depthwise convs
take part on either side. ReLU6 clips at a fixed 6, which scaling moves, so an equalized conv's ReLU6 runs as ReLU
(``QuantSpec.relu6_as_relu``, as AIMET does). High-bias absorption then moves the part of the first conv's bias
that the ReLU passes unchanged for almost every input (beta - 3 |gamma| of its batch norm) into the second conv's
bias. Pairs that do not fit (another activation, a residual branch, grouped convs) are skipped and counted."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from pipeline.ptq.layers import weight_and_bias
from pipeline.quant import ActQuant, FixedQuant, QConvBn

ROUNDS = 20  # passes over all pairs (a conv can sit in two pairs: as second of one, first of the next)
TOLERANCE = 1e-3  # stop when no scale moved further than this from 1


@dataclass
class Pair:
    first: str
    second: str
    a: QConvBn
    b: QConvBn


@dataclass
class EqualizeReport:
    pairs: int = 0  # conv pairs equalized
    relu6_as_relu: list[str] = field(default_factory=list)  # convs whose ReLU6 now runs as ReLU
    absorbed: int = 0  # pairs whose first conv's bias moved (partly) into the second
    skipped: dict[str, int] = field(default_factory=dict)  # why a conv starts no pair -> how many


def _op(gm: fx.GraphModule, n: fx.Node) -> str:
    if n.op == "call_module":
        return type(gm.get_submodule(n.target)).__name__
    return str(n.target if n.op == "call_method" else getattr(n.target, "__name__", n.target))


def _depthwise(c: nn.Conv2d) -> bool:
    return c.groups > 1 and c.groups == c.in_channels


def find_pairs(gm: fx.GraphModule) -> tuple[list[Pair], dict[str, int]]:
    """The conv -> (ReLU / ReLU6 / identity) -> conv pairs of a prepared model, and why the other convs start
    none (reason -> count)."""
    calls = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    pairs: list[Pair] = []
    skipped: collections.Counter[str] = collections.Counter()
    for n in gm.graph.nodes:
        if n.op != "call_module" or not isinstance(a := gm.get_submodule(n.target), QConvBn):
            continue
        why = None
        users = list(n.users)
        if a.conv.weight.dim() != 4 or a.shift or calls[n.target] > 1 or "_call" in str(n.target):
            why = "not a plain conv (1-D, a Hardsigmoid gate, or called twice)"
        elif len(users) != 1 or users[0].op != "call_module" or \
                not isinstance(q := gm.get_submodule(users[0].target), ActQuant) or isinstance(q, FixedQuant):
            why = "its output is not requantized once"
        elif len(nxt := list(users[0].users)) != 1:
            why = "its output feeds several ops (a residual or a branch)"
        elif nxt[0].op != "call_module" or not isinstance(b := gm.get_submodule(nxt[0].target), QConvBn):
            why = f"followed by {_op(gm, nxt[0])}, not a conv"
        elif b.conv.weight.dim() != 4 or calls[nxt[0].target] > 1 or "_call" in str(nxt[0].target) or \
                b.conv.in_channels != a.conv.out_channels:
            why = "the next conv is not a plain conv"
        elif b.conv.groups != 1 and not _depthwise(b.conv):
            why = "the next conv is grouped (not depthwise)"
        if why:
            skipped[why] += 1
        else:
            pairs.append(Pair(str(n.target), str(nxt[0].target), a, b))
    return pairs, dict(skipped)


def _in_channel_range(b: QConvBn) -> torch.Tensor:
    """Per input channel of ``b``: the largest |weight| (batch norm folded) reading it."""
    w = weight_and_bias(b)[0].detach().abs()
    if _depthwise(b.conv):
        return w.reshape(b.conv.in_channels, -1).amax(1)
    return w.transpose(0, 1).reshape(w.shape[1], -1).amax(1)


@torch.no_grad()
def _scale_out(a: QConvBn, s: torch.Tensor) -> None:
    """Output channel i of ``a`` divided by s_i (BN's scale and shift, or the conv's weight and bias)."""
    if a.bn is not None:
        a.bn.weight.div_(s)
        a.bn.bias.div_(s)
    else:
        a.conv.weight.div_(s.reshape(-1, 1, 1, 1))
        if a.conv.bias is not None:
            a.conv.bias.div_(s)


@torch.no_grad()
def _scale_in(b: QConvBn, s: torch.Tensor) -> None:
    """Input channel i of ``b`` multiplied by s_i."""
    w = b.conv.weight
    if _depthwise(b.conv):
        w.mul_(s.repeat_interleave(w.shape[0] // len(s)).reshape(-1, 1, 1, 1))
    else:
        w.mul_(s.reshape(1, -1, 1, 1))


@torch.no_grad()
def _absorb(p: Pair) -> bool:
    """High-bias absorption behind a ReLU: c = max(0, beta - 3 |gamma|) leaves the first conv's output and enters
    the second's (as a lower BN running mean, or its bias). Exact where the first output is >= c and away from the
    second conv's zero padding."""
    a, b = p.a, p.b
    if a.bn is None or not isinstance(a.act, nn.ReLU):
        return False
    c = torch.clamp(a.bn.bias - 3 * a.bn.weight.abs(), min=0)
    if not bool((c > 0).any()):
        return False
    w = b.conv.weight
    if _depthwise(b.conv):
        delta = w.sum((1, 2, 3)) * c.repeat_interleave(w.shape[0] // len(c))
    else:
        delta = torch.einsum("oikl,i->o", w, c)
    if b.bn is not None:
        b.bn.running_mean.sub_(delta)
    elif b.conv.bias is not None:
        b.conv.bias.add_(delta)
    else:
        return False
    a.bn.bias.sub_(c)
    return True


def equalize(gm: fx.GraphModule, absorb: bool = True) -> EqualizeReport:
    """Cross-layer equalization of every pair of ``gm`` (in place), then high-bias absorption where ``absorb``."""
    pairs, skipped = find_pairs(gm)
    report = EqualizeReport(pairs=len(pairs), skipped=skipped)
    for p in pairs:
        if isinstance(p.a.act, nn.ReLU6):
            p.a.act = nn.ReLU()
            report.relu6_as_relu.append(p.first)
    for _ in range(ROUNDS):
        moved = 0.0
        for p in pairs:
            r1 = weight_and_bias(p.a)[0].detach().abs().reshape(p.a.conv.out_channels, -1).amax(1)
            r2 = _in_channel_range(p.b)
            s = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2.clamp(min=1e-12)), torch.ones_like(r1))
            _scale_out(p.a, s)
            _scale_in(p.b, s)
            moved = max(moved, float((s.log().abs()).max()))
        if moved < TOLERANCE:
            break
    if absorb:
        report.absorbed = sum(_absorb(p) for p in pairs)
    return report
