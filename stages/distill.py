"""distill: knowledge distillation from the teacher (the baseline) into a student.

Reads: ``train`` (teacher, unless ``distill.teacher`` is a checkpoint path) and ``prune`` (student,
unless ``distill.student`` names a model, e.g. ``resnet8``). Writes: ``model.pt``, ``metrics.json``.

Loss: ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE`` (Hinton et al., 2015), plus
optional feature distillation on chosen layers through 1x1 adapters. The teacher is in eval mode,
without gradients. With ``distill.compare_no_kd=true`` the same student is also trained with plain
cross-entropy (same epochs, same seed), so the benefit of KD is measured, not assumed.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.artifacts import CKPT_SHAPES, load_checkpoint, save_checkpoint
from pipeline.errors import PipelineError
from pipeline.models import build_model, count_macs, count_params, load_model, module_shapes
from pipeline.stage import StageContext
from pipeline.training import FitConfig, evaluate, fit, interrupt_message

log = logging.getLogger(__name__)

NAME = "distill"
OUTPUTS = ("model.pt", "metrics.json")
PRODUCES_MODEL = True


@dataclass
class Config(FitConfig):
    """``conf/stages/distill.yaml``; FitConfig fields train the student."""

    teacher: str | None = None  # null: the train stage's baseline; or a path to a pipeline checkpoint
    student: str = "prune"  # "prune": the pruned model; or a registry model name (e.g. resnet8)
    student_width: float = 1.0  # width of a registry student (CIFAR ResNets)
    alpha: float = 0.9  # weight of the KD term (1 - alpha for cross-entropy)
    temperature: float = 4.0
    feature_layers: list[str] = field(default_factory=list)  # "student_layer[:teacher_layer]" pairs
    feature_weight: float = 1.0  # weight of the feature (MSE through 1x1 adapter) loss
    compare_no_kd: bool = False  # also train the student without KD and record both accuracies

    def check(self) -> list[str]:
        errs = super().check()
        if not 0.0 <= self.alpha <= 1.0:
            errs.append(f"alpha: {self.alpha} must be in [0, 1]")
        if self.temperature <= 0:
            errs.append(f"temperature: {self.temperature} must be > 0")
        return errs


def inputs(runner, node: str) -> dict[str, str]:
    cfg: Config = runner.settings[NAME]
    out = {}
    if cfg.teacher is None:
        out["teacher"] = "train"
    if cfg.student == "prune":
        out["student"] = "prune" if "prune" in runner.root.pipeline else "train"
    return out


def _student_cfg(runner_model_cfg: dict, cfg: Config) -> dict:
    return {**runner_model_cfg, "name": cfg.student, "target": None, "width": cfg.student_width}


def check_config(runner) -> list[str]:
    """Student/teacher compatibility, checked before any training starts."""
    cfg: Config = runner.settings[NAME]
    errs = []
    model_cfg = runner.model_cfg.__dict__
    if cfg.student != "prune":
        from pipeline.models import available_models

        if cfg.student not in available_models():
            return [f"distill.student: unknown model {cfg.student!r}; use 'prune' or a registry name like resnet8"]
        student = build_model(_student_cfg(model_cfg, cfg))
        out = student(torch.zeros(1, 3, runner.data_cfg.image_size, runner.data_cfg.image_size)).shape[1]
        if out != runner.data_cfg.num_classes:
            errs.append(f"distill.student: {cfg.student} outputs {out} classes, the teacher "
                        f"{runner.data_cfg.num_classes}; they must match")
    if cfg.feature_layers:  # layer names, checked on both architectures before training
        t_names = {n for n, _ in build_model(model_cfg).named_modules()}
        s_names = t_names if cfg.student == "prune" else {n for n, _ in build_model(
            _student_cfg(model_cfg, cfg)).named_modules()}
        for pair in cfg.feature_layers:
            s_layer, _, t_layer = pair.partition(":")
            for layer, names, who in ((s_layer, s_names, "student"), (t_layer or s_layer, t_names, "teacher")):
                if layer not in names:
                    errs.append(f"distill.feature_layers: the {who} has no layer named {layer!r}; use names "
                                "like layer3 or layer2.1 (student:teacher pairs when they differ)")
    if cfg.teacher is not None:
        try:
            ckpt = load_checkpoint(Path(cfg.teacher))
            teacher = load_model(ckpt, f"distill.teacher={cfg.teacher}")
        except PipelineError as e:
            return [*errs, f"distill.teacher: {str(e).split(';')[0]}; check distill.teacher=<path to a model.pt>"]
        n = teacher.state_dict()[[k for k in teacher.state_dict() if k.endswith("weight")][-1]].shape[0]
        if n != runner.data_cfg.num_classes:
            errs.append(f"distill.teacher: {cfg.teacher} predicts {n} classes but data.num_classes="
                        f"{runner.data_cfg.num_classes}; use a teacher trained on this data")
    return errs


class _Features:
    """Forward hooks that keep the outputs of named layers."""

    def __init__(self, model: nn.Module, names: list[str]):
        mods = dict(model.named_modules())
        missing = [n for n in names if n not in mods]
        if missing:
            raise PipelineError(f"distill.feature_layers: no layer named {missing[0]!r}; "
                                f"use names like {', '.join(list(mods)[1:5])}")
        self.out: dict[str, torch.Tensor] = {}
        for n in names:
            mods[n].register_forward_hook(lambda m, i, o, n=n: self.out.__setitem__(n, o))


class KDLoss(nn.Module):
    """Soft-target KL + hard-label CE (+ feature MSE through 1x1 adapters)."""

    def __init__(self, teacher: nn.Module, cfg: Config, student: nn.Module, example: torch.Tensor):
        super().__init__()
        self.teacher, self.cfg = teacher, cfg
        pairs = [(p.split(":") + [p])[:2] if ":" in p else [p, p] for p in cfg.feature_layers]
        self.s_names, self.t_names = [p[0] for p in pairs], [p[1] for p in pairs]
        self.s_feat = _Features(student, self.s_names)
        self.t_feat = _Features(teacher, self.t_names)
        self.adapters = nn.ModuleList()
        if pairs:
            with torch.no_grad():
                student.eval()(example)
                teacher(example)
            for s, t in zip(self.s_names, self.t_names, strict=True):
                cs, ct = self.s_feat.out[s].shape[1], self.t_feat.out[t].shape[1]
                self.adapters.append(nn.Conv2d(cs, ct, 1, bias=False))

    def forward(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, T = self.cfg, self.cfg.temperature
        with torch.no_grad():
            t_logits = self.teacher(x)
        logits = student(x)
        kd = F.kl_div(F.log_softmax(logits / T, 1), F.log_softmax(t_logits / T, 1), log_target=True,
                      reduction="batchmean") * T * T
        loss = c.alpha * kd + (1 - c.alpha) * F.cross_entropy(logits, y, label_smoothing=c.label_smoothing)
        for adapter, s, t in zip(self.adapters, self.s_names, self.t_names, strict=True):
            loss = loss + c.feature_weight * F.mse_loss(adapter(self.s_feat.out[s]), self.t_feat.out[t])
        return loss, logits


def _load_student(ctx: StageContext, cfg: Config) -> tuple[nn.Module, dict, dict]:
    if cfg.student == "prune":
        ckpt = ctx.inputs["student"].checkpoint()
        return load_model(ckpt), ckpt["model_cfg"], ckpt[CKPT_SHAPES]
    torch.manual_seed(ctx.rt.seed)
    model_cfg = _student_cfg(ctx.model_cfg, cfg)
    return build_model(model_cfg), model_cfg, {}


def run(ctx: StageContext) -> dict:
    cfg: Config = ctx.settings
    splits = ctx.splits()
    teacher = (ctx.inputs["teacher"].model()[0] if cfg.teacher is None
               else load_model(load_checkpoint(Path(cfg.teacher)), cfg.teacher))
    teacher = teacher.to(ctx.rt.device).eval()
    if ctx.rt.channels_last:
        teacher.to(memory_format=torch.channels_last)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student, student_cfg, shapes = _load_student(ctx, cfg)
    start_state = copy.deepcopy(student.state_dict())
    size = ctx.data_cfg.image_size
    example = torch.zeros(2, 3, size, size, device=ctx.rt.device)
    student.to(ctx.rt.device)
    loss = KDLoss(teacher, cfg, student, example).to(ctx.rt.device)
    with interrupt_message("distillation"):
        res = fit(student, splits, ctx.data_cfg, cfg, ctx.rt, ctx.work_dir / "kd", loss_fn=loss, desc="distill",
                  extra=loss.adapters)
    test_acc = evaluate(student, splits.test_x, splits.test_y, ctx.data_cfg, ctx.rt)
    teacher_acc = evaluate(teacher, splits.test_x, splits.test_y, ctx.data_cfg, ctx.rt)
    student = student.cpu()
    save_checkpoint(ctx.out_dir / "model.pt", student.state_dict(), student_cfg,
                    shapes=shapes or (module_shapes(student) if cfg.student == "prune" else {}))
    metrics = {"test_acc": test_acc, "val_acc": res.best_val_acc, "teacher_test_acc": teacher_acc,
               "student": cfg.student, "params": count_params(student), "macs": count_macs(student, size),
               "history": res.history}
    log.info("distill: student test acc %.2f%% (teacher %.2f%%)", test_acc, teacher_acc)
    if cfg.compare_no_kd:
        plain, _, _ = _load_student(ctx, cfg)
        plain.load_state_dict(start_state)
        with interrupt_message("distillation (no-KD comparison)"):
            fit(plain, splits, ctx.data_cfg, cfg, ctx.rt, ctx.work_dir / "no_kd", desc="no-kd", section=NAME)
        metrics["test_acc_no_kd"] = evaluate(plain, splits.test_x, splits.test_y, ctx.data_cfg, ctx.rt)
        metrics["kd_gain"] = test_acc - metrics["test_acc_no_kd"]
        log.info("distill: without KD %.2f%%, KD gain %+.2f points", metrics["test_acc_no_kd"], metrics["kd_gain"])
    return metrics
