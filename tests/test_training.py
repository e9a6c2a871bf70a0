"""The shared loop: learns, resumes after an interruption, stops on NaN keeping the last good checkpoint."""

from __future__ import annotations

import pytest
import torch

from pipeline.data import DataConfig, Splits
from pipeline.errors import PipelineError
from pipeline.models import build_model
from pipeline.runtime import make_runtime
from pipeline.training import FitConfig, evaluate, fit


def _setup(n=256):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    x = torch.randint(0, 100, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    x[y == 1, 0] += 120  # class 1: bright red channel, learnable in a few steps
    splits = Splits(x, y, x[:64], y[:64], x[:64], y[:64], ["a", "b"])
    dc = DataConfig("embedded", None, False, 8, 2, 0.0, [0.5] * 3, [0.25] * 3, False, 0)
    rt = make_runtime("cpu", 0, "off", False, False, False)
    return splits, dc, rt


def _fit_cfg(epochs=3, lr=0.05):
    return FitConfig(epochs=epochs, batch_size=32, optimizer="sgd", lr=lr, momentum=0.9, weight_decay=0.0,
                     schedule="cosine", warmup_epochs=0.0, label_smoothing=0.0, select="best")


def test_fit_learns_a_separable_task(tmp_path):
    splits, dc, rt = _setup()
    model = build_model({"name": "resnet8", "num_classes": 2, "width": 0.25})
    res = fit(model, splits, dc, _fit_cfg(), rt, tmp_path)
    assert evaluate(model, splits.test_x, splits.test_y, dc, rt) > 90
    assert len(res.history) == 3 and (tmp_path / "last.pt").is_file()


def test_interrupted_fit_resumes_from_last_epoch(tmp_path):
    splits, dc, rt = _setup()
    model = build_model({"name": "resnet8", "num_classes": 2, "width": 0.25})

    def interrupt(epoch, _model):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(model, splits, dc, _fit_cfg(), rt, tmp_path, on_epoch_start=interrupt)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2
    started = []
    model = build_model({"name": "resnet8", "num_classes": 2, "width": 0.25})
    res = fit(model, splits, dc, _fit_cfg(), rt, tmp_path, on_epoch_start=lambda e, m: started.append(e))
    assert started == [2] and res.epochs_run == 1 and len(res.history) == 3


def test_extra_modules_are_trained_and_resumed(tmp_path):
    """Modules the loss uses besides the model (distillation adapters) are part of the resume state."""
    splits, dc, rt = _setup()
    model = build_model({"name": "resnet8", "num_classes": 2, "width": 0.25})
    extra = torch.nn.Linear(2, 2)

    def loss_fn(m, x, y):
        logits = m(x)
        return torch.nn.functional.cross_entropy(extra(logits), y), logits

    def interrupt(epoch, _model):
        if epoch == 1:
            raise KeyboardInterrupt

    before = extra.weight.detach().clone()
    with pytest.raises(KeyboardInterrupt):
        fit(model, splits, dc, _fit_cfg(), rt, tmp_path, loss_fn=loss_fn, extra=extra, on_epoch_start=interrupt)
    saved = torch.load(tmp_path / "last.pt", weights_only=True)["extra"]["weight"]
    assert not torch.equal(saved, before)  # trained
    extra.reset_parameters()
    fit(model, splits, dc, _fit_cfg(epochs=1), rt, tmp_path, loss_fn=loss_fn, extra=extra)  # already done: resume only
    assert torch.equal(extra.weight.detach(), saved)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    splits, dc, rt = _setup()
    model = build_model({"name": "resnet8", "num_classes": 2, "width": 0.25})

    def poison(epoch, m):
        if epoch == 1:
            with torch.no_grad():
                m.fc.weight.fill_(float("nan"))

    with pytest.raises(PipelineError, match=r"loss became nan in epoch 2.*last good checkpoint"):
        fit(model, splits, dc, _fit_cfg(), rt, tmp_path, on_epoch_start=poison)
    good = torch.load(tmp_path / "last.pt", weights_only=True)
    assert good["epoch"] == 1 and torch.isfinite(good["model"]["fc.weight"]).all()


def test_batch_larger_than_data(tmp_path):
    splits, dc, rt = _setup(n=16)
    model = build_model({"name": "resnet8", "num_classes": 2, "width": 0.25})
    with pytest.raises(PipelineError, match="fewer than one batch"):
        fit(model, splits, dc, _fit_cfg(), rt, tmp_path, desc="train")
