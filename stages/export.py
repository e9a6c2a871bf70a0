"""export: every model the pipeline made -> ONNX (FP32, or a real INT8 QDQ model for qat).

Node ``export/<stage>`` reads that stage's ``model.pt`` and writes ``model.onnx`` plus
``metrics.json`` with the parity check against PyTorch on real test images (max abs logit
difference and top-1 agreement) and, for INT8, ORT's INT8 kernel coverage. Optional nodes:
``export/ort_static`` (ORT's own static quantization of the model that entered QAT, the reference
a user would try instead) and ``export/<stage>_fp16`` for the stages in ``export.fp16`` (FP16
weights and compute for GPUs, float32 inputs and outputs).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline import deploy, inference, onnxio, placement, quant
from pipeline.config import not_in_key, setting
from pipeline.inference import ort_quantize
from pipeline.results import ExportResult, Parity
from pipeline.stage import GraphView, Stage, StageContext

log = logging.getLogger(__name__)

# what an export node makes (Stage.kind): the model stage's own precision (FP32, or INT8 QDQ for a quantized
# model), an FP16 copy of an FP32 model, or ONNX Runtime's static quantization of the model that entered QAT
MODEL, FP16, ORT_STATIC = "model", "fp16", "ort_static"
QUANTIZERS = ("qat", "ptq")  # the stages whose model is INT8
FP16_SUFFIX = "_fp16"


@dataclass
class Config:
    """``conf/stages/export.yaml``."""

    # ONNX opset (>= 18 for the QDQ translations)
    opset: int = setting(ge=18, msg="{value} is too old for the QDQ translations (opset 18); use 18 or newer")
    parity_images: int = setting(ge=1, msg="use at least 1")  # test images used for the PyTorch-vs-ORT parity check
    # gate, %: below this the export fails
    min_top1_agreement: float = not_in_key(ge=0, le=100, msg="{value} must be a percentage {range}")
    # gate: share of the quantized convs/matmuls ORT must run in INT8
    min_int8_coverage: float = not_in_key(ge=0, le=1, msg="{value} must be a fraction {range}")
    ort_static_reference: bool = not_in_key()  # adds the export/ort_static node (its own key)
    # export/ort_static only (in that node's key_extra)
    calib_images: int = not_in_key(ge=1, msg="{value}; ORT static quantization needs calibration images")
    fp16: list[str] = not_in_key()  # adds export/<stage>_fp16 nodes (each with its own key)
    embed_preprocessing: bool  # also write model_uint8.onnx: uint8 NHWC pixels in, normalisation inside


def plan(view: GraphView) -> dict[str, tuple[str, str]]:
    """Every export node with what it makes and from which stage: ``export/<stage>`` per model stage, the ORT
    static reference, the FP16 exports. The one place export nodes are declared."""
    cfg: Config = view.settings["export"]
    models = view.model_stages()
    out = {f"export/{s}": (MODEL, s) for s in models}
    quantized = next((s for s in QUANTIZERS if s in models), None)
    if quantized and cfg.ort_static_reference:  # of the FP32 model that entered qat (or ptq)
        out[f"export/{ORT_STATIC}"] = (ORT_STATIC, quantized)
    return out | {f"export/{s}{FP16_SUFFIX}": (FP16, s) for s in cfg.fp16 if s in models}


def nodes(view: GraphView) -> list[str]:
    return list(plan(view))


def kind(view: GraphView, node: str) -> str:
    return plan(view)[node][0]


def inputs(view: GraphView, node: str) -> dict[str, str]:
    what, src = plan(view).get(node) or (MODEL, node.partition("/")[2])
    if what == ORT_STATIC:  # the FP32 ONNX of the model that entered QAT
        return {"model": f"export/{view.inputs_of(src)['model']}"}
    return {"model": src}


def check(view: GraphView) -> list[str]:
    stages = [s for s in view.model_stages() if s not in QUANTIZERS]
    return [f"export.fp16: {s!r} is not an FP32 model stage of the pipeline; choose from {', '.join(stages)}"
            for s in view.settings["export"].fp16 if s not in stages]


def key_extra(view: GraphView, node: str) -> dict | None:
    """ORT's static quantization follows the qat settings (activation type, weight bits) and calib_images."""
    if kind(view, node) == ORT_STATIC:
        qat, cfg = view.settings["qat"], view.settings["export"]
        return {"act_dtype": qat.act_dtype, "weight_bits": placement.weight_bits(qat)[0],
                "calib_images": cfg.calib_images}
    return None


