"""Adaptive rounding of weights (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization"),
layer by layer in execution order (one pass through the model, ``layers.walk``): each weight rounds down or up (not
to the nearest), chosen by minimising the layer's output error against the float model on the calibration images.
The layer reads the quantized model's input (the layers before it rounded already) and is compared with the float
model's output of the same images; a rectified sigmoid per weight is annealed to 0 or 1. The result is written
back as the layer's weight, on the same per-channel grid (each channel's largest weight keeps its code, so the
scale stays). A layer whose adaptive rounding is not better than nearest rounding on the calibration images keeps
nearest rounding."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx

from pipeline.ptq.layers import (
    Layer,
    activation,
    affordable,
    apply,
    layers,
    preact,
    set_folded_weight,
    walk,
    weight_and_bias,
)
from pipeline.quant.spec import _weight_qparams

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch
REG_WEIGHT = 0.01  # weight of the rounding regulariser
BETA = (20.0, 2.0)  # the regulariser's exponent, annealed
WARMUP = 0.2  # share of the iterations without the regulariser
LR = 1e-2
BATCH = 32  # images per optimisation step


@dataclass
class LayerResult:
    name: str
    iters: int
    mse_nearest: float  # the layer's output error with nearest rounding
    mse_adaround: float  # with adaptive rounding (kept only where lower)


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def round_layer(m: Layer, x: torch.Tensor, target: torch.Tensor, iters: int, seconds: float,
                seed: int = 0) -> LayerResult:
    """Adaptive rounding of layer ``m`` from inputs ``x`` to float outputs ``target`` (after its activation),
    at most ``iters`` steps or ``seconds``; the rounded weights are written into ``m`` where they beat nearest
    rounding. ``name`` is left empty."""
    w, b = (t.detach() if t is not None else None for t in weight_and_bias(m))
    scale, _ = _weight_qparams(w, m.bits)
    qmax = 2 ** (m.bits - 1) - 1
    shape = (-1,) + (1,) * (w.dim() - 1)
    s = scale.reshape(shape)
    w_floor = torch.floor(w / s)
    rest = (w / s - w_floor).clamp(1e-4, 1 - 1e-4)
    v = torch.log((rest - GAMMA) / (ZETA - rest)).requires_grad_(True)  # _h(v) == rest
    peak = w.abs().reshape(len(w), -1).argmax(1)  # each channel's largest weight keeps its code (and the scale)

    def hard(q: torch.Tensor) -> torch.Tensor:
        q = q.clamp(-qmax, qmax).reshape(len(w), -1)
        q[torch.arange(len(w)), peak] = torch.sign(w.reshape(len(w), -1)[torch.arange(len(w)), peak]) * qmax
        return q.reshape(w.shape) * s

    def mse(wq: torch.Tensor) -> float:
        with torch.no_grad():
            return float(sum((activation(m, apply(m, x[i:i + 256], wq, b)) - target[i:i + 256]).pow(2).sum()
                             for i in range(0, len(x), 256)) / target.numel())

    nearest = hard(torch.round(w / s))
    err_nearest = mse(nearest)
    opt = torch.optim.Adam([v], lr=LR)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    start, it = time.perf_counter(), 0
    for it in range(1, iters + 1):
        idx = torch.randint(len(x), (min(BATCH, len(x)),), generator=gen).to(x.device)
        wq = s * torch.clamp(w_floor + _h(v), -qmax, qmax)
        out = activation(m, apply(m, x[idx], wq, b))
        loss = (out - target[idx]).pow(2).sum(1).mean()
        frac = it / iters
        if frac > WARMUP:
            beta = BETA[1] + (BETA[0] - BETA[1]) * (1 + math.cos(math.pi * (frac - WARMUP) / (1 - WARMUP))) / 2
            loss = loss + REG_WEIGHT * (1 - (2 * _h(v) - 1).abs().pow(beta)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if time.perf_counter() - start > seconds:
            break
    rounded = hard(w_floor + (v.detach() >= 0).to(w.dtype))
    err = mse(rounded)
    if err < err_nearest:
        set_folded_weight(m, rounded)
    return LayerResult("", it, err_nearest, min(err, err_nearest))


def adaround(gm: fx.GraphModule, images: Sequence[torch.Tensor], seconds: float, iters: int,
             progress: bool = False) -> list[LayerResult]:
    """Adaptive rounding of the quantized layers of ``gm`` (in place) against a copy of ``gm`` as it is now, in
    float, in ``seconds`` in all (shared evenly among the layers still to round), each at most ``iters`` steps.
    One pass through both models (``layers.walk``) gives each layer its inputs; that pass counts against the budget
    too: the layers left when it is spent keep nearest rounding and are not in the result."""
    from tqdm import tqdm

    deadline = time.perf_counter() + seconds
    gm.eval()
    ref = copy.deepcopy(gm)
    todo = layers(gm)
    images = affordable(gm, images, copies=2)
    out: list[LayerResult] = []
    bar = tqdm(total=len(todo), desc="ptq: adaround", disable=not progress, leave=False)

    def visit(name: str, m: Layer, xs: list[torch.Tensor], rxs: list[torch.Tensor] | None) -> bool:
        if time.perf_counter() >= deadline:
            return True
        m_ref = ref.get_submodule(name)
        with torch.no_grad():
            target = torch.cat([activation(m_ref, preact(m_ref, x, quantized=False)) for x in rxs or []])
        budget = max(0.0, deadline - time.perf_counter()) / (len(todo) - len(out))
        res = round_layer(m, torch.cat(xs), target, iters, budget, seed=len(out))
        res.name = name
        out.append(res)
        bar.update()
        return False

    try:
        walk(gm, images, visit, ref=ref)
    finally:
        bar.close()
    return out
