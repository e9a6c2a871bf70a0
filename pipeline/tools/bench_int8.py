"""Benchmark: INT8 throughput of our QDQ export vs FP32 vs ORT's own static quantization.

    python -m pipeline.tools.bench_int8 --model resnet18 --batch 32

Builds the model (untrained weights: speed does not depend on them), calibrates the QAT model on
embedded training images, exports FP32 and INT8 QDQ ONNX, quantizes the FP32 ONNX with ORT's
``quantize_static`` (QDQ, per-channel, U8/S8), then times all three interleaved and prints the
median throughput ratios. Accuracy needs a trained model: see ``experiment=int8_wide``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from pipeline import onnxio, quant
from pipeline.data import load_splits
from pipeline.models import build_model
from pipeline.tools import data_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--weight-bits", type=int, default=7)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    logging.disable(logging.WARNING)

    dc = data_config("data.val_fraction=0.0")
    s = load_splits(dc, 0)
    calib = onnxio.normalise(s.train_x[:256], dc.mean, dc.std)
    x = onnxio.normalise(s.test_x[: args.batch], dc.mean, dc.std)
    torch.manual_seed(0)
    model = build_model({"name": args.model, "num_classes": 10, "width": args.width}).eval()
    gm = quant.prepare_qat(model, quant.QuantSpec(weight_bits=args.weight_bits))
    quant.calibrate(gm, [(torch.from_numpy(calib[i : i + 64]), None) for i in range(0, 256, 64)])
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        onnxio.export_onnx(model, torch.from_numpy(x[:2]), t / "fp32.onnx", 18)
        onnxio.export_onnx(quant.to_deploy(gm.eval()), torch.from_numpy(x[:2]), t / "qat.onnx", 18,
                           quant.onnx_translations())
        onnxio.ort_static_quantize(t / "fp32.onnx", t / "ort.onnx", calib, "uint8", args.weight_bits, t)
        sessions = {n: onnxio.session(t / f"{n}.onnx") for n in ("fp32", "qat", "ort")}
        cov = {n: onnxio.kernel_coverage(t / f"{n}.onnx")["coverage"] for n in ("qat", "ort")}
        thr = {n: [] for n in sessions}
        for _ in range(args.rounds):
            for n, sess in sessions.items():
                thr[n].append(args.batch / float(np.median(onnxio.time_runs(sess, x, 5, args.runs))))
    med = {n: statistics.median(v) for n, v in thr.items()}
    print(f"{args.model} width {args.width}, batch {args.batch}, {args.rounds} interleaved rounds x {args.runs} runs")
    for n in sessions:
        print(f"  {n:5s} {med[n]:8.1f} img/s  ({med[n] / med['fp32']:.2f}x fp32)"
              + (f", INT8 kernel coverage {cov[n]:.0%}" if n in cov else ""))
    print(f"  qat/ort static throughput ratio: {med['qat'] / med['ort']:.2f}")


if __name__ == "__main__":
    main()
