"""Benchmark: the quantization path on many architectures, against ONNX Runtime's own quantizer.

    python -m pipeline.tools.bench_zoo [--models resnet18,mobilenet_v3_small,...] [--size 32] [--batch 1,8]

Per model (untrained weights: speed and kernel coverage do not depend on them; accuracy needs a trained
model): prepare_qat -> calibrate on embedded training images -> export FP32 and INT8 QDQ ONNX; ORT's
``quantize_static`` of the same FP32 ONNX (QDQ, per-channel S8 weights, U8 activations). Prints the INT8
kernels (INT8/all convs+matmuls), what stayed float, the PyTorch-vs-ORT top-1 agreement of our INT8
model, and throughput ratios INT8/FP32 and INT8/ORT-static at each batch size, timed interleaved (every
model warmed up before each timed block, each block about ``--seconds`` long), medians over rounds.
A model that fails prints why. ``--placement measure`` first runs ``qat.float_layers=[measure]``'s search
(timed at the largest batch) and keeps the blocks it chooses FP32 in our INT8 model.
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

from pipeline import inference, onnxio, placement, quant
from pipeline.data import load_splits
from pipeline.env import cpu_info
from pipeline.inference import ort_quantize
from pipeline.models import build_model
from pipeline.tools import data_config

ZOO = ("resnet18,resnet50,mobilenet_v2,mobilenet_v3_small,mobilenet_v3_large,efficientnet_b0,regnet_x_400mf,"
       "shufflenet_v2_x1_0,densenet121,convnext_tiny,vit_b_16,swin_t")


def _images(size: int, n: int) -> np.ndarray:
    dc = data_config("data.val_fraction=0.0")
    s = load_splits(dc, 0)
    x = torch.from_numpy(onnxio.normalise(s.train_x[:n], dc.mean, dc.std))
    if size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear")
    return x.numpy()


def one(name: str, size: int, batches: list[int], calib: np.ndarray, rounds: int, seconds: float, folder: Path,
        measure: bool = False) -> dict:
    torch.manual_seed(0)
    family = "timm" if name.startswith("timm:") else "auto"
    cfg = {"name": name.removeprefix("timm:"), "num_classes": 10, "image_size": size, "family": family,
           "small_input": size <= 64 and family == "auto"}
    model = build_model(cfg).eval()
    x = torch.from_numpy(calib[:16])
    spec = quant.QuantSpec("uint8", 8, 0.01, ())
    fp32_blocks: list[str] = []
    if measure:
        fp32_blocks = placement.measure(model, spec, size, x, max(batches), progress=False).float_layers
        spec = spec.keeping_fp32(fp32_blocks)
    gm = quant.prepare_qat(model, spec, size)
    quant.calibrate(gm, [(x[i : i + 8], None) for i in range(0, len(x), 8)])
    gm.eval()
    fp32, int8, ort = folder / f"{name}.fp32.onnx", folder / f"{name}.int8.onnx", folder / f"{name}.ort.onnx"
    onnxio.export_onnx(model, x[:2], fp32, 18)
    onnxio.export_onnx(quant.to_deploy(gm), x[:2], int8, 18, quant.onnx_translations())
    ort_quantize.static_quantize(fp32, ort, calib[:64], "uint8", 8, folder)
    cov = inference.get().kernel_coverage(int8)
    with torch.no_grad():
        ref = gm(x).numpy()
    got = inference.predict(inference.get().session(int8), x.numpy())
    sessions = {k: inference.get().session(p) for k, p in (("fp32", fp32), ("int8", int8), ("ort", ort))}
    ort_cov = inference.get().kernel_coverage(ort)
    ratios, spread = {}, {}
    for b in batches:
        xb = np.ascontiguousarray(np.resize(calib, (b, *calib.shape[1:])))
        runs = inference.runs_for(sessions["fp32"], xb, seconds)
        t: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(rounds):
            for k, sess in sessions.items():
                t[k].append(float(np.median(inference.time_runs(sess, xb, max(5, runs // 2), runs))))
        med = {k: statistics.median(v) for k, v in t.items()}
        ratios[b] = (med["fp32"] / med["int8"], med["ort"] / med["int8"], med["fp32"] / med["ort"])
        per_round = [f / i for f, i in zip(t["fp32"], t["int8"], strict=True)]  # how far one round can be off
        spread[b] = (min(per_round), max(per_round))
    floats = {k.split(" (")[0]: len(v) for k, v in quant.float_ops(gm).items()}
    if fp32_blocks:
        floats = {f"FP32 blocks up to {fp32_blocks[-1]}": len(fp32_blocks), **floats}
    return {"int8": f"{cov['int8_kernels']}/{cov['int8_kernels'] + cov['float_kernels']}",
            "ort_int8": f"{ort_cov['int8_kernels']}/{ort_cov['int8_kernels'] + ort_cov['float_kernels']}",
            "agree": float((ref.argmax(1) == got.argmax(1)).mean() * 100), "float": floats, "ratios": ratios,
            "spread": spread}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=ZOO, help="comma-separated torchvision names, or timm:<name>")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.3, help="length of each timed block (the FP32 model's)")
    ap.add_argument("--placement", choices=("int8", "measure"), default="int8",
                    help="measure: keep the leading blocks FP32 that qat.float_layers=[measure] chooses")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    batches = [int(b) for b in args.batch.split(",")]
    calib = _images(args.size, 64)
    cpu = cpu_info()
    print(f"{cpu['cpu']} ({cpu['cores']} cores, {', '.join(cpu['flags'])}), {args.size} px, untrained weights, "
          f"8-bit weights, placement {args.placement}, interleaved medians of {args.rounds} rounds")
    head = " | ".join(f"b={b} INT8/FP32 | b={b} INT8/ORT | b={b} ORT/FP32" for b in batches)
    print(f"| model | INT8 kernels (ours) | INT8 kernels (ORT) | agreement % | stays float | {head} |")
    print("|---|---|---|---|---|" + "---|" * (3 * len(batches)))
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            t0 = time.perf_counter()
            try:
                r = one(name, args.size, batches, calib, args.rounds, args.seconds, Path(tmp),
                        args.placement == "measure")
            except Exception as e:  # a benchmark reports failures and goes on
                print(f"| {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:150]} |")
                continue
            floats = ", ".join(f"{k} x{n}" for k, n in r["float"].items()) or "–"
            cells = " | ".join(f"{a:.2f}x | {o:.2f}x | {s:.2f}x" for a, o, s in r["ratios"].values())
            spread = ", ".join(f"b={b} {lo:.2f}-{hi:.2f}" for b, (lo, hi) in r["spread"].items())
            print(f"| {name} | {r['int8']} | {r['ort_int8']} | {r['agree']:.1f} | {floats} | {cells} |  "
                  f"({time.perf_counter() - t0:.0f} s; INT8/FP32 per round: {spread})", flush=True)


if __name__ == "__main__":
    main()
