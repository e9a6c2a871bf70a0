"""prune: make the baseline smaller, unstructured (magnitude) or structured (channels removed).

Reads: ``train`` (the FP32 baseline). Writes: ``model.pt`` (pruned weights + the pruned layer
shapes, so ``weights_only`` loading can rebuild it), ``metrics.json`` (MACs/params before and
after, per-layer channels or sparsity, accuracy before and after fine-tuning and, with
``prune.bn_adapt_batches``, after batch-norm adaptation).

``prune.ratio`` is always the fraction *removed*: of each layer's channels (``method=channel``,
Torch-Pruning's dependency graph keeps residual adds, depthwise convs, BN and the classifier
consistent) or of the weights (``method=magnitude``, masks made permanent; dense ONNX Runtime does
not run these faster). ``prune.target_macs`` instead removes channels until the MACs budget is met.
``prune.drop_blocks`` first removes whole residual blocks (depth pruning): on CPUs the full-resolution
stage costs far more time per MAC than the deeper ones, and channels alone cannot shrink it enough.
The algorithms live in ``pipeline.pruning``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import pruning
from pipeline.artifacts import save_checkpoint
from pipeline.config import key_neutral, setting
from pipeline.data import batches
from pipeline.models import build_model, count_macs, count_params, module_shapes, unknown_layer_errors
from pipeline.stage import GraphView, Stage, StageContext
from pipeline.training import FitConfig, adapt_batch_norm_for, evaluate, fit, interrupt_message

log = logging.getLogger(__name__)


@dataclass
class Config(FitConfig):
    """``conf/stages/prune.yaml``; the FitConfig fields are the final fine-tune."""

    method: Literal["channel", "magnitude"]
    # fraction removed: channels per layer (channel) or weights (magnitude)
    ratio: float = setting(ge=0, lt=1, msg="{value} must be {range} (the fraction removed)")
    target_macs: float | None = setting(gt=0)  # channel only: prune until MACs <= this (overrides ratio)
    importance: Literal["l1", "l2", "bn_scale", "taylor"]  # channel importance criterion
    global_pruning: bool  # rank channels / weights across layers instead of per layer
    keep_first_conv: bool  # never prune the stem's output channels
    exclude: list[str]  # module names never pruned (classifier always kept)
    drop_blocks: list[str]  # residual blocks replaced by identity (depth pruning)
    steps: int = setting(ge=1)  # 1 = one-shot; N = iterative, fine-tuning step_epochs between steps
    step_epochs: int = setting(ge=0)
    # keep channel counts multiples of this (ORT's FP32 conv blocks are 8 wide)
    round_to: int | None = setting(ge=1, msg="{value} must be {range} (or null)")
    whole_heads: bool  # attention: remove whole heads instead of narrowing every head
    taylor_batches: int = setting(ge=1)  # batches of gradients for taylor importance
    # > 0: batch-norm statistics re-estimated on this many unaugmented training batches after pruning
    bn_adapt_batches: int = key_neutral(0, ge=0)

    def check(self) -> list[str]:
        errs = []
        if self.target_macs is not None and self.method != "channel":
            errs.append("target_macs: only for prune.method=channel")
        return errs


def inputs(view: GraphView, node: str) -> dict[str, str]:
    return {"model": "train"}


def check(view: GraphView) -> list[str]:
    """Checks that need the model (before any training)."""
    cfg: Config = view.settings["prune"]
    model = build_model(view.model.__dict__)
    model_name = view.model.name or view.model.target
    errs = [e for key in ("exclude", "drop_blocks")
            for e in unknown_layer_errors(f"prune.{key}", getattr(cfg, key), model, model_name)]
    errs += [f"prune.exclude: {n!r} lies inside the dropped block {b!r}; remove one of them"
             for n in cfg.exclude for b in cfg.drop_blocks if n.startswith(b + ".")]
    if cfg.drop_blocks and not errs:
        shapes = pruning.block_shapes(model, cfg.drop_blocks, view.data.image_size)
        errs += [f"prune.drop_blocks: {n!r} changes the tensor shape ({a} -> {b}); only blocks whose output has "
                 "the shape of their input (identity shortcut) can be dropped"
                 for n, (a, b) in shapes.items() if a != b]
    if cfg.method == "channel" and not errs and (
            why := pruning.dependency_problem(model, view.data.image_size)):
        errs.append(f"prune.method: channel pruning cannot analyse {model_name} (Torch-Pruning: {why}); use "
                    "prune.method=magnitude, or leave prune out with pipeline=[train,distill,qat,export,validate] "
                    "distill.student=train")
    if cfg.target_macs is not None:
        macs = count_macs(model, view.data.image_size)
        if cfg.target_macs >= macs:
            errs.append(f"prune.target_macs: {cfg.target_macs:.4g} is not below the model's {macs:.4g} MACs; "
                        f"use a smaller budget, e.g. prune.target_macs={macs / 2:.3g}")
    return errs


def _taylor_grads(ctx: StageContext, n_batches: int):
    """``grads(model)``: gradients of the loss on a few training batches, BN statistics untouched."""
    def grads(model: nn.Module) -> None:
        splits = ctx.splits()
        was_training = model.training
        model.eval()
        model.zero_grad()
        it = batches(splits.train_x, splits.train_y, ctx.data_cfg, 64, shuffle=True, seed=ctx.rt.seed)
        for i, (xb, yb) in enumerate(it):
            if i == n_batches:
                break
            F.cross_entropy(model(xb), yb).backward()
        model.train(was_training)

    return grads


def run(ctx: StageContext) -> dict:
    cfg: Config = ctx.settings
    splits = ctx.splits()
    model, _ = ctx.inputs["model"].model()
    size = ctx.data_cfg.image_size
    before = {"macs": count_macs(model, size), "params": count_params(model),
              "test_acc": ctx.inputs["model"].result.test_acc}

    def finetune(m: nn.Module, epochs: int, tag: str) -> None:
        if epochs > 0:
            step_cfg = Config(**{**cfg.__dict__, "epochs": epochs})
            fit(m, splits, ctx.data_cfg, step_cfg, ctx.rt, ctx.work_dir / tag, desc=f"prune-{tag}", section="prune",
                side=True)  # iterative steps: epochs spent, the final fine-tune's accuracy is the stage's
            m.cpu()

    unprunable: dict[str, str] = {}  # layers channel pruning keeps because Torch-Pruning cannot prune them, and why
    with interrupt_message("pruning"):
        taylor = cfg.method == "channel" and cfg.importance == "taylor"
        grads = _taylor_grads(ctx, cfg.taylor_batches) if taylor else None
        model = pruning.prune_architecture(model, cfg, size, finetune, grads, unprunable)
        acc_pruned = evaluate(model, splits.test_x, splits.test_y, ctx.data_cfg, ctx.rt)
        adapted = {}
        if cfg.bn_adapt_batches:
            adapted["test_acc_bn_adapted"] = adapt_batch_norm_for(model, splits, ctx.data_cfg, ctx.rt,
                                                                  cfg.bn_adapt_batches, cfg.batch_size, "prune")
        result = fit(model, splits, ctx.data_cfg, cfg, ctx.rt, ctx.work_dir / "final", desc="prune-finetune",
                     section="prune")
    model = model.cpu()
    pruning.make_permanent(model)
    test_acc = evaluate(model, splits.test_x, splits.test_y, ctx.data_cfg, ctx.rt)
    model = model.cpu()
    shapes = module_shapes(model) if cfg.method == "channel" or cfg.drop_blocks else {}
    save_checkpoint(ctx.out_dir / "model.pt", model.state_dict(), ctx.model_cfg, shapes=shapes)
    after = {"macs": count_macs(model, size), "params": count_params(model)}
    layers = pruning.layer_report(model)
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
        "layers": layers, "kept_unprunable": unprunable, "history": result.history, **adapted,
        **result.resume_info(),
    }


STAGE = Stage(name="prune", config=Config, run=run, outputs=("model.pt",), inputs=inputs, produces_model=True,
              trains=True, check=check)
