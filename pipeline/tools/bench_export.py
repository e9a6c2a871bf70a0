"""Benchmark: ONNX export time with one trace against the exporter's two (its decomposition pass).

    python -m pipeline.tools.bench_export --models resnet18,mobilenet_v3_small --rounds 3 [--qat]

``export_onnx`` translates the graph ``torch.export`` captured when it needs no decomposition (batch norm in
eval, global average pools and in-place ops rewritten as that pass would write them); ``single_trace=False``
always runs the pass. For each model (untrained weights; with ``--qat`` also its QAT deploy graph, calibrated on
random inputs) both exports run once untimed, then in turn for ``--rounds`` rounds; the tool prints the median
seconds of each, their ratio, and checks that both wrote the same ONNX ops computing the same outputs in ONNX
Runtime (max |diff|).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import inference, onnxio, quant
from pipeline.models import build_model


def _variants(name: str, size: int, qat: bool) -> list[tuple[str, torch.nn.Module, dict]]:
    torch.manual_seed(0)
    spec = {"name": name[5:], "family": "timm", "small_input": False} if name.startswith("timm:") else {"name": name}
    model = build_model({**spec, "num_classes": 10}).eval()
    out = [(f"{name} fp32", model, {})]
    if qat:
        gm = quant.prepare_qat(model, quant.QuantSpec("uint8", 7, 0.01, ()), size)
        quant.calibrate(gm, [(torch.randn(8, 3, size, size), None)])
        out.append((f"{name} qat", quant.to_deploy(gm.eval()), quant.onnx_translations()))
    return out


def _export(model: torch.nn.Module, table: dict, x: torch.Tensor, path: Path, single: bool) -> float:
    start = time.perf_counter()
    onnxio.export_onnx(model, x, path, 18, table, single_trace=single)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v3_small", help="comma-separated model names")
    ap.add_argument("--qat", action="store_true", help="also the QAT deploy graph of each model")
    ap.add_argument("--size", type=int, default=32, help="input height and width")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    x = torch.randn(2, 3, args.size, args.size)
    print(f"{'model':<34} {'one trace s':>11} {'two traces s':>12} {'ratio':>6}  same ops  max|diff|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for label, model, table in _variants(name, args.size, args.qat):
                files = {single: Path(tmp) / f"{single}.onnx" for single in (True, False)}
                for single, path in files.items():  # untimed: the first export of a graph pays one-off costs
                    _export(model, table, x, path, single)
                times: dict[bool, list[float]] = {True: [], False: []}
                for _ in range(args.rounds):
                    for single, path in files.items():
                        times[single].append(_export(model, table, x, path, single))
                one, two = statistics.median(times[True]), statistics.median(times[False])
                feed = np.random.default_rng(0).standard_normal((4, 3, args.size, args.size)).astype(np.float32)
                outs = [inference.predict(inference.get().session(p, 0), feed) for p in files.values()]
                same = onnxio.op_counts(files[True]) == onnxio.op_counts(files[False])
                print(f"{label:<34} {one:>11.2f} {two:>12.2f} {two / one:>5.2f}x  {'yes' if same else 'NO':<8}  "
                      f"{float(np.abs(outs[0] - outs[1]).max()):.1e}")


if __name__ == "__main__":
    main()
