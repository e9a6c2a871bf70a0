"""export: every model the pipeline made -> ONNX (FP32, or a real INT8 QDQ model for qat).

Node ``export/<stage>`` reads that stage's ``model.pt`` and writes ``model.onnx`` plus
``metrics.json`` with the parity check against PyTorch on real test images (max abs logit
difference and top-1 agreement) and, for INT8, ORT's INT8 kernel coverage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from pipeline import onnxio
from pipeline.errors import PipelineError
from pipeline.models import count_macs, count_params
from pipeline.stage import StageContext

log = logging.getLogger(__name__)

NAME = "export"
OUTPUTS = ("model.onnx", "metrics.json")


@dataclass
class Config:
    """``conf/stages/export.yaml``."""

    opset: int  # ONNX opset (>= 13 for per-channel QDQ)
    parity_images: int  # test images used for the PyTorch-vs-ORT parity check
    min_top1_agreement: float  # %; below this the export fails
    min_int8_coverage: float  # fraction of convs/matmuls that must run as INT8 kernels (qat)

    def check(self) -> list[str]:
        errs = []
        if self.opset < 13:
            errs.append(f"opset: {self.opset} is too old for per-channel QDQ; use 13 or newer")
        if self.parity_images < 1:
            errs.append("parity_images: use at least 1")
        return errs


def inputs(runner, node: str) -> dict[str, str]:
    _, _, src = node.partition("/")
    return {"model": src}


def run(ctx: StageContext) -> dict:
    cfg: Config = ctx.settings
    art = ctx.inputs["model"]
    model, precision = art.model()
    model.eval()
    splits = ctx.splits()
    n = min(cfg.parity_images, len(splits.test_y))
    x = torch.from_numpy(onnxio.normalise(splits.test_x[:n], ctx.data_cfg.mean, ctx.data_cfg.std))
    path = ctx.out_dir / "model.onnx"
    translations = {}
    if precision == "int8":
        from pipeline import quant

        translations = quant.onnx_translations()
    onnxio.export_onnx(model, x[:2], path, cfg.opset, translations)

    with torch.no_grad():
        ref = torch.cat([model(x[i : i + 256]) for i in range(0, n, 256)]).numpy()
    sess = onnxio.session(path, threads=0, opt_level="all")
    got = onnxio.predict(sess, x.numpy())
    agreement = float((ref.argmax(1) == got.argmax(1)).mean() * 100)
    metrics = {
        "source": art.node, "precision": precision, "opset": cfg.opset,
        "params": count_params(model), "macs": count_macs(model, ctx.data_cfg.image_size),
        "size_mb": path.stat().st_size / 1e6,
        "parity": {"images": n, "max_abs_diff": float(np.abs(ref - got).max()), "top1_agreement": agreement},
    }
    log.info("%s: %s ONNX %.2f MB, parity max|diff| %.2e, top-1 agreement %.2f%%", ctx.node, precision,
             metrics["size_mb"], metrics["parity"]["max_abs_diff"], agreement)
    if precision == "int8":
        cov = onnxio.kernel_coverage(path)
        metrics["int8_coverage"] = cov
        log.info("%s: ORT runs %d of %d convs/matmuls as INT8 kernels %s", ctx.node, cov["int8_kernels"],
                 cov["int8_kernels"] + cov["float_kernels"], cov["int8_ops"])
        if cov["coverage"] < cfg.min_int8_coverage:
            raise PipelineError(
                f"{ctx.node}: only {cov['int8_kernels']} of {cov['int8_kernels'] + cov['float_kernels']} "
                f"convs/matmuls run as INT8 kernels in ONNX Runtime (float: {cov['float_ops']}); "
                f"the model is not really INT8 (export.min_int8_coverage={cfg.min_int8_coverage})"
            )
    if agreement < cfg.min_top1_agreement:
        raise PipelineError(
            f"{ctx.node}: ONNX Runtime agrees with PyTorch on only {agreement:.2f}% of top-1 predictions "
            f"(export.min_top1_agreement={cfg.min_top1_agreement}); the exported model is wrong"
        )
    return metrics
