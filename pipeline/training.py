"""The one training loop shared by train, prune (fine-tune), distill and qat.

Runs on CPU (channels_last), on CUDA (AMP, pinned memory, non-blocking copies) and under
``torchrun`` with DistributedDataParallel (only rank 0 writes). It checkpoints every epoch to
``<work_dir>/last.pt`` so that an interrupted run resumes where it stopped, keeps the weights with
the best validation accuracy, and stops on a non-finite loss keeping the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.artifacts import atomic_write_bytes, detached_state
from pipeline.config import key_neutral, setting
from pipeline.data import DataConfig, Splits, batches
from pipeline.errors import PipelineError
from pipeline.runtime import Runtime

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class EpochObserver:
    """Told about every finished epoch of ``fit`` and every reused training artifact (a search trial's
    intermediate values, ``pipeline.fidelity``). It may raise to stop the run."""

    def epoch(self, section: str, epoch: int, val_acc: float, main: bool) -> None:
        """``epoch`` (1-based) of a ``fit`` of config section ``section`` finished (its checkpoint is saved);
        ``main``: of the stage's model (not a side model such as ``distill.compare_no_kd``'s)."""

    def reused(self, stage: str, history: list[dict]) -> None:
        """A cached artifact of ``stage`` is reused; ``history`` is its training's per-epoch rows."""


OBSERVERS: list[EpochObserver] = []  # installed by the entry point for the run (pipeline.fidelity.reporting)


@dataclass
class FitConfig:
    """Optimisation knobs shared by every training stage (``train.*``, ``distill.*``, ...)."""

    epochs: int = setting(ge=0)
    batch_size: int = setting(ge=1)  # global batch (split across ranks under torchrun)
    optimizer: Literal["sgd", "adamw"]
    lr: float = setting(gt=0)  # peak learning rate
    momentum: float = setting(ge=0)  # SGD only
    weight_decay: float = setting(ge=0)
    schedule: Literal["cosine", "onecycle", "constant"]
    warmup_epochs: float = setting(ge=0)  # linear warm-up (cosine/constant); onecycle has its own ramp
    label_smoothing: float = setting(ge=0, lt=1)
    select: Literal["best", "last"]  # which weights to keep: best validation accuracy or last epoch
    # clip the global gradient norm to this (None: off)
    clip_grad_norm: float | None = key_neutral(None, gt=0, msg="{value} must be {range} or null")


def cross_entropy(label_smoothing: float = 0.0) -> LossFn:
    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        return F.cross_entropy(logits, y, label_smoothing=label_smoothing), logits

    return loss_fn


