"""Empirical bias correction (Nagel et al. 2019; NNCF's fast bias correction): layer by layer in execution order,
the per-channel mean of the quantized model's layer output (before its activation) on the calibration images is
set to the float model's by adding the difference to the layer's bias (batch norm's shift where one is folded in).
Each layer is measured with the layers before it corrected already, all layers in one pass through the model
(``layers.walk``); the float model's means are read in one pass too."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.fx as fx

from pipeline.ptq.layers import (
    Layer,
    affordable,
    capture_inputs,
    channel_mean,
    float_mode,
    layers,
    preact,
    set_folded_bias,
    walk,
)


@torch.no_grad()
def float_means(ref: fx.GraphModule, images: Sequence[torch.Tensor], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per-channel mean output (before its activation) of each layer in ``names`` over ``images``, of ``ref`` in
    float: one forward pass per batch for all of them, read where the layer computes it (a layer called twice
    counts its first call)."""
    sums: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    n = 0

    def tap(name: str):
        def read(y: torch.Tensor) -> None:
            if name not in seen:
                seen.add(name)
                sums[name] = sums[name] + channel_mean(y) * len(y) if name in sums else channel_mean(y) * len(y)
        return read

    mods = [ref.get_submodule(name) for name in names]
    for name, m in zip(names, mods, strict=True):
        object.__setattr__(m, "tap", tap(name))
    try:
        with float_mode(ref):
            for xb in images:
                seen.clear()
                ref(xb)
                n += len(xb)
    finally:
        for m in mods:
            object.__setattr__(m, "tap", None)
    return {name: v / n for name, v in sums.items()}


@torch.no_grad()
def mean_error(gm: fx.GraphModule, name: str, images: Sequence[torch.Tensor], ref: fx.GraphModule,
               float_mean: torch.Tensor | None = None) -> torch.Tensor:
    """Per-channel mean of (float - quantized) output of layer ``name`` (before its activation) over ``images``:
    ``gm`` quantized against ``ref``, an unchanged copy of it, in float (or its ``float_means`` given)."""
    if float_mean is None:
        float_mean = float_means(ref, images, [name])[name]
    m = gm.get_submodule(name)
    total, n = None, 0
    for x in capture_inputs(gm, m, images):  # one batch at a time: memory of one layer output
        y = preact(m, x)
        d = channel_mean(y) * len(y)
        total = d if total is None else total + d
        n += len(y)
    return float_mean - total / n


def correct_biases(gm: fx.GraphModule, images: Sequence[torch.Tensor], progress: bool = False) -> dict:
    """Correct every quantized layer's bias on ``images`` (in place) against a copy of ``gm`` as it is now, in float;
    returns counts, the images used (the leading batches whose activations fit in half the free memory) and the
    largest mean error before correction."""
    from tqdm import tqdm

    gm.eval()
    ref = copy.deepcopy(gm)
    todo = layers(gm)
    images = affordable(gm, images)
    target = float_means(ref, images, [name for name, _ in todo])  # the float model's, once for every layer
    done, skipped, worst = 0, [], 0.0
    bar = tqdm(total=len(todo), desc="ptq: bias correction", disable=not progress, leave=False)

    @torch.no_grad()
    def visit(name: str, m: Layer, xs: list[torch.Tensor], _ref: object) -> None:
        nonlocal done, worst
        n = sum(len(x) for x in xs)
        err = target[name] - sum(channel_mean(preact(m, x)) * len(x) for x in xs) / n
        worst = max(worst, float(err.abs().max()))
        if set_folded_bias(m, err):
            done += 1
        else:
            skipped.append(name)
        bar.update()

    try:
        walk(gm, images, visit)
    finally:
        bar.close()
    return {"layers": done, "skipped_no_bias": skipped, "images": sum(len(x) for x in images),
            "max_mean_error_before": worst}
