"""train: the FP32 baseline (and the teacher for distillation).

Reads: nothing (data + model config; ``model.weights`` are the starting weights, see
``pipeline.weights``). Writes: ``model.pt`` (best validation weights), ``metrics.json`` (test accuracy,
params, MACs, history, images/s). ``train.epochs=0`` takes the given weights as the baseline unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pipeline.artifacts import save_checkpoint
from pipeline.errors import PipelineError
from pipeline.models import ModelConfig, build_model, count_macs, count_params, module_shapes
from pipeline.stage import GraphView, Stage, StageContext
from pipeline.training import FitConfig, evaluate, fit, interrupt_message
from pipeline.weights import load_weights

log = logging.getLogger(__name__)


@dataclass
class Config(FitConfig):
    """``conf/stages/train.yaml``: only the shared optimisation knobs."""


def check(view: GraphView) -> list[str]:
    """Starting weights are found and fit the model before anything runs; ``train.epochs=0`` needs them."""
    if view.model.weights is None:
        if view.settings["train"].epochs == 0:
            return ["train.epochs=0 keeps the starting weights as the baseline, but model.weights is not set (the "
                    "baseline would be a randomly initialised model); give model.weights=<file or weights name>, "
                    "or train with train.epochs=<N >= 1>"]
        return []
    try:
        load_weights(build_model(view.model.__dict__), view.model, view.model.target)
    except PipelineError as e:
        return [str(e)]
    return []


def run(ctx: StageContext) -> dict:
    cfg: Config = ctx.settings
    splits = ctx.splits()
    model = build_model(ctx.model_cfg)
    mc = ModelConfig(**ctx.model_cfg)
    start = load_weights(model, mc, ctx.trusted_target) if mc.weights is not None else None
    shapes = module_shapes(model) if start and start["pruned"] else {}
    if start is not None and cfg.epochs == 0:
        log.info("train: train.epochs=0: the given weights are the baseline, evaluated and exported unchanged")
    with interrupt_message("training"):
        result = fit(model, splits, ctx.data_cfg, cfg, ctx.rt, ctx.work_dir, desc="train")
    test_acc = evaluate(model, splits.test_x, splits.test_y, ctx.data_cfg, ctx.rt)
    model = model.cpu()
    save_checkpoint(ctx.out_dir / "model.pt", model.state_dict(), ctx.model_cfg, shapes=shapes)
    log.info("train: test accuracy %.2f%%", test_acc)
    return {
        "test_acc": test_acc, "val_acc": result.best_val_acc,
        "params": count_params(model), "macs": count_macs(model, ctx.data_cfg.image_size),
        "train_images_per_s": result.images_per_s, "history": result.history, **result.resume_info(),
        **({"initial_weights": start} if start else {}),
    }


STAGE = Stage(name="train", config=Config, run=run, outputs=("model.pt",), produces_model=True, trains=True,
              check=check)
