"""Empirical bias correction (Nagel et al. 2019; NNCF's fast bias correction): layer by layer in execution order,
the per-channel mean of the quantized model's layer output (before its activation) on the calibration images is
set to the float model's by adding the difference to the layer's bias (batch norm's shift where one is folded in).
Each layer is measured with the layers before it corrected already."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.fx as fx

from pipeline.ptq.layers import capture_inputs, channel_mean, float_mode, layers, preact, set_folded_bias


@torch.no_grad()
def mean_error(gm: fx.GraphModule, name: str, images: Sequence[torch.Tensor], ref: fx.GraphModule) -> torch.Tensor:
    """Per-channel mean of (float - quantized) output of layer ``name`` (before its activation) over ``images``:
    ``gm`` quantized against ``ref``, an unchanged copy of it, in float."""
    m, m_ref = gm.get_submodule(name), ref.get_submodule(name)
    total, n = None, 0
    for xb in images:  # one batch at a time: memory of one layer output
        with float_mode(ref):
            y_f = [preact(m_ref, x, quantized=False) for x in capture_inputs(ref, m_ref, [xb])]
        y_q = [preact(m, x) for x in capture_inputs(gm, m, [xb])]
        for a, b in zip(y_f, y_q, strict=True):
            d = channel_mean(a - b) * len(a)
            total = d if total is None else total + d
            n += len(a)
    return total / n


def correct_biases(gm: fx.GraphModule, images: Sequence[torch.Tensor], progress: bool = False) -> dict:
    """Correct every quantized layer's bias on ``images`` (in place) against a copy of ``gm`` as it is now, in float;
    returns counts and the largest mean error before correction."""
    from tqdm import tqdm

    gm.eval()
    ref = copy.deepcopy(gm)
    done, skipped, worst = 0, [], 0.0
    for name, m in tqdm(layers(gm), desc="ptq: bias correction", disable=not progress, leave=False):
        err = mean_error(gm, name, images, ref)
        worst = max(worst, float(err.abs().max()))
        if set_folded_bias(m, err):
            done += 1
        else:
            skipped.append(name)
    return {"layers": done, "skipped_no_bias": skipped, "max_mean_error_before": worst}