def gate(cfg: Config, node: str, result: ExportResult) -> list[str]:
    """Checks of an export (new or reused) against the gates, which are not part of its key."""
    failures: list[str] = []
    if result.kind == ORT_STATIC:  # the reference row is reported, never gated
        return failures
    cov = result.target_coverage or result.int8_coverage  # on the runtime the model was placed for
    if cov and _layer_kernels(cov) < cfg.min_int8_coverage * cov["quantized_layers"]:
        failures.append(
            f"{node}: only {_layer_kernels(cov)} of the {cov['quantized_layers']} quantized convs/matmuls run as "
            f"INT8 kernels in {result.target or 'ONNX Runtime'} (float: {cov['float_ops']}); the model is not "
            f"really INT8 (export.min_int8_coverage={cfg.min_int8_coverage})")
    pre = result.preprocessing_parity
    if pre and pre.top1_agreement < cfg.min_top1_agreement:
        failures.append(f"{node}: the model with embedded preprocessing agrees with the float-input model on only "
                        f"{pre.top1_agreement:.2f}% of top-1 predictions (export.min_top1_agreement="
                        f"{cfg.min_top1_agreement})")
    tpar = result.target_parity
    if tpar and tpar.top1_agreement < cfg.min_top1_agreement:
        failures.append(
            f"{node}: {result.target} (qat.target) agrees with PyTorch on only {tpar.top1_agreement:.2f}% of top-1 "
            f"predictions (export.min_top1_agreement={cfg.min_top1_agreement}): its INT8 kernels round differently "
            "from the QDQ graph and this model amplifies the difference; quantize for onnxruntime, or keep the "
            "sensitive blocks FP32 (qat.float_layers)")
    agreement = result.parity.top1_agreement
    if agreement < cfg.min_top1_agreement:
        note = requantized_note(cov) if cov else None
        why = f" ({note})" if note else "; the exported model is wrong"
        failures.append(
            f"{node}: ONNX Runtime agrees with PyTorch on only {agreement:.2f}% of top-1 predictions "
            f"(export.min_top1_agreement={cfg.min_top1_agreement}){why}")
    return failures


def _layer_kernels(cov: dict) -> int:
    """INT8 kernels that run layers: attention's quantized activation matmuls are kernels but no layers."""
    return cov["int8_kernels"] - cov.get("activation_matmuls", 0)


def requantized_note(cov: dict) -> str | None:
    """Why ORT runs more INT8 kernels than were quantized (it quantized layers meant to stay FP32), or None."""
    n = _layer_kernels(cov) - cov["quantized_layers"]
    if n <= 0:
        return None
    return (f"ONNX Runtime quantized {n} layer(s) kept FP32 by qat.float_layers itself: its WeightBiasQuantization "
            "makes a lone float Conv/Gemm between DequantizeLinear and QuantizeLinear per-tensor INT8, which QAT "
            "did not train for; keep whole blocks FP32 instead (e.g. qat.float_layers=[conv1,layer1])")


class _Float16(nn.Module):
    """FP16 weights and compute behind float32 inputs and outputs (one Cast at each end)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


def _ort_static(ctx: StageContext) -> tuple[ExportResult, np.ndarray]:
    """Reference row: ONNX Runtime's own static QDQ quantization of the FP32 model that entered QAT."""
    cfg: Config = ctx.settings
    src = ctx.inputs["model"]
    splits = ctx.splits()
    calib = onnxio.normalise(splits.train_x[torch.randperm(len(splits.train_y), generator=torch.Generator()
                                                           .manual_seed(ctx.rt.seed))[: cfg.calib_images]],
                             ctx.data_cfg.mean, ctx.data_cfg.std)
    path = ctx.out_dir / "model.onnx"
    start = time.perf_counter()
    ort_quantize.static_quantize(src.path / "model.onnx", path, calib, ctx.extra["act_dtype"],
                               ctx.extra["weight_bits"], ctx.work_dir)
    seconds = round(time.perf_counter() - start, 1)
    n = min(cfg.parity_images, len(splits.test_y))
    x = onnxio.normalise(splits.test_x[:n], ctx.data_cfg.mean, ctx.data_cfg.std)
    rt = inference.get()
    ref = inference.predict(rt.session(src.path / "model.onnx"), x)
    got = inference.predict(rt.session(path), x)
    m: ExportResult = src.result
    cov = rt.kernel_coverage(path)
    result = ExportResult(source=src.node, kind=ORT_STATIC, fp32_input=m.source, precision="int8", opset=m.opset,
                          params=m.params, macs=m.macs, size_mb=path.stat().st_size / 1e6,
                          parity=_parity(ref, got, n, reference="fp32 onnx"), int8_coverage=cov,
                          quantize_seconds=seconds)
    log.info("%s: ORT static INT8 of %s, agreement with FP32 %.2f%%, INT8 kernels %d/%d", ctx.node, src.node,
             result.parity.top1_agreement, cov["int8_kernels"], cov["int8_kernels"] + cov["float_kernels"])
    return result, got


def _parity(ref: np.ndarray, got: np.ndarray, n: int, reference: str | None = None) -> Parity:
    """Max |logit difference| and top-1 agreement (%) of ``got`` with ``ref`` on ``n`` images."""
    return Parity(images=n, reference=reference, max_abs_diff=float(np.abs(ref - got).max()),
                  top1_agreement=float((ref.argmax(1) == got.argmax(1)).mean() * 100))


