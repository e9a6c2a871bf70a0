"""distill: knowledge distillation from the teacher (the baseline) into a student.

Reads: ``train`` (teacher, unless ``distill.teacher`` is a checkpoint path) and the student: the
``prune`` stage's model (``distill.student=prune``), the baseline itself (``train``), or a fresh
registry model (e.g. ``resnet8``). Writes: ``model.pt``, ``metrics.json``.

Loss: ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE`` (Hinton et al., 2015), plus
optional feature distillation on chosen layers through 1x1 adapters (``pipeline.distillation``).
With ``distill.compare_no_kd=true`` the same student is also trained with plain cross-entropy
(same epochs, same seed), so the benefit of KD is measured, not assumed.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.artifacts import CKPT_SHAPES, file_sha256, load_checkpoint, save_checkpoint
from pipeline.config import SEED_MAX, setting
from pipeline.distillation import KDLoss, freeze_teacher, parse_feature_pairs
from pipeline.errors import PipelineError
from pipeline.models import available_models, build_model, count_macs, count_params, load_model, module_shapes
from pipeline.stage import GraphView, Stage, StageContext
from pipeline.training import FitConfig, evaluate, fit, interrupt_message

log = logging.getLogger(__name__)

STUDENT_STAGES = ("prune", "train")  # distill.student values that name a stage's model


@dataclass
class Config(FitConfig):
    """``conf/stages/distill.yaml``; FitConfig fields train the student."""

    teacher: str | None  # null: the train stage's baseline; or a path to a pipeline checkpoint
    student: str  # "prune" / "train": that stage's model; or a registry model name (e.g. resnet8)
    student_width: float  # width of a registry student (CIFAR ResNets)
    alpha: float = setting(ge=0, le=1)  # weight of the KD term (1 - alpha for cross-entropy)
    temperature: float = setting(gt=0)
    feature_layers: list[str]  # "student_layer[:teacher_layer]" pairs
    feature_weight: float = setting(ge=0)  # weight of the feature (MSE through 1x1 adapter) loss
    compare_no_kd: bool  # also train the student without KD and record both accuracies
    # seed of the student's training (shuffle, augmentation, registry init); null: root seed
    seed: int | None = setting(ge=0, le=SEED_MAX)


def inputs(view: GraphView, node: str) -> dict[str, str]:
    cfg: Config = view.settings["distill"]
    out = {}
    if cfg.teacher is None:
        out["teacher"] = "train"
    if cfg.student in STUDENT_STAGES:
        out["student"] = cfg.student
    return out


def _student_cfg(model_cfg: dict, cfg: Config) -> dict:
    return {**model_cfg, "name": cfg.student, "target": None, "width": cfg.student_width}


def check(view: GraphView) -> list[str]:
    """Student/teacher compatibility, checked before any training starts."""
    cfg: Config = view.settings["distill"]
    errs = []
    model_cfg = view.model.__dict__
    if cfg.student not in STUDENT_STAGES:
        if cfg.student not in available_models():
            return [f"distill.student: unknown model {cfg.student!r}; use prune, train or a registry name like "
                    "resnet8"]
        student = build_model(_student_cfg(model_cfg, cfg))
        out = student(torch.zeros(1, 3, view.data.image_size, view.data.image_size)).shape[1]
        if out != view.data.num_classes:
            errs.append(f"distill.student: {cfg.student} outputs {out} classes, the teacher "
                        f"{view.data.num_classes}; they must match")
    if cfg.feature_layers:  # layer names, checked on both architectures before training
        t_names = {n for n, _ in build_model(model_cfg).named_modules()}
        s_names = t_names if cfg.student in STUDENT_STAGES else {n for n, _ in build_model(
            _student_cfg(model_cfg, cfg)).named_modules()}
        for s_layer, t_layer in parse_feature_pairs(cfg.feature_layers):
            for layer, names, who in ((s_layer, s_names, "student"), (t_layer, t_names, "teacher")):
                if layer not in names:
                    errs.append(f"distill.feature_layers: the {who} has no layer named {layer!r}; use names "
                                "like layer3 or layer2.1 (student:teacher pairs when they differ)")
    if cfg.teacher is not None:
        try:
            teacher = _load_teacher_file(cfg.teacher, view.model.target)
        except PipelineError as e:
            return [*errs, f"distill.teacher: {str(e).split(';')[0]}; check distill.teacher=<path to a model.pt>"]
        n = teacher.state_dict()[[k for k in teacher.state_dict() if k.endswith("weight")][-1]].shape[0]
        if n != view.data.num_classes:
            errs.append(f"distill.teacher: {cfg.teacher} predicts {n} classes but data.num_classes="
                        f"{view.data.num_classes}; use a teacher trained on this data")
    return errs


def key_extra(view: GraphView, node: str) -> dict | None:
    """A teacher given as a file is keyed by its content, not its path (a replaced file re-runs distill)."""
    cfg: Config = view.settings["distill"]
    if cfg.teacher is None:
        return None
    path = Path(cfg.teacher)
    return {"teacher_sha256": file_sha256(path) if path.is_file() else None}


def _load_teacher_file(path: str, trusted_target: str | None) -> nn.Module:
    return load_model(load_checkpoint(Path(path)), f"distill.teacher={path}", trusted_target)


def _load_student(ctx: StageContext, cfg: Config) -> tuple[nn.Module, dict, dict]:
    if cfg.student in STUDENT_STAGES:
        art = ctx.inputs["student"]
        ckpt = art.checkpoint()
        return art.model()[0], ckpt["model_cfg"], ckpt[CKPT_SHAPES]
    torch.manual_seed(ctx.rt.seed)
    model_cfg = _student_cfg(ctx.model_cfg, cfg)
    return build_model(model_cfg), model_cfg, {}


def run(ctx: StageContext) -> dict:
    cfg: Config = ctx.settings
    splits = ctx.splits()  # the data split stays the root seed's (the teacher's)
    if cfg.seed is not None:  # repeat the student's training on other seeds from the same teacher and start
        ctx = dataclasses.replace(ctx, rt=dataclasses.replace(ctx.rt, seed=cfg.seed))
    teacher = (ctx.inputs["teacher"].model()[0] if cfg.teacher is None
               else _load_teacher_file(cfg.teacher, ctx.trusted_target))
    teacher = freeze_teacher(teacher, ctx.rt)
    student, student_cfg, shapes = _load_student(ctx, cfg)
    start_state = copy.deepcopy(student.state_dict())
    size = ctx.data_cfg.image_size
    example = torch.zeros(2, 3, size, size, device=ctx.rt.device)
    student.to(ctx.rt.device)
    loss = KDLoss(teacher, alpha=cfg.alpha, temperature=cfg.temperature, label_smoothing=cfg.label_smoothing,
                  feature_pairs=parse_feature_pairs(cfg.feature_layers), feature_weight=cfg.feature_weight,
                  student=student, example=example).to(ctx.rt.device)
    with interrupt_message("distillation"):
        res = fit(student, splits, ctx.data_cfg, cfg, ctx.rt, ctx.work_dir / "kd", loss_fn=loss, desc="distill",
                  extra=loss.adapters)
    test_acc = evaluate(student, splits.test_x, splits.test_y, ctx.data_cfg, ctx.rt)
    teacher_acc = evaluate(teacher, splits.test_x, splits.test_y, ctx.data_cfg, ctx.rt)
    student = student.cpu()
    save_checkpoint(ctx.out_dir / "model.pt", student.state_dict(), student_cfg,
                    shapes=shapes or (module_shapes(student) if cfg.student in STUDENT_STAGES else {}))
    metrics = {"test_acc": test_acc, "val_acc": res.best_val_acc, "teacher_test_acc": teacher_acc, "seed": ctx.rt.seed,
               "student": cfg.student, "params": count_params(student), "macs": count_macs(student, size),
               "history": res.history, **res.resume_info()}
    log.info("distill: student test acc %.2f%% (teacher %.2f%%)", test_acc, teacher_acc)
    if cfg.compare_no_kd:
        plain, _, _ = _load_student(ctx, cfg)
        plain.load_state_dict(start_state)
        with interrupt_message("distillation (no-KD comparison)"):
            fit(plain, splits, ctx.data_cfg, cfg, ctx.rt, ctx.work_dir / "no_kd", desc="no-kd", section="distill",
                side=True)
        metrics["test_acc_no_kd"] = evaluate(plain, splits.test_x, splits.test_y, ctx.data_cfg, ctx.rt)
        metrics["kd_gain"] = test_acc - metrics["test_acc_no_kd"]
        log.info("distill: without KD %.2f%%, KD gain %+.2f points", metrics["test_acc_no_kd"], metrics["kd_gain"])
    return metrics


STAGE = Stage(name="distill", config=Config, run=run, outputs=("model.pt",), inputs=inputs, produces_model=True,
              trains=True, check=check, key_extra=key_extra)
