"""train: the FP32 baseline (and the teacher for distillation).

Reads: nothing (data + model config). Writes: ``model.pt`` (best validation weights),
``metrics.json`` (test accuracy, params, MACs, history, images/s).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pipeline.artifacts import save_checkpoint
from pipeline.models import build_model, count_macs, count_params
from pipeline.stage import Stage, StageContext
from pipeline.training import FitConfig, evaluate, fit, interrupt_message

log = logging.getLogger(__name__)


@dataclass
class Config(FitConfig):
    """``conf/stages/train.yaml``: only the shared optimisation knobs."""


def run(ctx: StageContext) -> dict:
    cfg: Config = ctx.settings
    splits = ctx.splits()
    model = build_model(ctx.model_cfg)
    with interrupt_message("training"):
        result = fit(model, splits, ctx.data_cfg, cfg, ctx.rt, ctx.work_dir, desc="train")
    test_acc = evaluate(model, splits.test_x, splits.test_y, ctx.data_cfg, ctx.rt)
    model = model.cpu()
    save_checkpoint(ctx.out_dir / "model.pt", model.state_dict(), ctx.model_cfg)
    log.info("train: test accuracy %.2f%%", test_acc)
    return {
        "test_acc": test_acc, "val_acc": result.best_val_acc,
        "params": count_params(model), "macs": count_macs(model, ctx.data_cfg.image_size),
        "train_images_per_s": result.images_per_s, "history": result.history, **result.resume_info(),
    }


STAGE = Stage(name="train", config=Config, run=run, outputs=("model.pt",), produces_model=True, trains=True)
