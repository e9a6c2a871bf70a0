"""Benchmark: per-image overhead of ``pipeline.predict`` at batch 1 over a bare ``InferenceSession.run`` loop.

    python -m pipeline.tools.bench_predict [--model outputs/runs/<run>/deploy] [--runs 2000 --rounds 7]

Both sides use the same session and the same preprocessed tensor; ``Predictor.classify`` adds the
softmax, the top-k and the class names. Rounds alternate the two loops, each warmed up before its timed
block; the median per-call times and their ratio are printed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import deploy, onnxio
from pipeline.models import build_model
from pipeline.predict import Predictor


def _default_model(folder: Path) -> Path:
    torch.manual_seed(0)
    model = build_model({"name": "resnet20", "num_classes": 10}).eval()
    onnxio.export_onnx(model, torch.randn(2, 3, 32, 32), folder / "plain.onnx", 18)
    deploy.write_metadata(folder / "plain.onnx", folder / "model.onnx",
                          {deploy.META_CLASSES: [f"class{i}" for i in range(10)], deploy.META_MEAN: [0.5] * 3,
                           deploy.META_STD: [0.25] * 3, deploy.META_SIZE: "32"})
    return folder / "model.onnx"


def _per_call(fn, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(runs):
        fn()
    return (time.perf_counter() - t0) / runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="bundle folder or .onnx (default: an untrained ResNet-20 at 32 px)")
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--top-k", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pred = Predictor(args.model or _default_model(Path(tmp)))
        pixels = np.random.default_rng(0).integers(0, 256, (1, pred.size, pred.size, 3), dtype=np.uint8)
        x = pred.to_input(pixels)
        raw = pred.session.ort  # the bare onnxruntime.InferenceSession
        name, out = raw.get_inputs()[0].name, [raw.get_outputs()[0].name]
        feed = {name: x}
        bare, full = [], []
        for _ in range(args.rounds):
            bare.append(_per_call(lambda: raw.run(out, feed), args.runs, 200))
            full.append(_per_call(lambda: pred.classify(x, args.top_k), args.runs, 200))
    b, f = statistics.median(bare), statistics.median(full)
    print(f"model {pred.path} ({'uint8 NHWC' if pred.uint8 else 'float NCHW'} input, {pred.size} px), batch 1, "
          f"{args.rounds} interleaved rounds x {args.runs} calls")
    print(f"bare InferenceSession.run: {b * 1e6:.1f} us/call; Predictor.classify (top-{args.top_k}): "
          f"{f * 1e6:.1f} us/call; overhead {100 * (f / b - 1):+.1f}% (ratio {f / b:.3f})")


if __name__ == "__main__":
    main()
