"""ptq: post-training quantization, no training loop: a real INT8 model from a trained one and unlabeled images.

Reads: ``ptq.source`` (default ``train``). Writes ``model.pt`` in the qat stage's form (the quantized state dict
+ the float architecture, pruned shapes and quantization spec that rebuild it; ``export`` makes it an INT8 QDQ ONNX
model, report row ``ptq-int8``) and ``metrics.json``: accuracy of the FP32 input, after min/max calibration alone,
and after each step, with the seconds each took (``ptq.evaluate=final``: the quantized model's alone).
``qat.init=ptq`` starts QAT from this model.

Steps (``pipeline.ptq``), in this order: cross-layer equalization and high-bias absorption (``equalize``),
activation ranges (``ptq.range``: minmax | percentile | mse; always), adaptive rounding (``adaround``, within
``ptq.adaround_seconds``), empirical bias correction (``bias_correction``); then, with ``ptq.fallback_blocks``,
the blocks whose quantization costs most (label-free: agreement with the FP32 model's predictions) kept in FP32
and the steps run again on the model rebuilt with them. The quantization format (activation
type, weight bits, FP32 layers) is the qat stage's (``qat.act_dtype``, ``qat.weight_bits``, ``qat.float_layers``),
so both make the same kind of INT8 model. Labels are never read: the calibration images are the first
``ptq.calib_images`` of a seeded shuffle of the training split, or, with ``ptq.calib_folder``, up to that many
image files of a folder (any layout; a seeded choice where it holds more), read as evaluation reads an image
folder (``data.resize``, ``data.image_size``, ``data.mean``/``data.std``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import torch

from pipeline import inference, placement, ptq, quant
from pipeline.artifacts import CKPT_SHAPES, save_checkpoint
from pipeline.config import key_neutral, setting
from pipeline.data import IMAGE_SUFFIXES, batches, files_fingerprint, image_files, read_images
from pipeline.errors import PipelineError
from pipeline.models import build_model, count_macs, count_params, inside
from pipeline.results import QatResult
from pipeline.stage import GraphView, Stage, StageContext
from pipeline.training import evaluate

log = logging.getLogger(__name__)


@dataclass
class Config:
    """``conf/stages/ptq.yaml``."""

    source: str  # model stage to quantize: train | prune | distill
    steps: list[Literal["equalize", "bias_correction", "adaround"]]  # run in the order of pipeline.ptq.ORDER
    calib_images: int = setting(ge=1, msg="{value}; post-training quantization needs calibration images")
    calib_folder: str | None = key_neutral(None)  # images that calibrate (any layout); null: the training split
    batch_size: int = setting(ge=1)  # calibration images per forward pass
    range: Literal["minmax", "percentile", "mse"]  # how activation ranges are set from the calibration images
    percentile: float = setting(gt=50, le=100, msg="{value} must be a percentage {range}")
    bias_absorption: bool  # equalize: move the part of a bias a ReLU passes unchanged into the next conv
    adaround_seconds: float = setting(ge=0)  # time budget of adaptive rounding, all layers together
    adaround_iters: int = setting(ge=1)  # optimisation steps per layer at most
    adaround_images: int = setting(ge=1)  # of the calibration images (held in memory per layer)
    evaluate: Literal["steps", "final"] = key_neutral("steps")  # test accuracy after each step, or at the end only
    fallback_blocks: int = setting(ge=0)  # blocks kept FP32 by label-free sensitivity at most; 0: none
    fallback_agreement: float = setting(gt=0, le=100, msg="{value} must be a percentage {range}")  # top-1 agreement


def inputs(view: GraphView, node: str) -> dict[str, str]:
    return {"model": view.settings["ptq"].source}


def _qat_settings(view: GraphView) -> SimpleNamespace:
    """The quantization format, from ``qat.*`` (one definition for both stages); ``measure`` is qat's alone."""
    q = view.settings["qat"]
    return SimpleNamespace(act_dtype=q.act_dtype, weight_bits=q.weight_bits, observer_ema=q.observer_ema,
                           float_layers=[n for n in q.float_layers if n != placement.MEASURE], target=q.target)