def _optimizer(params: list[nn.Parameter], cfg: FitConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _lr_lambda(cfg: FitConfig, steps_per_epoch: int) -> Callable[[int], float]:
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(cfg.warmup_epochs * steps_per_epoch)

    def f(step: int) -> float:
        if cfg.schedule == "onecycle":
            peak = max(1, int(0.3 * total))
            if step < peak:
                return 0.04 + 0.96 * step / peak
            return max(0.0, 0.5 * (1 + math.cos(math.pi * (step - peak) / max(1, total - peak))))
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return f


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, data_cfg: DataConfig,
             rt: Runtime, batch_size: int | None = None) -> float:
    """Top-1 accuracy (%) of ``model`` on uint8 images ``x``; reduced across ranks.

    The default batch holds 256 images of 32x32 pixels' worth (16 at 224 px: bounded activation memory).
    """
    if len(y) == 0:
        return float("nan")
    batch_size = batch_size or max(16, min(256, 256 * 32 * 32 // (x.shape[-1] * x.shape[-2])))
    was_training = model.training
    model.to(rt.device).eval()
    correct = torch.zeros((), dtype=torch.int64, device=rt.device)
    count = torch.zeros((), dtype=torch.int64, device=rt.device)
    it = batches(x, y, data_cfg, batch_size, device=rt.device, channels_last=rt.channels_last,
                 rank=rt.rank, world_size=rt.world_size)
    for xb, yb in it:
        with rt.autocast():
            logits = model(xb)
        correct += (logits.argmax(1) == yb).sum()
        count += len(yb)
    model.train(was_training)
    correct, count = rt.all_reduce(correct), rt.all_reduce(count)
    return 100.0 * correct.item() / max(1, count.item())


def _running_stat_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The batch norms of ``model`` that keep running statistics (what batch-norm adaptation re-estimates)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def adapt_batch_norm(model: nn.Module, batches: Iterable[tuple[torch.Tensor, Any]]) -> int:
    """Re-estimate every batch norm's running statistics as the plain average over ``batches`` (NNCF's batch-norm
    adaptation), the rest of the model in eval mode (no dropout or stochastic depth); returns the batch count.

    For models whose running statistics lag their weights (a few training steps, channels pruned without
    fine-tuning): their eval-mode activations then match what training mode computes, which calibration and QAT
    rely on. Weights are untouched; with no batch the statistics stay as they were."""
    bns = _running_stat_norms(model)
    was_training, momenta = model.training, [m.momentum for m in bns]
    model.eval()
    n = 0
    try:
        for xb, _ in batches:
            if n == 0:
                for m in bns:
                    m.reset_running_stats()
                    m.momentum = None  # cumulative average
                    m.train()
            model(xb)
            n += 1
    finally:
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    return n


def adapt_batch_norm_for(model: nn.Module, splits: Splits, data_cfg: DataConfig, rt: Runtime, n_batches: int,
                         batch_size: int, section: str) -> float:
    """A stage's ``<section>.bn_adapt_batches``: :func:`adapt_batch_norm` on the first ``n_batches`` shuffled,
    unaugmented training batches (the ones calibration takes first), logged; returns the test accuracy after."""
    if not _running_stat_norms(model):
        log.warning("%s.bn_adapt_batches: the model has no batch norm with running statistics; nothing to "
                    "re-estimate", section)
        return evaluate(model, splits.test_x, splits.test_y, data_cfg, rt)
    it = batches(splits.train_x, splits.train_y, data_cfg, batch_size, shuffle=True, seed=rt.seed, device=rt.device,
                 channels_last=rt.channels_last)
    n = adapt_batch_norm(model.to(rt.device), (b for _, b in zip(range(n_batches), it, strict=False)))
    if n == 0:
        raise PipelineError(f"{section}.bn_adapt_batches: the training split gave no batch; check the data or set 0")
    acc = evaluate(model, splits.test_x, splits.test_y, data_cfg, rt)
    log.info("%s: batch-norm statistics re-estimated on %d batches: FP32 test accuracy %.2f%%", section, n, acc)
    return acc


@dataclass
class FitResult:
    history: list[dict]
    best_val_acc: float
    epochs_run: int
    images_per_s: float
    resumed_at_epoch: int = 0  # > 0: continued from an interrupted run's checkpoint after this epoch

    def resume_info(self) -> dict:
        """For metrics.json: whether the run was resumed (its weights equal an uninterrupted run's on CPU)."""
        return {"resumed_at_epoch": self.resumed_at_epoch} if self.resumed_at_epoch else {}


def rng_state(aug: torch.Generator) -> dict:
    """Every random state a training epoch draws from, as plain data (``weights_only`` loadable)."""
    mt, pos, has_gauss, gauss = np.random.get_state()[1:]
    return {"torch": torch.get_rng_state(), "aug": aug.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [torch.from_numpy(mt.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": list(random.getstate()[1]), "python_gauss": random.getstate()[2]}


def set_rng_state(state: dict, aug: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    aug.set_state(state["aug"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    mt, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", mt.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((3, tuple(state["python"]), state["python_gauss"]))


def _save_state(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def fit(model: nn.Module, splits: Splits, data_cfg: DataConfig, cfg: FitConfig, rt: Runtime,
        work_dir: Path, *, loss_fn: LossFn | None = None, desc: str = "train",
        on_epoch_start: Callable[[int, nn.Module], None] | None = None,
        extra: nn.Module | None = None, section: str | None = None, side: bool = False) -> FitResult:
    """Train ``model`` in place; on return it holds the selected (best or last) weights.

    ``extra`` holds trainable modules that ``loss_fn`` uses besides the model (distillation
    adapters): they are optimised with it, saved in the resume checkpoint and, under torchrun,
    start from rank 0's values and get gradients averaged across ranks. ``section`` is the config
    key of ``cfg`` (named in error messages); it defaults to ``desc``. ``side``: a model trained beside the
    stage's own (a comparison): observers count its epochs but do not take its accuracy as the stage's.
    """
    section = section or desc
    loss_fn = loss_fn or cross_entropy(cfg.label_smoothing)
    model.to(rt.device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    train_it = _train_batches(splits, data_cfg, cfg, rt, section, desc)
    extra_params = [p for p in extra.parameters() if p.requires_grad] if extra is not None else []
    params = [p for p in model.parameters() if p.requires_grad] + extra_params
    opt = _optimizer(params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, len(train_it)))
    scaler = rt.grad_scaler()

    work_dir = Path(work_dir)
    last_path, best_path = work_dir / "last.pt", work_dir / "best.pt"
    rng_path = work_dir / f"rng-{rt.rank}.pt"  # each rank's random states (augmentation is per rank)
    start_epoch, history, best_acc = _resume(last_path, rng_path, model, extra, opt, sched, train_it, desc,
                                             cfg.epochs)
    resumed_at = start_epoch
    with rt.global_batchnorm(model):  # before wrapping: DDP sees the synchronised layers
        ddp_model = rt.wrap(model)  # after resuming, so every rank starts from the same weights
        if extra is not None:
            rt.broadcast_(extra)
        best_state = None
        seen, busy = 0, 0.0
        for epoch in range(start_epoch, cfg.epochs):
            if on_epoch_start is not None:
                on_epoch_start(epoch, model)
            model.train()
            t0 = time.perf_counter()
            loss_sum, correct, n = _train_epoch(ddp_model, train_it, loss_fn, _Step(opt, sched, scaler, params,
                                                extra_params, cfg.clip_grad_norm, _nan_hint(cfg, section)), rt,
                                                epoch, cfg.epochs, desc, section, last_path)
            if rt.device.type == "cuda":
                torch.cuda.synchronize()
            busy += time.perf_counter() - t0
            seen += n
            train_acc = 100.0 * rt.all_reduce(correct).item() / max(1, n * rt.world_size)
            val_acc = evaluate(model, splits.val_x, splits.val_y, data_cfg, rt)
            row = {"epoch": epoch + 1, "loss": loss_sum.item() / len(train_it), "train_acc": train_acc,
                   "val_acc": val_acc, "lr": opt.param_groups[0]["lr"]}
            history.append(row)
            val = "no validation split" if math.isnan(val_acc) else f"val acc {val_acc:.2f}%"
            log.info("%s epoch %d/%d: loss %.4f, train acc %.2f%%, %s", desc, epoch + 1, cfg.epochs, row["loss"],
                     train_acc, val)
            improved = math.isnan(val_acc) or val_acc > best_acc
            if improved:
                best_acc = val_acc if not math.isnan(val_acc) else best_acc
                best_state = detached_state(model.state_dict(), clone=True)  # with the module versions
            _checkpoint(work_dir, rt, model, extra, opt, sched, train_it.generator, improved,
                        {"epoch": epoch + 1, "history": history, "best_acc": best_acc})
            for obs in OBSERVERS:  # after the checkpoint: a stopped run resumes from this epoch
                obs.epoch(section, epoch + 1, val_acc, not side)
    if cfg.select == "best" and cfg.epochs > 0:  # every rank holds the same best weights
        if best_state is None and best_path.is_file():  # resumed after the last epoch
            best_state = torch.load(best_path, map_location="cpu", weights_only=True)["model"]
        if best_state is not None:
            model.load_state_dict(best_state)
    return FitResult(history, best_acc, cfg.epochs - start_epoch,
                     seen * rt.world_size / busy if busy else float("nan"), resumed_at)


def _train_batches(splits: Splits, data_cfg: DataConfig, cfg: FitConfig, rt: Runtime, section: str, desc: str):
    """This rank's batches of the training split; a one-line error where the world size does not divide the batch
    or the split holds less than one batch."""
    if cfg.batch_size % rt.world_size:
        raise PipelineError(
            f"batch size {cfg.batch_size} is not divisible by the world size {rt.world_size}; "
            f"use a multiple of {rt.world_size}"
        )
    train_it = batches(splits.train_x, splits.train_y, data_cfg, cfg.batch_size // rt.world_size,
                       shuffle=True, augment=data_cfg.augment, drop_last=True, device=rt.device,
                       channels_last=rt.channels_last, seed=rt.seed, rank=rt.rank,
                       world_size=rt.world_size)
    if len(train_it) == 0:
        raise PipelineError(
            f"{len(splits.train_y)} training images are fewer than one batch of {cfg.batch_size}; "
            f"lower {section}.batch_size"
        )
    if cfg.select == "best" and cfg.epochs > 0 and len(splits.val_y) == 0:
        log.info("%s: no validation split (data.val_fraction=0), so the last epoch's weights are kept", desc)
    return train_it


def _resume(last_path: Path, rng_path: Path, model: nn.Module, extra: nn.Module | None, opt, sched, train_it,
            desc: str, epochs: int) -> tuple[int, list, float]:
    """Load the resume checkpoint (weights, optimizer, schedule, random states) into place: the epoch to start
    from, the history so far and the best validation accuracy; a checkpoint that does not fit starts over."""
    if not last_path.is_file():
        return 0, [], -1.0
    try:
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        rng = torch.load(rng_path, map_location="cpu", weights_only=True)
        if rng["epoch"] != state["epoch"]:
            raise ValueError(f"random states of epoch {rng['epoch']}, weights of epoch {state['epoch']}")
        model.load_state_dict(state["model"])
        if extra is not None:
            extra.load_state_dict(state["extra"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(rng["state"], train_it.generator)
        train_it.epoch = state["epoch"]
        log.info("%s: resuming from %s at epoch %d/%d", desc, last_path, state["epoch"], epochs)
        return state["epoch"], state["history"], state["best_acc"]
    except Exception as e:  # a checkpoint from another config or a broken file: start over
        log.warning("%s: cannot resume from %s (%s); starting from scratch", desc, last_path, e)
        return 0, [], -1.0


@dataclass
class _Step:
    """What one optimisation step uses."""

    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    params: list
    extra_params: list
    clip_grad_norm: float | None
    nan_hint: str  # what the error on a non-finite loss tells the user to try


def _nan_hint(cfg: FitConfig, section: str) -> str:
    ways = [f"lower {section}.lr"] + ([f"set {section}.clip_grad_norm=1.0"] if cfg.clip_grad_norm is None else [])
    if getattr(cfg, "bn_adapt_batches", None) == 0:  # a stage that can re-estimate batch-norm statistics first
        ways.append(f"set {section}.bn_adapt_batches=16 to re-estimate batch-norm statistics that lag the weights")
    return ", ".join(ways[:-1]) + f" or {ways[-1]}" if len(ways) > 1 else ways[0]


def _train_epoch(ddp_model: nn.Module, train_it, loss_fn: LossFn, step_: _Step, rt: Runtime, epoch: int,
                 epochs: int, desc: str, section: str, last_path: Path) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One pass over the training batches: the summed loss, correct predictions and images seen (this rank's);
    a loss that is no longer finite stops training with a one-line error."""
    loss_sum = torch.zeros((), device=rt.device)
    correct = torch.zeros((), dtype=torch.int64, device=rt.device)
    n = 0
    bar = tqdm(train_it, desc=f"{desc} {epoch + 1}/{epochs}", unit="batch", disable=not rt.progress, leave=False,
               mininterval=1.0)
    for step, (xb, yb) in enumerate(bar):
        with rt.autocast():
            loss, logits = loss_fn(ddp_model, xb, yb)
        step_.opt.zero_grad(set_to_none=True)
        step_.scaler.scale(loss).backward()
        rt.average_grads_(step_.extra_params)
        if step_.clip_grad_norm is not None:
            step_.scaler.unscale_(step_.opt)
            torch.nn.utils.clip_grad_norm_(step_.params, step_.clip_grad_norm)
        step_.scaler.step(step_.opt)
        step_.scaler.update()
        step_.sched.step()
        loss_sum += loss.detach()
        correct += (logits.detach().argmax(1) == yb).sum()
        n += len(yb)
        if step % 20 == 19 or step == len(train_it) - 1:
            avg = rt.all_reduce(loss_sum).item() / (step + 1) / rt.world_size
            if not math.isfinite(avg):
                kept = (f"the last good checkpoint (epoch {epoch}) is kept in {last_path}" if epoch > 0
                        else "no epoch had finished, so no checkpoint was kept")
                raise PipelineError(f"{desc}: loss became {avg} in epoch {epoch + 1}; stopped ({kept}); "
                                    f"{step_.nan_hint}, or check the data")
            bar.set_postfix(loss=f"{avg:.3f}", acc=f"{100.0 * correct.item() / n:.1f}")
    return loss_sum, correct, n


def _checkpoint(work_dir: Path, rt: Runtime, model: nn.Module, extra: nn.Module | None, opt, sched,
                generator: torch.Generator, improved: bool, progress: dict) -> None:
    """After an epoch: best.pt when it improved, this rank's random states, then last.pt (rank 0 writes weights)."""
    if rt.is_main:
        if improved:
            _save_state(work_dir / "best.pt", {"model": model.state_dict()})
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 **progress}
        if extra is not None:
            state["extra"] = extra.state_dict()
    # random states first: a kill between the two writes leaves them ahead, which resume detects
    _save_state(work_dir / f"rng-{rt.rank}.pt", {"epoch": progress["epoch"], "state": rng_state(generator)})
    if rt.is_main:
        _save_state(work_dir / "last.pt", state)
    rt.barrier()


@contextlib.contextmanager
def interrupt_message(desc: str) -> Iterator[None]:
    """Turn Ctrl-C into a one-line note that the same command resumes the run."""
    try:
        yield
    except KeyboardInterrupt:
        raise PipelineError(f"{desc} interrupted; run the same command again to resume from the last epoch") from None
