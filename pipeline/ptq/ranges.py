"""Activation ranges from the calibration images: min/max (the observers' own), a percentile of the values, or the
range whose fake quantization has the least mean squared error on them (a search over clipped min/max ranges)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from pipeline.quant import ActQuant, calibrate

Method = Literal["minmax", "percentile", "mse"]
SAMPLES_PER_CALL = 4096  # values kept from each tensor an observer sees
MAX_SAMPLES = 1 << 17  # values kept per observer
MSE_GRID = 64  # candidate clips, from 1/MSE_GRID of the min/max range up to all of it


def _observers(gm: nn.Module) -> list[ActQuant]:
    return [m for m in gm.modules() if isinstance(m, ActQuant) and m.observe]  # FixedQuant ranges are fixed


def _mse_range(a: ActQuant, v: torch.Tensor) -> tuple[float, float]:
    lo0, hi0 = min(float(a.min_val), 0.0), max(float(a.max_val), 0.0)
    best, best_err = (lo0, hi0), float("inf")
    for k in range(1, MSE_GRID + 1):
        f = k / MSE_GRID
        lo, hi = lo0 * f, hi0 * f
        if a.qmin == 0:
            scale = max((hi - lo) / 255.0, 1e-8)
            zp = int(min(max(round(-lo / scale), 0), 255))
        else:
            scale, zp = max(max(-lo, hi) / 127.0, 1e-8), 0
        err = float((torch.fake_quantize_per_tensor_affine(v, scale, zp, a.qmin, a.qmax) - v).pow(2).mean())
        if err < best_err:
            best, best_err = (lo, hi), err
    return best


@torch.no_grad()
def set_ranges(gm: nn.Module, images: Sequence[torch.Tensor], method: Method = "minmax",
               percentile: float = 99.99) -> int:
    """Calibrate ``gm``'s observers on ``images`` (min/max), then, for ``percentile`` / ``mse``, replace each range
    by that method's from a sample of the values the observer saw. Returns how many observers were set."""
    observers = _observers(gm)
    samples: dict[int, list[torch.Tensor]] = {id(a): [] for a in observers}
    handles = []
    if method != "minmax":
        def hook(a, args):
            x = args[0].detach().float().flatten()
            kept = samples[id(a)]
            if sum(len(t) for t in kept) < MAX_SAMPLES:
                idx = torch.randint(len(x), (min(len(x), SAMPLES_PER_CALL),), device=x.device)
                kept.append(x[idx].cpu())
        handles = [a.register_forward_pre_hook(hook) for a in observers]
    try:
        calibrate(gm, ((xb, None) for xb in images))
    finally:
        for h in handles:
            h.remove()
    if method == "minmax":
        return len(observers)
    for a in observers:
        if not samples[id(a)]:
            continue
        v = torch.cat(samples[id(a)])
        if method == "percentile":
            q = torch.quantile(v, torch.tensor([1 - percentile / 100, percentile / 100]))
            lo, hi = min(float(q[0]), 0.0), max(float(q[1]), 0.0)
            if float(a.min_val) >= 0:  # after a ReLU: keep 0 exact
                lo = 0.0
        else:
            lo, hi = _mse_range(a, v)
        a.set_range(lo, hi)
    return len(observers)