def _calib_files(cfg: Config) -> list[Path]:
    """The image files under ``ptq.calib_folder``, sorted by path; a one-line error when there are none."""
    folder = Path(cfg.calib_folder).expanduser()
    use = "point it at a folder of calibration images (or null: the training split)"
    if folder.is_file():
        raise PipelineError(f"ptq.calib_folder={folder} is a file, not a folder; {use}")
    if not folder.is_dir():
        raise PipelineError(f"ptq.calib_folder={folder} does not exist; {use}")
    files = image_files(folder)
    if not files:
        raise PipelineError(f"ptq.calib_folder={folder} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                            "add images or set ptq.calib_folder=null (the training split)")
    return files


def check(view: GraphView) -> list[str]:
    cfg: Config = view.settings["ptq"]
    if cfg.calib_folder is not None:
        try:
            _calib_files(cfg)
        except PipelineError as e:
            return [str(e)]
    models = [s for s in view.all_model_stages() if s not in ("qat", "ptq")]
    if cfg.source not in models:
        return [f"ptq.source: {cfg.source!r} is not an FP32 model stage; choose one of {', '.join(models)}"]
    if view.settings.get("qat") is None:
        return []
    model = build_model(view.model.__dict__)
    try:
        gm = quant.prepare_qat(model, placement.base_spec(_qat_settings(view), model), view.data.image_size)
    except PipelineError as e:
        return [f"ptq: {e}"]
    if not quant.quantized_layers(gm):
        return ["qat.float_layers keeps every conv/linear in FP32; ptq has nothing to quantize"]
    return []


def key_extra(view: GraphView, node: str) -> dict:
    """The quantization format it takes from ``qat.*``, resolved (weight bits; ``auto`` FP32 layers by CPU), and
    the files of ``ptq.calib_folder`` as ``data.fingerprint`` reads data files (a changed image rebuilds)."""
    q = _qat_settings(view)
    extra = {"act_dtype": q.act_dtype, "weight_bits": placement.weight_bits(q)[0], "float_layers": q.float_layers,
             "observer_ema": q.observer_ema, "rewrite": quant.REWRITE}
    if getattr(q, "target", inference.DEFAULT) != inference.DEFAULT:  # its default leaves existing keys as they were
        extra["target"] = q.target
    cfg: Config = view.settings["ptq"]
    if cfg.fallback_blocks:  # the fallback algorithm: greedy set search
        extra["fallback"] = "greedy"
    if placement.AUTO in q.float_layers:
        extra["float_layers_auto"] = [platform.machine().lower(), quant.int8_dot_product() is not None]
    if cfg.calib_folder is not None:
        folder = Path(cfg.calib_folder).expanduser()
        extra["calib_files"] = files_fingerprint(folder, _calib_files(cfg), view.data.fingerprint)
    return extra


def _calibration_images(ctx: StageContext) -> list[torch.Tensor]:
    """Normalised batches of at most ``ptq.calib_images`` images: of ``ptq.calib_folder`` (a seeded choice where it
    holds more), else the first of a seeded shuffle of the training split."""
    cfg: Config = ctx.settings
    if cfg.calib_folder is not None:
        files = _calib_files(cfg)
        if len(files) > cfg.calib_images:
            pick = torch.randperm(len(files), generator=torch.Generator().manual_seed(ctx.rt.seed))
            files = [files[i] for i in pick[: cfg.calib_images].sort().values.tolist()]
        log.info("ptq: calibration images: %d files of %s", len(files), cfg.calib_folder)
        x = read_images(files, ctx.data_cfg)
        return [xb for xb, _ in batches(x, torch.zeros(len(x), dtype=torch.int64), ctx.data_cfg, cfg.batch_size,
                                        device=ctx.rt.device, channels_last=ctx.rt.channels_last)]
    splits = ctx.splits()
    out, n = [], 0
    for xb, _ in batches(splits.train_x, splits.train_y, ctx.data_cfg, cfg.batch_size, shuffle=True,
                         seed=ctx.rt.seed, device=ctx.rt.device, channels_last=ctx.rt.channels_last):
        out.append(xb[: cfg.calib_images - n])
        n += len(out[-1])
        if n >= cfg.calib_images:
            break
    return out


def _fallback(ctx: StageContext, model: torch.nn.Module, qspec: quant.QuantSpec, gm, images: list[torch.Tensor],
              settings: ptq.PtqSettings, report: ptq.PtqReport, acc) -> tuple:
    """``ptq.fallback_blocks``: the most sensitive blocks (``ptq.fallback.choose`` over ``placement.leading_blocks``)
    kept FP32, and the steps run again on the model rebuilt with them; its entry in the steps' metrics says what it
    chose and measured."""
    cfg: Config = ctx.settings
    t = time.perf_counter()
    blocks = [b for b in placement.leading_blocks(gm, model) if not inside(b, qspec.float_layers)]
    fb = ptq.fallback.choose(gm, images, blocks, cfg.fallback_blocks, cfg.fallback_agreement, ctx.rt.progress)
    entry: dict = {"step": "fallback", "blocks": fb.blocks, "agreement_before": round(fb.agreement_before, 2),
                   "agreement_target": cfg.fallback_agreement, "kl_before": round(fb.kl_before, 5),
                   "ranking": [[n, round(d, 5)] for n, d in fb.ranking[:20]],
                   "path": [[n, round(a, 2)] for n, a in fb.path]}
    if not fb.blocks:
        why = "already agrees" if fb.agreement_before >= cfg.fallback_agreement else "no block lowers the error"
        log.info("ptq: fallback: none (top-1 agreement with FP32 on the calibration images %.2f%%, target %.2f%%: "
                 "%s)", fb.agreement_before, cfg.fallback_agreement, why)
        entry["seconds"] = round(time.perf_counter() - t, 2)
        report.steps.append(entry)
        return gm, qspec, report
    qspec = qspec.keeping_fp32(fb.blocks)
    gm = quant.prepare_qat(copy.deepcopy(model), qspec, ctx.data_cfg.image_size).to(ctx.rt.device)
    again = ptq.run_ptq(gm, images, settings, progress=ctx.rt.progress)
    entry["agreement_after"] = round(ptq.fallback.agreement(gm, images), 2)
    entry["seconds"] = round(time.perf_counter() - t, 2)
    entry["steps_again"] = again.steps
    if acc is not None:
        entry["test_acc"] = acc(gm)
    if entry["agreement_after"] < cfg.fallback_agreement:
        log.warning("ptq: fallback: with %d of at most %d blocks in FP32 the top-1 agreement is %.2f%%, below "
                    "ptq.fallback_agreement=%g; raise ptq.fallback_blocks to keep more", len(fb.blocks),
                    cfg.fallback_blocks, entry["agreement_after"], cfg.fallback_agreement)
    log.info("ptq: fallback: " + ", ".join(f"{k} {v}" for k, v in entry.items()
                                           if k not in ("step", "ranking", "path", "steps_again")))
    log.info("ptq: fallback: agreement after each block in the probe: %s",
             ", ".join(f"{n} {a:.2f}%" for n, a in fb.path))
    report.steps.append(entry)
    report.relu6_as_relu = again.relu6_as_relu
    return gm, qspec, report


def run(ctx: StageContext) -> QatResult:
    cfg: Config = ctx.settings
    start = time.perf_counter()
    splits = ctx.splits()
    src = ctx.inputs["model"]
    ckpt = src.checkpoint()
    model, _ = src.model()
    qat = SimpleNamespace(**ctx.extra)  # the format, resolved in key_extra
    qspec = placement.base_spec(qat, model)

    def acc(m: torch.nn.Module) -> float:
        return evaluate(m, splits.test_x, splits.test_y, ctx.data_cfg, ctx.rt)

    steps = cfg.evaluate == "steps"
    fp32_acc = acc(model) if steps else None
    images = _calibration_images(ctx)
    n_images = sum(len(x) for x in images)
    calib_acc = None
    if steps:
        plain = quant.prepare_qat(copy.deepcopy(model), qspec, ctx.data_cfg.image_size).to(ctx.rt.device)
        ptq.set_ranges(plain, images, "minmax")
        calib_acc = acc(plain)
        del plain
        log.info("ptq: FP32 input %.2f%%, min/max calibration alone on %d images %.2f%%", fp32_acc, n_images,
                 calib_acc)
    gm = quant.prepare_qat(copy.deepcopy(model), qspec, ctx.data_cfg.image_size).to(ctx.rt.device)
    settings = ptq.PtqSettings(steps=cfg.steps, range=cfg.range, percentile=cfg.percentile,
                               bias_absorption=cfg.bias_absorption, adaround_seconds=cfg.adaround_seconds,
                               adaround_iters=cfg.adaround_iters, adaround_images=cfg.adaround_images)
    report = ptq.run_ptq(gm, images, settings, evaluate=acc if steps else None, progress=ctx.rt.progress,
                         log=lambda line: log.info("ptq: %s", line))
    if cfg.fallback_blocks:
        gm, qspec, report = _fallback(ctx, model, qspec, gm, images, settings, report, acc if steps else None)
    qspec = dataclasses.replace(qspec, relu6_as_relu=tuple(report.relu6_as_relu))
    quantize_seconds = time.perf_counter() - start
    test_acc = next(s["test_acc"] for s in reversed(report.steps) if "test_acc" in s) if steps else acc(gm)
    gm = gm.cpu()
    save_checkpoint(ctx.out_dir / "model.pt", gm.state_dict(), ckpt["model_cfg"], shapes=ckpt[CKPT_SHAPES],
                    extra={"quant": dataclasses.asdict(qspec)})
    seconds = time.perf_counter() - start
    if steps:
        log.info("ptq: test accuracy %.2f%% (FP32 input %.2f%%, min/max calibration %.2f%%), %.1f s", test_acc,
                 fp32_acc, calib_acc, seconds)
    else:
        log.info("ptq: test accuracy %.2f%%, %.1f s (%.1f s before the test-set evaluation)", test_acc, seconds,
                 quantize_seconds)
    bits_reason = placement.weight_bits(qat)[1]
    return QatResult(test_acc=test_acc, params=count_params(model), macs=count_macs(model, ctx.data_cfg.image_size),
                     source=src.node, weight_bits=qspec.weight_bits, weight_bits_reason=bits_reason,
                     extra={"test_acc_fp32_input": fp32_acc, "test_acc_calibration": calib_acc,
                            "calibration_images": n_images, "steps": report.steps, "seconds": round(seconds, 1),
                            "seconds_quantize": round(quantize_seconds, 1),
                            "quant": dataclasses.asdict(qspec), "quantized_layers": len(quant.quantized_layers(gm)),
                            "float_ops": quant.float_ops(gm)})


STAGE = Stage(name="ptq", config=Config, run=run, outputs=("model.pt",), inputs=inputs, produces_model=True,
              main_only=True, trains=True, check=check, key_extra=key_extra, result=QatResult)
