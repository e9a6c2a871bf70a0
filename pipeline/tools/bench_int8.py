"""Benchmark: INT8 throughput of our QDQ export vs FP32 vs ORT's own static quantization.

    python -m pipeline.tools.bench_int8 --model resnet18 --batch 32
    python -m pipeline.tools.bench_int8 --model resnet20 --target-macs 9.7e6 --prune-stem \
        --float-layers conv1,layer1 [--drop-blocks layer1.1,layer1.2]  # pruned like stage=prune

Builds the model (untrained weights: speed does not depend on them), optionally channel-prunes it
the way the prune stage does (uniform per-layer ratio until ``--target-macs``; the widths do not
depend on the weights), calibrates the QAT model on embedded training images, exports FP32 and
INT8 QDQ ONNX, quantizes the FP32 ONNX with ORT's ``quantize_static`` (QDQ, per-channel, U8/S8),
then times them interleaved and prints the median throughput ratios (with ``--target-macs`` also
against the unpruned FP32 model). Accuracy needs a trained model: see ``experiment=int8_wide``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from pipeline import inference, onnxio, pruning, quant
from pipeline.data import load_splits
from pipeline.inference import ort_quantize
from pipeline.models import build_model, count_macs
from pipeline.tools import data_config


def _pruned(model: torch.nn.Module, dc, target_macs: float, prune_stem: bool, drop: list[str]) -> torch.nn.Module:
    """Channel pruning exactly as ``stage=prune`` does it (its YAML settings), no fine-tuning."""
    from hydra import compose, initialize_config_dir

    from pipeline.tools import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        settings = compose(config_name="config", overrides=[f"prune.target_macs={target_macs}",
                                                            f"prune.keep_first_conv={not prune_stem}"]).prune
    pruning.drop_blocks(model, drop)
    return pruning.channel_prune(model, pruning.ChannelPlan.of(settings), dc.image_size).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--weight-bits", type=int, default=7)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--target-macs", type=float, default=None, help="channel-prune to this many MACs first")
    ap.add_argument("--prune-stem", action="store_true", help="also prune the stem (prune.keep_first_conv=false)")
    ap.add_argument("--drop-blocks", default="", help="comma-separated residual blocks removed (prune.drop_blocks)")
    ap.add_argument("--float-layers", default="", help="comma-separated layers kept in FP32 (qat.float_layers)")
    args = ap.parse_args()
    logging.disable(logging.WARNING)

    dc = data_config("data.val_fraction=0.0")
    s = load_splits(dc, 0)
    calib = onnxio.normalise(s.train_x[:256], dc.mean, dc.std)
    x = onnxio.normalise(s.test_x[: args.batch], dc.mean, dc.std)
    torch.manual_seed(0)
    model = build_model({"name": args.model, "num_classes": 10, "width": args.width}).eval()
    models = {"fp32": model}
    if args.target_macs:
        drop = [n for n in args.drop_blocks.split(",") if n]
        models = {"unpruned": model,
                  "fp32": _pruned(copy.deepcopy(model), dc, args.target_macs, args.prune_stem, drop)}
        model = models["fp32"]
        print(f"pruned to {count_macs(model, dc.image_size):.3g} MACs, conv widths "
              f"{[m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]}")
    float_layers = tuple(n for n in args.float_layers.split(",") if n)
    gm = quant.prepare_qat(model, quant.QuantSpec("uint8", args.weight_bits, 0.01, float_layers))
    quant.calibrate(gm, [(torch.from_numpy(calib[i : i + 64]), None) for i in range(0, 256, 64)])
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        for n, m in models.items():
            onnxio.export_onnx(m, torch.from_numpy(x[:2]), t / f"{n}.onnx", 18)
        onnxio.export_onnx(quant.to_deploy(gm.eval()), torch.from_numpy(x[:2]), t / "qat.onnx", 18,
                           quant.onnx_translations())
        ort_quantize.static_quantize(t / "fp32.onnx", t / "ort.onnx", calib, "uint8", args.weight_bits, t)
        sessions = {n: inference.get().session(t / f"{n}.onnx") for n in (*models, "qat", "ort")}
        cov = {n: inference.get().kernel_coverage(t / f"{n}.onnx") for n in ("qat", "ort")}
        kernels = {n: f", INT8 kernels {c['int8_kernels']}/{c['int8_kernels'] + c['float_kernels']}"
                   for n, c in cov.items()}
        thr = {n: [] for n in sessions}
        for _ in range(args.rounds):
            for n, sess in sessions.items():
                thr[n].append(args.batch / float(np.median(inference.time_runs(sess, x, 5, args.runs))))
    med = {n: statistics.median(v) for n, v in thr.items()}
    print(f"{args.model} width {args.width}, batch {args.batch}, {args.rounds} interleaved rounds x {args.runs} runs"
          + (f", FP32 layers: {', '.join(float_layers)}" if float_layers else ""))
    for n in sessions:
        vs = f"{med[n] / med['fp32']:.2f}x fp32" + (f", {med[n] / med['unpruned']:.2f}x unpruned fp32"
                                                    if "unpruned" in med else "")
        print(f"  {n:8s} {med[n]:8.1f} img/s  ({vs}){kernels.get(n, '')}")
    print(f"  qat/ort static throughput ratio: {med['qat'] / med['ort']:.2f}")


if __name__ == "__main__":
    main()
