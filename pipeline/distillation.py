"""Knowledge distillation pieces shared by the distill and qat stages: the loss and the frozen teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import PipelineError
from pipeline.runtime import Runtime


def freeze_teacher(teacher: nn.Module, rt: Runtime) -> nn.Module:
    """The teacher on the run's device, in eval mode, without gradients (channels_last like the student)."""
    teacher = teacher.to(rt.device).eval()
    if rt.channels_last:
        teacher.to(memory_format=torch.channels_last)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def parse_feature_pairs(pairs: list[str]) -> list[tuple[str, str]]:
    """``["layer3", "s_layer:t_layer"]`` -> ``[("layer3", "layer3"), ("s_layer", "t_layer")]``."""
    out = []
    for p in pairs:
        s, _, t = p.partition(":")
        out.append((s, t or s))
    return out


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


def kd_term(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, averaged over the batch (Hinton et al., 2015)."""
    t = temperature
    return F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher_logits / t, 1), log_target=True,
                    reduction="batchmean") * t * t


class KDLoss(nn.Module):
    """``alpha * T^2 * KL + (1 - alpha) * CE`` (+ ``feature_weight`` * MSE of features through 1x1 adapters).

    Called as ``loss_fn(student, x, y) -> (loss, student_logits)`` by ``pipeline.training.fit``; the
    adapters (one per feature pair) are trainable and belong to the loss, not to the student.
    """

    def __init__(self, teacher: nn.Module, *, alpha: float, temperature: float, label_smoothing: float = 0.0,
                 feature_pairs: list[tuple[str, str]] | None = None, feature_weight: float = 0.0,
                 student: nn.Module | None = None, example: torch.Tensor | None = None):
        super().__init__()
        self.teacher, self.alpha, self.temperature = teacher, alpha, temperature
        self.label_smoothing, self.feature_weight = label_smoothing, feature_weight
        pairs = feature_pairs or []
        self.s_names, self.t_names = [s for s, _ in pairs], [t for _, t in pairs]
        self.adapters = nn.ModuleList()
        if pairs:
            if student is None or example is None:
                raise ValueError("feature distillation needs the student and an example input")
            self.s_feat, self.t_feat = _Features(student, self.s_names), _Features(teacher, self.t_names)
            with torch.no_grad():
                was_training = student.training
                student.eval()(example)
                student.train(was_training)
                teacher(example)
            for s, t in pairs:
                cs, ct = self.s_feat.out[s].shape[1], self.t_feat.out[t].shape[1]
                self.adapters.append(nn.Conv2d(cs, ct, 1, bias=False))

    def forward(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        use_teacher = self.alpha > 0 or len(self.adapters) > 0  # alpha 0 without features: plain CE, no teacher pass
        if use_teacher:
            with torch.no_grad():
                t_logits = self.teacher(x)
        logits = student(x)
        loss = (1 - self.alpha) * F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        if self.alpha > 0:
            loss = loss + self.alpha * kd_term(logits, t_logits, self.temperature)
        for adapter, s, t in zip(self.adapters, self.s_names, self.t_names, strict=True):
            loss = loss + self.feature_weight * F.mse_loss(adapter(self.s_feat.out[s]), self.t_feat.out[t])
        return loss, logits
