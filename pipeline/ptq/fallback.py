"""Mixed-precision fallback without labels: the blocks whose quantization changes the model's output most on the
calibration images, to keep in FP32.

A candidate is a block of quantized layers (a module-path prefix such as ``features.3``: ONNX Runtime quantizes a
lone float conv between two quantized ones per tensor itself, so single layers are no deployable choice). Each
block in turn runs as it would in FP32 (float weights, and no quantizer on a tensor only the block reads), and
the drop in the KL divergence between the float model's and the quantized model's predictions ranks it. Blocks
interact (where one block's rounding ruins the output, the others' hardly matter until it is float), so the
choice is greedy: the best-ranked block switches to float, then every remaining block is tried again beside the
chosen ones and the one that lowers the KL divergence most is added, until the quantized model's top-1 agrees
with the float model's on the chosen share of the images, no block lowers it, or the budget is spent (about
``max_blocks`` times as many forward passes as blocks). Switching in place is the probe;
the caller rebuilds the model with the chosen blocks in FP32 (``QuantSpec.keeping_fp32``) and runs its steps
again, so what it reports is measured on the model it exports.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.models import inside
from pipeline.ptq.layers import Layer, float_mode, layers
from pipeline.quant import ActQuant


@dataclass
class Fallback:
    blocks: list[str] = field(default_factory=list)  # chosen for FP32, most sensitive first
    agreement_before: float = 0.0  # % of the images on which the quantized model's top-1 is the float model's
    agreement_probe: float = 0.0  # the same with the chosen blocks switched to float in place
    kl_before: float = 0.0  # mean KL(float || quantized) of the predictions
    ranking: list[tuple[str, float]] = field(default_factory=list)  # (block, KL drop when float alone), best first
    path: list[tuple[str, float]] = field(default_factory=list)  # (block switched, agreement % after it), in order


@torch.no_grad()
def _logits(gm: fx.GraphModule, images: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([gm(x).float() for x in images])


def _compare(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    """(mean KL(ref || out), top-1 agreement in %)."""
    kl = F.kl_div(F.log_softmax(out, 1), F.log_softmax(ref, 1), log_target=True, reduction="batchmean")
    return float(kl), 100.0 * float((ref.argmax(1) == out.argmax(1)).float().mean())


def agreement(gm: fx.GraphModule, images: Sequence[torch.Tensor]) -> float:
    """% of ``images`` on which quantized ``gm`` predicts the class its float mode predicts."""
    gm.eval()
    with float_mode(gm):
        ref = _logits(gm, images)
    return _compare(ref, _logits(gm, images))[1]


def _path(node: fx.Node) -> str:
    """The module path of the code that runs ``node`` ('' where unknown)."""
    if node.op == "call_module":
        return str(node.target)
    stack = list(node.meta.get("nn_module_stack") or {})
    return stack[-1].split("@")[0] if stack else ""


def _members(gm: fx.GraphModule, block: str) -> tuple[list[Layer], list[ActQuant]]:
    """The quantized layers of ``block`` and the activation quantizers whose every user lies inside it: what the
    model rebuilt with the block in FP32 no longer has (its inputs' and internal tensors' grids; the grid of an
    output that a quantized op outside reads stays)."""
    quantizers = []
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(q := gm.get_submodule(n.target), ActQuant) and q.observe and \
                n.users and all(inside(_path(u), (block,)) for u in n.users):
            quantizers.append(q)
    return [m for name, m in layers(gm) if inside(name, (block,))], quantizers


@contextlib.contextmanager
def _as_float(members: tuple[list[Layer], list[ActQuant]]) -> Iterator[None]:
    block_layers, quantizers = members
    was = [(q, q.enabled) for q in quantizers]
    for m in block_layers:
        m.quantize_weight = False
    for q in quantizers:
        q.enabled = False
    try:
        yield
    finally:
        for m in block_layers:
            m.quantize_weight = True
        for q, e in was:
            q.enabled = e


def choose(gm: fx.GraphModule, images: Sequence[torch.Tensor], blocks: Sequence[str], max_blocks: int,
           target: float, progress: bool = False) -> Fallback:
    """Rank ``blocks`` (module-path prefixes of the quantized layers of the calibrated ``gm``) by how much their
    quantization costs on ``images`` and pick at most ``max_blocks`` of them for FP32, stopping once the top-1
    agreement with the float model reaches ``target`` %. ``gm`` is left as it was."""
    gm.eval()
    with float_mode(gm):
        ref = _logits(gm, images)
    kl0, agree0 = _compare(ref, _logits(gm, images))
    res = Fallback(agreement_before=agree0, agreement_probe=agree0, kl_before=kl0)
    if agree0 >= target or max_blocks <= 0:
        return res
    members = {b: _members(gm, b) for b in blocks}

    def with_float(block: str) -> tuple[float, float]:  # (KL, agreement) with ``block`` also float
        with _as_float(members[block]):
            return _compare(ref, _logits(gm, images))

    scores = [(b, *with_float(b)) for b in tqdm(blocks, desc="ptq fallback: block sensitivity", unit="block",
                                                  disable=not progress, leave=False)]
    res.ranking = sorted(((b, kl0 - kl) for b, kl, _ in scores), key=lambda d: -d[1])
    kl_now = kl0
    with contextlib.ExitStack() as stack:
        while scores:
            block, kl, agree = min(scores, key=lambda s: s[1])
            if kl >= kl_now:  # no block left lowers the error
                break
            stack.enter_context(_as_float(members[block]))
            res.blocks.append(block)
            kl_now, res.agreement_probe = kl, agree
            res.path.append((block, agree))
            if agree >= target or len(res.blocks) >= max_blocks:
                break
            left = [b for b, *_ in scores if b != block]
            scores = [(b, *with_float(b)) for b in tqdm(left, desc=f"ptq fallback: block {len(res.blocks) + 1}",
                                                        unit="block", disable=not progress, leave=False)]
    return res
