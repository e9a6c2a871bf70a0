"""prune: make the baseline smaller, unstructured (magnitude) or structured (channels removed).

Reads: ``train`` (the FP32 baseline). Writes: ``model.pt`` (pruned weights + the pruned layer
shapes, so ``weights_only`` loading can rebuild it), ``metrics.json`` (MACs/params before and
after, per-layer channels or sparsity, accuracy before and after fine-tuning).

``prune.ratio`` is always the fraction *removed*: of each layer's channels (``method=channel``,
Torch-Pruning's dependency graph keeps residual adds, depthwise convs, BN and the classifier
consistent) or of the weights (``method=magnitude``, masks made permanent; dense ONNX Runtime does
not run these faster). ``prune.target_macs`` instead removes channels until the MACs budget is met.
``prune.drop_blocks`` first removes whole residual blocks (depth pruning): on CPUs the full-resolution
stage costs far more time per MAC than the deeper ones, and channels alone cannot shrink it enough.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.artifacts import save_checkpoint
from pipeline.errors import PipelineError
from pipeline.models import (
    build_model,
    count_macs,
    count_params,
    module_shapes,
    replace_with_identity,
    unknown_layer_errors,
)
from pipeline.stage import StageContext
from pipeline.training import FitConfig, evaluate, fit, interrupt_message

log = logging.getLogger(__name__)

NAME = "prune"
OUTPUTS = ("model.pt", "metrics.json")
PRODUCES_MODEL = True


@dataclass
class Config(FitConfig):
    """``conf/stages/prune.yaml``; the FitConfig fields are the final fine-tune."""

    method: Literal["channel", "magnitude"] = "channel"
    ratio: float = 0.3  # fraction removed: channels per layer (channel) or weights (magnitude)
    target_macs: float | None = None  # channel only: prune until MACs <= this (overrides ratio)
    importance: Literal["l1", "l2", "bn_scale", "taylor"] = "l1"  # channel importance criterion
    global_pruning: bool = False  # rank channels / weights across layers instead of per layer
    keep_first_conv: bool = True  # never prune the stem's output channels
    exclude: list[str] = field(default_factory=list)  # module names never pruned (classifier always kept)
    drop_blocks: list[str] = field(default_factory=list)  # residual blocks replaced by identity (depth pruning)
    steps: int = 1  # 1 = one-shot; N = iterative, fine-tuning step_epochs between steps
    step_epochs: int = 1
    round_to: int | None = 8  # keep channel counts multiples of this (ORT's FP32 conv blocks are 8 wide)
    taylor_batches: int = 4  # batches of gradients for taylor importance

    def check(self) -> list[str]:
        errs = super().check()
        if not 0.0 <= self.ratio < 1.0:
            errs.append(f"ratio: {self.ratio} must be in [0, 1) (the fraction removed)")
        if self.target_macs is not None and self.method != "channel":
            errs.append("target_macs: only for prune.method=channel")
        if self.target_macs is not None and self.target_macs <= 0:
            errs.append(f"target_macs: {self.target_macs} must be > 0")
        if self.steps < 1:
            errs.append(f"steps: {self.steps} must be >= 1")
        return errs


def inputs(runner, node: str) -> dict[str, str]:
    return {"model": "train"}


def check_config(runner) -> list[str]:
    """Checks that need the model (before any training)."""
    cfg: Config = runner.settings[NAME]
    model = build_model(runner.model_cfg.__dict__)
    model_name = runner.model_cfg.name or runner.model_cfg.target
    errs = [e for key in ("exclude", "drop_blocks")
            for e in unknown_layer_errors(f"prune.{key}", getattr(cfg, key), model, model_name)]
    errs += [f"prune.exclude: {n!r} lies inside the dropped block {b!r}; remove one of them"
             for n in cfg.exclude for b in cfg.drop_blocks if n.startswith(b + ".")]
    if cfg.drop_blocks and not errs:
        errs += [f"prune.drop_blocks: {n!r} changes the tensor shape ({a} -> {b}); only blocks whose output has "
                 "the shape of their input (identity shortcut) can be dropped"
                 for n, (a, b) in _block_shapes(model, cfg.drop_blocks, runner.data_cfg.image_size).items() if a != b]
    if cfg.target_macs is not None:
        macs = count_macs(model, runner.data_cfg.image_size)
        if cfg.target_macs >= macs:
            errs.append(f"prune.target_macs: {cfg.target_macs:.4g} is not below the model's {macs:.4g} MACs; "
                        f"use a smaller budget, e.g. prune.target_macs={macs / 2:.3g}")
    return errs


def _block_shapes(model: nn.Module, names: list[str], size: int) -> dict[str, tuple[list, list]]:
    """Input and output shapes of the named modules, from one forward pass at ``size``."""
    shapes, hooks = {}, []
    for n in names:
        hooks.append(model.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: shapes.__setitem__(n, (list(i[0].shape), list(o.shape)))))
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return shapes


def drop_blocks(model: nn.Module, names: list[str]) -> nn.Module:
    """Depth pruning: each named residual block becomes ``nn.Identity`` (its branch removed).

    Exact for blocks whose output is ``relu(branch(x) + x)`` with a non-negative input ``x``
    (ResNets: the block input is the previous block's ReLU output); then fine-tuning/KD recovers.
    """
    for n in names:
        replace_with_identity(model, n)
    return model


def _classifier(model: nn.Module) -> nn.Module | None:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _kept_layers(model: nn.Module, cfg: Config) -> list[nn.Module]:
    named = dict(model.named_modules())
    kept = [named[n] for n in cfg.exclude]
    if (fc := _classifier(model)) is not None:
        kept.append(fc)
    if cfg.keep_first_conv:
        kept.append(next(m for m in model.modules() if isinstance(m, nn.Conv2d)))
    return kept


# ---------------------------------------------------------------- channel (structured)


def _importance(name: str):
    import torch_pruning as tp

    return {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "bn_scale": lambda: tp.importance.BNScaleImportance(),
        "taylor": lambda: tp.importance.GroupTaylorImportance(),
    }[name]()


def _taylor_grads(model: nn.Module, ctx: StageContext, n_batches: int) -> None:
    from pipeline.data import batches

    splits = ctx.splits()
    was_training = model.training
    model.eval()  # gradients only: BN running statistics must not move
    model.zero_grad()
    it = batches(splits.train_x, splits.train_y, ctx.data_cfg, 64, shuffle=True, seed=ctx.rt.seed)
    for i, (xb, yb) in enumerate(it):
        if i == n_batches:
            break
        F.cross_entropy(model(xb), yb).backward()
    model.train(was_training)


def _channel_prune(model: nn.Module, ctx: StageContext, finetune) -> nn.Module:
    import torch_pruning as tp

    cfg: Config = ctx.settings
    size = ctx.data_cfg.image_size
    example = torch.zeros(1, 3, size, size)
    base_macs = count_macs(model, size)
    by_macs = cfg.target_macs is not None
    pruner = tp.pruner.BasePruner(
        model, example, importance=_importance(cfg.importance), global_pruning=cfg.global_pruning,
        pruning_ratio=0.95 if by_macs else cfg.ratio, iterative_steps=200 if by_macs else cfg.steps,
        ignored_layers=_kept_layers(model, cfg), round_to=cfg.round_to,
    )
    for step in range(cfg.steps):
        if by_macs:  # small increments until this step's share of the MACs budget is met
            goal = base_macs - (base_macs - cfg.target_macs) * (step + 1) / cfg.steps
            while count_macs(model, size) > goal and pruner.current_step < pruner.iterative_steps:
                if cfg.importance == "taylor":
                    _taylor_grads(model, ctx, cfg.taylor_batches)
                pruner.step()
            if count_macs(model, size) > goal:
                raise PipelineError(f"prune.target_macs={cfg.target_macs:.4g} cannot be reached with the kept "
                                    "layers; raise it or exclude fewer layers")
        else:
            if cfg.importance == "taylor":
                _taylor_grads(model, ctx, cfg.taylor_batches)
            pruner.step()
        log.info("prune: step %d/%d, MACs %.3g -> %.3g", step + 1, cfg.steps, base_macs, count_macs(model, size))
        if step < cfg.steps - 1:
            finetune(model, cfg.step_epochs, f"step{step + 1}")
    return model


# ---------------------------------------------------------------- magnitude (unstructured)


def _magnitude_prune(model: nn.Module, ctx: StageContext, finetune) -> nn.Module:
    import torch.nn.utils.prune as tprune

    cfg: Config = ctx.settings
    kept = set(map(id, _kept_layers(model, cfg)))
    targets = [(m, "weight") for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in kept]
    for step in range(cfg.steps):
        # overall sparsity after this step: ratio * (step+1)/steps, applied to what is left
        total = cfg.ratio * (step + 1) / cfg.steps
        done = cfg.ratio * step / cfg.steps
        amount = (total - done) / (1 - done)
        if cfg.global_pruning:
            tprune.global_unstructured(targets, pruning_method=tprune.L1Unstructured, amount=amount)
        else:
            for m, p in targets:
                tprune.l1_unstructured(m, p, amount=amount)
        if step < cfg.steps - 1:
            finetune(model, cfg.step_epochs, f"step{step + 1}")
    return model


def _make_permanent(model: nn.Module) -> None:
    import torch.nn.utils.prune as tprune

    for m in model.modules():
        if tprune.is_pruned(m) and hasattr(m, "weight_orig"):
            tprune.remove(m, "weight")


def layer_report(model: nn.Module) -> dict[str, dict]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight.detach()
            out[name] = {"shape": list(w.shape), "sparsity": float((w == 0).float().mean())}
    return out


def run(ctx: StageContext) -> dict:
    cfg: Config = ctx.settings
    splits = ctx.splits()
    model, _ = ctx.inputs["model"].model()
    size = ctx.data_cfg.image_size
    before = {"macs": count_macs(model, size), "params": count_params(model),
              "test_acc": ctx.inputs["model"].metrics["test_acc"]}

    def finetune(m: nn.Module, epochs: int, tag: str) -> None:
        if epochs > 0:
            step_cfg = Config(**{**cfg.__dict__, "epochs": epochs})
            fit(m, splits, ctx.data_cfg, step_cfg, ctx.rt, ctx.work_dir / tag, desc=f"prune-{tag}", section=NAME)
            m.cpu()

    with interrupt_message("pruning"):
        drop_blocks(model, cfg.drop_blocks)
        if cfg.method == "channel":
            model = _channel_prune(model, ctx, finetune)
        else:
            model = _magnitude_prune(model, ctx, finetune)
        acc_pruned = evaluate(model, splits.test_x, splits.test_y, ctx.data_cfg, ctx.rt)
        result = fit(model, splits, ctx.data_cfg, cfg, ctx.rt, ctx.work_dir / "final", desc="prune-finetune",
                     section=NAME)
    model = model.cpu()
    _make_permanent(model)
    test_acc = evaluate(model, splits.test_x, splits.test_y, ctx.data_cfg, ctx.rt)
    model = model.cpu()
    shapes = module_shapes(model) if cfg.method == "channel" or cfg.drop_blocks else {}
    save_checkpoint(ctx.out_dir / "model.pt", model.state_dict(), ctx.model_cfg, shapes=shapes)
    after = {"macs": count_macs(model, size), "params": count_params(model)}
    layers = layer_report(model)
    nz = sum(round(v["sparsity"] * torch.Size(v["shape"]).numel()) for v in layers.values())
    tot = sum(torch.Size(v["shape"]).numel() for v in layers.values())
    log.info("prune: %s ratio %.2f: MACs %.3g -> %.3g (%.2fx fewer), test acc %.2f%% -> %.2f%% (before fine-tune "
             "%.2f%%)", cfg.method, cfg.ratio, before["macs"], after["macs"], before["macs"] / after["macs"],
             before["test_acc"], test_acc, acc_pruned)
    return {
        "method": cfg.method, "ratio": cfg.ratio, "target_macs": cfg.target_macs, "dropped_blocks": cfg.drop_blocks,
        "test_acc": test_acc, "test_acc_before_finetune": acc_pruned, "val_acc": result.best_val_acc,
        "baseline": before, "params": after["params"], "macs": after["macs"],
        "macs_reduction": before["macs"] / after["macs"], "weight_sparsity": nz / tot,
        "layers": layers, "history": result.history,
    }