def _with_preprocessing(ctx: StageContext, result: ExportResult, ref: np.ndarray) -> ExportResult:
    """``model_uint8.onnx``: the same model behind uint8 NHWC input; parity against the float-input model,
    whose ORT outputs ``ref`` on the parity images the export has measured already."""
    cfg: Config = ctx.settings
    if not cfg.embed_preprocessing:
        return result
    src, dst = ctx.out_dir / "model.onnx", ctx.out_dir / "model_uint8.onnx"
    deploy.embed_preprocessing(src, dst, ctx.data_cfg.mean, ctx.data_cfg.std)
    n = result.parity.images
    pixels = ctx.splits().test_x[:n].permute(0, 2, 3, 1).contiguous().numpy()
    got = inference.predict(inference.get().session(dst), pixels)
    pre = result.preprocessing_parity = _parity(ref, got, n)
    log.info("%s: embedded preprocessing (uint8 NHWC input), max|diff| %.2e, top-1 agreement %.2f%%", ctx.node,
             pre.max_abs_diff, pre.top1_agreement)
    return result


def run(ctx: StageContext) -> ExportResult:
    result, ort_out = _ort_static(ctx) if ctx.kind == ORT_STATIC else _export(ctx)
    return _with_preprocessing(ctx, result, ort_out)


def _export(ctx: StageContext) -> tuple[ExportResult, np.ndarray]:
    """Export the input stage's model; returns the metrics and ORT's outputs on the parity images."""
    cfg: Config = ctx.settings
    art = ctx.inputs["model"]
    model, precision = art.model()
    model.eval()
    splits = ctx.splits()
    n = min(cfg.parity_images, len(splits.test_y))
    x = torch.from_numpy(onnxio.normalise(splits.test_x[:n], ctx.data_cfg.mean, ctx.data_cfg.std))
    path = ctx.out_dir / "model.onnx"
    with torch.no_grad():
        ref = torch.cat([model(x[i : i + 256]) for i in range(0, n, 256)]).numpy()
    if precision == "int8":
        placement.export_quantized(model, x[:2], path, cfg.opset)
    elif ctx.kind == FP16:  # parity is measured against the FP32 model
        precision = "fp16"
        onnxio.export_onnx(_Float16(model), x[:2], path, cfg.opset)
    else:
        onnxio.export_onnx(model, x[:2], path, cfg.opset)
    rt = inference.get()
    got = inference.predict(rt.session(path, threads=0, opt_level="all"), x.numpy())
    src = art.result  # ModelResult, or QatResult for a quantized model
    int8 = precision == "int8"
    result = ExportResult(
        source=art.node, kind=precision, precision=precision, opset=cfg.opset,
        fp32_input=src.source if int8 else None,
        weight_bits=src.weight_bits_note if int8 else None, placement=src.placement_summary if int8 else None,
        quantize_seconds=art.manifest.get("seconds") if int8 else None,
        kept_unprunable=src.kept_unprunable or None,
        params=src.params, macs=src.macs,  # of the float architecture
        size_mb=path.stat().st_size / 1e6, parity=_parity(ref, got, n))
    log.info("%s: %s ONNX %.2f MB, parity max|diff| %.2e, top-1 agreement %.2f%%", ctx.node, precision,
             result.size_mb, result.parity.max_abs_diff, result.parity.top1_agreement)
    if int8:
        cov = rt.kernel_coverage(path)
        cov["quantized_layers"] = len(quant.quantized_layers(model, calls=True))  # the rest: qat.float_layers
        cov["activation_matmuls"] = quant.activation_matmuls(model)  # attention: kernels, not layers
        result.int8_coverage = cov
        result.float_ops = {k: len(v) for k, v in quant.float_ops(model).items()}  # what stayed float, and why
        att = f", {cov['activation_matmuls']} quantized attention matmuls" if cov["activation_matmuls"] else ""
        log.info("%s: ORT runs %d of %d convs/matmuls as INT8 kernels %s (%d quantized conv/linear layers%s; FP32 "
                 "ones are qat.float_layers)", ctx.node, cov["int8_kernels"],
                 cov["int8_kernels"] + cov["float_kernels"], cov["int8_ops"], cov["quantized_layers"], att)
        target = getattr(src, "target", None) or inference.DEFAULT
        if target != inference.DEFAULT:  # placed for another runtime: checked on that one
            trt = inference.get(target)
            tcov = trt.kernel_coverage(path)
            tcov.update(quantized_layers=cov["quantized_layers"], activation_matmuls=cov["activation_matmuls"])
            result.target, result.target_coverage = target, tcov
            result.target_parity = _parity(ref, inference.predict(trt.session(path), x.numpy()), n)
            log.info("%s: placed for %s (qat.target), which runs %d of %d convs/matmuls as INT8 kernels %s; parity "
                     "max|diff| %.2e, top-1 agreement %.2f%%", ctx.node, target, tcov["int8_kernels"],
                     tcov["int8_kernels"] + tcov["float_kernels"], tcov["int8_ops"],
                     result.target_parity.max_abs_diff, result.target_parity.top1_agreement)
        elif note := requantized_note(cov):
            log.warning("%s: %s", ctx.node, note)
    return result, got


STAGE = Stage(name="export", config=Config, run=run, outputs=("model.onnx",), inputs=inputs, main_only=True,
              check=check, nodes=nodes, kind=kind, key_extra=key_extra, gate=gate, result=ExportResult)
