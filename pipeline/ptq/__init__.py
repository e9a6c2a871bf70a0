"""Post-training quantization without a training loop, on a prepared (``quant.prepare_qat``) model and unlabeled
images: cross-layer equalization and high-bias absorption (``equalize``), activation ranges by min/max, percentile
or MSE (``ranges``), adaptive rounding of weights layer by layer (``adaround``) and empirical bias correction
(``bias_correction``); ``run_ptq`` applies the chosen steps in that order."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from pipeline.ptq import fallback as fallback  # ptq.fallback.choose, .agreement
from pipeline.ptq.adaround import adaround
from pipeline.ptq.bias_correction import correct_biases
from pipeline.ptq.equalize import equalize
from pipeline.ptq.layers import layers
from pipeline.ptq.ranges import Method, set_ranges

STEPS = ("equalize", "bias_correction", "adaround")  # what ptq.steps may name
ORDER = ("equalize", "ranges", "adaround", "bias_correction")  # the order they run in (ranges always)


@dataclass
class PtqSettings:
    """The ``ptq.*`` settings the steps read (defaults in ``conf/stages/ptq.yaml``)."""

    steps: Sequence[str]  # of STEPS
    range: Method  # activation ranges: minmax | percentile | mse
    percentile: float  # range=percentile: the kept share of values, %
    bias_absorption: bool  # equalize: move biases behind ReLUs into the next conv
    adaround_seconds: float  # time budget of adaptive rounding, all layers together
    adaround_iters: int  # optimisation steps per layer at most
    adaround_images: int  # calibration images adaptive rounding uses (their activations are held in memory)


@dataclass
class PtqReport:
    steps: list[dict] = field(default_factory=list)  # {"step", "seconds", "test_acc"?, ...details}
    relu6_as_relu: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def run_ptq(gm: fx.GraphModule, images: Sequence[torch.Tensor], cfg: PtqSettings,
            evaluate: Callable[[fx.GraphModule], float] | None = None, progress: bool = False,
            log: Callable[[str], None] | None = None) -> PtqReport:
    """The chosen steps on the prepared model ``gm`` (in place) with the calibration ``images`` (batches on the
    model's device), in ``ORDER``; activation ranges are always set. ``evaluate`` (model -> accuracy) is called
    after each step for the report."""
    gm.eval()
    report = PtqReport()
    for step in ORDER:
        if step != "ranges" and step not in cfg.steps:
            continue
        t = time.perf_counter()
        info: dict = {}
        if step == "equalize":
            eq = equalize(gm, absorb=cfg.bias_absorption)
            report.relu6_as_relu = eq.relu6_as_relu
            info = {"pairs": eq.pairs, "absorbed": eq.absorbed, "relu6_as_relu": len(eq.relu6_as_relu),
                    "skipped": eq.skipped}
        elif step == "ranges":
            info = {"method": cfg.range, "observers": set_ranges(gm, images, cfg.range, cfg.percentile)}
        elif step == "adaround":
            n = 0
            few = []
            for xb in images:
                few.append(xb[: cfg.adaround_images - n])
                n += len(few[-1])
                if n >= cfg.adaround_images:
                    break
            res = adaround(gm, few, cfg.adaround_seconds, cfg.adaround_iters, progress)
            improved = [r for r in res if r.mse_adaround < r.mse_nearest]
            info = {"layers": len(res), "improved": len(improved), "images": n,
                    "layers_nearest": len(layers(gm)) - len(res),  # left when the time budget was spent
                    "mse_nearest": sum(r.mse_nearest for r in res), "mse_adaround": sum(r.mse_adaround for r in res),
                    "iters": sum(r.iters for r in res)}
        else:
            info = correct_biases(gm, images, progress)
        entry = {"step": step, "seconds": round(time.perf_counter() - t, 2), **info}
        if evaluate is not None and step != "equalize":  # equalized float weights carry no ranges yet
            entry["test_acc"] = evaluate(gm)
        report.steps.append(entry)
        if log is not None and info.get("layers_nearest"):
            log(f"adaround: the time budget (ptq.adaround_seconds={cfg.adaround_seconds:g}) was spent after "
                f"{info['layers']} layers; the other {info['layers_nearest']} keep nearest rounding (raise "
                "ptq.adaround_seconds to round them too)")
        if log is not None:
            log(f"{step}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in entry.items() if k != "step"))
    return report
