"""qat: quantization-aware training towards a real INT8 model.

Reads: ``qat.source`` (default ``distill``; built first when it has no artifact), with ``qat.init=ptq`` the
``ptq`` stage's model as the start (instead of min/max calibration) and, with ``qat.distill_alpha > 0``, ``train``
as teacher. Writes ``model.pt`` (the QAT state dict + the float
architecture, pruned shapes and quantization spec that rebuild it) and ``metrics.json`` (accuracy of
the FP32 input, with ``qat.bn_adapt_batches`` after its batch-norm statistics were re-estimated, after
calibration only (PTQ) and after QAT).

Steps: (re-estimate batch-norm statistics) -> fuse conv-bn(-relu) -> per-channel symmetric weights, UINT8
activations -> calibrate the observers on real training batches -> fake-quant fine-tuning -> freeze BN
statistics and observers after the configured epochs. ``qat.float_layers`` keeps named layers in FP32 (mixed precision),
e.g. narrow full-resolution layers where ORT's INT8 convs are slower than FP32. The quantization
itself lives in ``pipeline.quant``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal

from torch import nn

from pipeline import inference, placement, quant
from pipeline.artifacts import CKPT_EXTRA, CKPT_SHAPES, save_checkpoint
from pipeline.config import key_neutral, setting
from pipeline.data import batches
from pipeline.distillation import KDLoss, freeze_teacher
from pipeline.errors import PipelineError
from pipeline.models import build_model, count_macs, count_params, unknown_layer_errors
from pipeline.results import QatResult
from pipeline.stage import GraphView, Stage, StageContext
from pipeline.training import FitConfig, adapt_batch_norm_for, evaluate, fit, interrupt_message

log = logging.getLogger(__name__)


@dataclass
class Config(FitConfig):
    """``conf/stages/qat.yaml``; FitConfig fields drive the fake-quant fine-tuning."""

    source: str  # model stage to quantize: distill | prune | train
    init: Literal["calibration", "ptq"]  # QAT's start: min/max calibration, or the ptq stage's model
    act_dtype: Literal["uint8", "int8"]  # activations; uint8 is what x86 ORT kernels want
    weight_bits: Literal[7, 8, "auto"]  # 7 avoids u8*s8 saturation on AVX2 CPUs without VNNI; 8 for VNNI/ARM
    # training batches (unaugmented) that calibrate the observers
    calib_batches: int = setting(ge=1, msg="{value}; calibration needs at least one batch")
    calib_batch_size: int = setting(ge=1)
    # > 0: batch-norm statistics re-estimated on this many unaugmented training batches before calibration
    bn_adapt_batches: int = key_neutral(0, ge=0)
    observer_ema: float = setting(gt=0, le=1)  # moving-average constant of the activation ranges during QAT
    freeze_bn_epoch: int  # from this epoch on, BN statistics are frozen (folded with running stats)
    freeze_observer_epoch: int  # from this epoch on, activation ranges are frozen
    distill_alpha: float = setting(ge=0, le=1)  # > 0: distil from the FP32 teacher during QAT (KD weight)
    temperature: float = setting(gt=0)
    float_layers: list[str]  # module names kept in FP32; "auto": the CPU rule; "measure": a timed search
    measure_batch: int = setting(ge=1)  # batch size the "measure" placements are timed at
    # the runtime whose INT8 patterns the quantizers are placed for: onnxruntime | openvino
    target: Literal["onnxruntime", "openvino"] = key_neutral("onnxruntime")


def inputs(view: GraphView, node: str) -> dict[str, str]:
    cfg: Config = view.settings["qat"]
    out = {"model": cfg.source}
    if cfg.init == "ptq":
        out["init"] = "ptq"
    if cfg.distill_alpha > 0:
        out["teacher"] = "train"
    return out


def check(view: GraphView) -> list[str]:
    cfg: Config = view.settings["qat"]
    models = [s for s in view.all_model_stages() if s not in ("qat", "ptq")]
    if cfg.source not in models:
        return [f"qat.source: {cfg.source!r} is not a model stage; choose one of {', '.join(models)}"]
    if cfg.target != inference.DEFAULT:
        try:  # its placement is checked (export) and timed (float_layers=[measure]) on that runtime
            inference.get(cfg.target)
        except PipelineError as e:
            return [f"qat.target={cfg.target}: {e}"]
    if cfg.init == "ptq":
        ptq = view.settings.get("ptq")
        if ptq is not None and ptq.source != cfg.source:
            return [f"qat.init=ptq starts from the ptq stage's model of ptq.source={ptq.source}, but qat.source="
                    f"{cfg.source}; set both to the same stage"]
        if cfg.bn_adapt_batches:
            return [f"qat.bn_adapt_batches={cfg.bn_adapt_batches} adapts the float model before calibration; with "
                    "qat.init=ptq QAT starts from the ptq model: set qat.bn_adapt_batches=0"]
        if placement.MEASURE in cfg.float_layers:
            return ["qat.init=ptq takes the ptq stage's FP32 layers; qat.float_layers=[measure] needs qat.init="
                    "calibration"]
    model = build_model(view.model.__dict__)
    errs = unknown_layer_errors("qat.float_layers", [n for n in cfg.float_layers if n not in placement.TOKENS], model,
                                view.model.name or view.model.target)
    if errs:
        return [f"{e}, or the tokens {' and '.join(placement.TOKENS)}" for e in errs]
    try:  # unsupported layers are reported before any training starts
        gm = quant.prepare_qat(model, placement.base_spec(cfg, model), view.data.image_size)
    except PipelineError as e:
        return [f"qat: {e}"]
    if not quant.quantized_layers(gm):
        return [f"qat.float_layers: {cfg.float_layers} keeps every conv/linear in FP32; nothing is left to quantize"]
    return []


def key_extra(view: GraphView, node: str) -> dict | None:
    """``auto`` settings mean another model on another CPU: the key holds the resolved bits, the version of the
    QAT rewrite (``quant.REWRITE``) and, for
    ``float_layers=[auto]``, the rule's version and the CPU architecture it resolves for; for ``[measure]``
    the CPU model and flags it was timed on."""
    import platform

    from pipeline.env import BF16_FLAGS, cpu_info

    cfg: Config = view.settings["qat"]
    extra: dict = {"weight_bits": placement.weight_bits(cfg)[0], "rewrite": quant.REWRITE}
    if placement.AUTO in cfg.float_layers:
        extra["float_layers_auto"] = [FLOAT_AUTO_RULE, platform.machine().lower(), quant.int8_dot_product() is not None]
    if placement.MEASURE in cfg.float_layers:
        cpu = cpu_info()
        # the flags it was timed with (the bf16 flags do not change an ONNX Runtime timing; OpenVINO's float is bf16)
        flags = cpu["flags"] if cfg.target != inference.DEFAULT else [f for f in cpu["flags"] if f not in BF16_FLAGS]
        extra["float_layers_measure"] = [cpu["cpu"], cpu["cores"], flags]
    return extra


FLOAT_AUTO_RULE = 3  # version of quant.narrow_convs' rule (2: widen to the block; 3: none with VNNI)
DIVERGED_POINTS = 5.0  # QAT that ends this far below its calibrated (PTQ) start is reported as diverged


def divergence_note(test_acc: float, ptq_acc: float) -> str | None:
    """A warning when QAT ended far below its calibrated start (it diverged), else None."""
    if test_acc >= ptq_acc - DIVERGED_POINTS:
        return None
    return (f"training ended {ptq_acc - test_acc:.1f} points below its calibrated start (PTQ {ptq_acc:.2f}%): "
            "it diverged; lower qat.lr (training with frozen batch norm needs about 1e-3 on a converged model) "
            "or set qat.select=best")


def _epoch_hook(cfg: Config):
    def hook(epoch: int, model: nn.Module) -> None:
        if epoch >= cfg.freeze_bn_epoch:
            quant.freeze_bn(model)
        if epoch >= cfg.freeze_observer_epoch:
            quant.freeze_observers(model)

    return hook


def _ptq_start(ctx: StageContext) -> tuple[nn.Module, quant.QuantSpec]:
    """``qat.init=ptq``: the ptq stage's model and spec. Its corrections live in the folded weights and biases, so
    batch norm stays frozen (folded with its running statistics) from the start; the activation ranges follow
    ``qat.freeze_observer_epoch`` as after calibration."""
    art = ctx.inputs["init"]
    gm, _ = art.model()
    qspec = quant.QuantSpec(**art.checkpoint()[CKPT_EXTRA]["quant"])
    quant.freeze_bn(gm)
    for a in quant.act_quants(gm):
        a.observe = not isinstance(a, quant.FixedQuant)
    return gm.to(ctx.rt.device), qspec


def run(ctx: StageContext) -> dict:
    cfg: Config = ctx.settings
    rt = dataclasses.replace(ctx.rt, amp="off")  # fake-quant runs in FP32
    splits = ctx.splits()
    src = ctx.inputs["model"]
    ckpt = src.checkpoint()
    model, _ = src.model()
    qspec, placed = placement.base_spec(cfg, model), None
    if placement.MEASURE in cfg.float_layers:  # timed by rank 0 alone (ONNX Runtime on the CPU), then shared
        if rt.is_main:
            images, _ = next(iter(batches(splits.train_x, splits.train_y, ctx.data_cfg, cfg.calib_batch_size,
                                          device="cpu")))
            placed = placement.measure(model, qspec, ctx.data_cfg.image_size, images, cfg.measure_batch,
                                       progress=rt.progress)
            for line in placed.lines():
                log.info("qat: placement %s", line)
            log.info("qat: measured placement: %s", placed.summary())
            if advice := placed.advice():
                log.warning("qat: %s", advice)
        placed = rt.from_main(placed)
        qspec = qspec.keeping_fp32(placed.float_layers)
    bits_reason = placement.weight_bits(cfg)[1]
    log.info("qat: %d-bit weights (%s)%s", qspec.weight_bits, bits_reason,
             f"; FP32 layers: {', '.join(qspec.float_layers)}" if qspec.float_layers else "")
    fp32_acc = evaluate(model, splits.test_x, splits.test_y, ctx.data_cfg, rt)
    extra: dict = {}
    if cfg.init == "ptq":
        gm, qspec = _ptq_start(ctx)
        ptq_acc = evaluate(gm, splits.test_x, splits.test_y, ctx.data_cfg, rt)
        log.info("qat: FP32 input %.2f%%, start: the ptq model (%s) %.2f%%", fp32_acc, ctx.inputs["init"].path,
                 ptq_acc)
    else:
        if cfg.bn_adapt_batches:
            extra["test_acc_bn_adapted"] = adapt_batch_norm_for(model, splits, ctx.data_cfg, rt, cfg.bn_adapt_batches,
                                                                cfg.calib_batch_size, "qat")
        gm = quant.prepare_qat(model, qspec, ctx.data_cfg.image_size)
        calib = batches(splits.train_x, splits.train_y, ctx.data_cfg, cfg.calib_batch_size, shuffle=True,
                        seed=rt.seed, device=rt.device, channels_last=rt.channels_last)
        gm.to(rt.device)
        n = quant.calibrate(gm, (b for i, b in zip(range(cfg.calib_batches), calib, strict=False)))
        ptq_acc = evaluate(gm, splits.test_x, splits.test_y, ctx.data_cfg, rt)
        log.info("qat: FP32 input %.2f%%, after calibration on %d batches (PTQ) %.2f%%", fp32_acc, n, ptq_acc)
    n_quantized = len(quant.quantized_layers(gm))
    floats = quant.float_ops(gm)
    if floats:
        log.info("qat: %d convs/linears quantized; float between DequantizeLinear and QuantizeLinear: %s", n_quantized,
                 "; ".join(f"{k} x{len(v)}" for k, v in floats.items()))

    loss_fn = None
    if cfg.distill_alpha > 0:
        teacher = freeze_teacher(ctx.inputs["teacher"].model()[0], rt)
        loss_fn = KDLoss(teacher, alpha=cfg.distill_alpha, temperature=cfg.temperature,
                         label_smoothing=cfg.label_smoothing)
    with interrupt_message("quantization-aware training"):
        res = fit(gm, splits, ctx.data_cfg, cfg, rt, ctx.work_dir, loss_fn=loss_fn, desc="qat",
                  on_epoch_start=_epoch_hook(cfg))
    quant.freeze_bn(gm)
    quant.freeze_observers(gm)
    test_acc = evaluate(gm, splits.test_x, splits.test_y, ctx.data_cfg, rt)
    gm = gm.cpu()
    save_checkpoint(ctx.out_dir / "model.pt", gm.state_dict(), ckpt["model_cfg"], shapes=ckpt[CKPT_SHAPES],
                    extra={"quant": dataclasses.asdict(qspec)})
    log.info("qat: test accuracy %.2f%% (FP32 input %.2f%%, PTQ %.2f%%)", test_acc, fp32_acc, ptq_acc)
    note = divergence_note(test_acc, ptq_acc)
    if note:
        log.warning("qat: %s", note)
    return {"test_acc": test_acc, "test_acc_fp32_input": fp32_acc, "test_acc_ptq": ptq_acc,
            "val_acc": res.best_val_acc, "source": src.node, "quant": dataclasses.asdict(qspec),
            "quantized_layers": n_quantized, "float_ops": floats,
            "weight_bits": qspec.weight_bits, "weight_bits_reason": bits_reason,
            **({"placement": placed.as_dict()} if placed else {}),
            "params": count_params(model), "macs": count_macs(model, ctx.data_cfg.image_size),
            "history": res.history, **extra, **res.resume_info()}


STAGE = Stage(name="qat", config=Config, run=run, outputs=("model.pt",), inputs=inputs, produces_model=True,
              trains=True, check=check, key_extra=key_extra, result=QatResult)
