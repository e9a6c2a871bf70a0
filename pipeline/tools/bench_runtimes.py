"""Benchmark: the same ONNX models on ONNX Runtime and OpenVINO (f32, bf16, INT8), throughput relative to ORT FP32.

    python -m pipeline.tools.bench_runtimes --run outputs/runs/<run>              # a run's exported models
    python -m pipeline.tools.bench_runtimes --models mobilenet_v3_small,efficientnet_b0 --size 224 --batch 8
    python -m pipeline.tools.bench_runtimes --models efficientnet_b0 --qat onnxruntime,openvino   # qat.target
    python -m pipeline.tools.bench_runtimes --run outputs/runs/<run> --profile   # OpenVINO's time per layer type

``--run``: every model row of the run's ``report.json`` (its ONNX files), each on ONNX Runtime and on OpenVINO in
f32, and FP32 models also in bf16 where the CPU runs it natively; ratios against the run's FP32 baseline in ONNX
Runtime, top-1 on the test split of the data the run was made with (its saved config). ``--models``:
torchvision models with untrained weights (speed only), FP32 ONNX exported here, and with ``--int8`` ONNX
Runtime's static QDQ quantization of it (calibrated on embedded images) on both runtimes; with ``--qat`` the
pipeline's own INT8 model (``prepare_qat`` calibrated on embedded images, no training) placed for each named
``qat.target``. Timing is interleaved: every session is warmed up
before each timed block (about ``--seconds`` long), medians over ``--rounds`` rounds, ratios from the same run.
``--profile`` then shows where each OpenVINO session's time goes: milliseconds per call by layer type, with the
kernel that ran most of it, from OpenVINO's performance counters (sessions compiled again with them on,
interleaved rounds, medians): why an INT8 model is or is not faster than the same model in bf16.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import tempfile
from pathlib import Path

import numpy as np

from pipeline import inference, onnxio
from pipeline.env import cpu_info
from pipeline.tools import data_config


def _images(size: int, n: int, split: str = "train", data: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images of ``split`` of the embedded data (or of ``data``: a run's ``_run_data``), normalised, at
    ``size`` px."""
    import torch

    from pipeline.data import load_splits

    dc, cache = data or (data_config("data.val_fraction=0.0"), None)
    s = load_splits(dc, 0, cache)
    raw, y = (s.train_x, s.train_y) if split == "train" else (s.test_x, s.test_y)
    x = torch.from_numpy(onnxio.normalise(raw[:n], dc.mean, dc.std))
    if size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear")
    return x.numpy(), y[:n].numpy()


def _run_data(run: Path):
    """(data settings, decoded-image cache) of the run's saved config (``.hydra/config.yaml``), or None where the run
    has none (a run from the Python API)."""
    from omegaconf import OmegaConf

    from pipeline.data import DataConfig

    saved = run / ".hydra" / "config.yaml"
    if not saved.is_file():
        return None
    cfg = OmegaConf.load(saved)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    known = {f.name for f in dataclasses.fields(DataConfig)}  # a key an older release wrote is left out
    return (DataConfig(**{**{k: v for k, v in data.items() if k in known}, "val_fraction": 0.0}),
            Path(str(OmegaConf.select(cfg, "paths.cache"))))


def sessions_for(name: str, path: Path, precision: str, threads: int) -> dict[str, inference.Session]:
    """``<name> ort``, ``<name> ov-f32`` and, on CPUs with native bf16, ``<name> ov-bf16`` (an INT8 model's float
    layers in bf16)."""
    ort, ov = inference.get(), inference.get("openvino")
    out = {f"{name} ort": ort.session(path, threads), f"{name} ov-f32": ov.session(path, threads)}
    if "bf16" in ov.float_precisions():
        out[f"{name} ov-bf16"] = ov.session(path, threads, options=ov.precision_options("bf16"))
    return out


def _label(session: str, precision: str) -> str:
    """The precision column: ``bf16`` for an FP32 model in bf16, ``int8+bf16`` for an INT8 model's bf16 session."""
    if not session.endswith("bf16"):
        return precision
    return "bf16" if precision == "fp32" else f"{precision}+bf16"


def timed(sessions: dict[str, inference.Session], x: np.ndarray, rounds: int, seconds: float,
          reference: str) -> dict[str, float]:
    """Median seconds per call of every session on ``x``, interleaved rounds (runs per block set by the reference)."""
    runs = inference.runs_for(sessions[reference], x, seconds)
    t: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, sess in sessions.items():
            t[k].append(float(np.median(inference.time_runs(sess, x, max(5, runs // 4), runs))))
    return {k: statistics.median(v) for k, v in t.items()}


def _by_layer_type(samples: dict[str, list[dict[tuple[str, str], float]]]) -> tuple[dict, dict]:
    """Per session: the median over rounds of each layer type's milliseconds (0 in a round it did not run in),
    and the kernel that ran most of that type's time over all rounds."""
    ms: dict[str, dict[str, float]] = {}
    kernel: dict[str, dict[str, str]] = {}
    for k, runs in samples.items():
        types = {t for run in runs for t, _ in run}
        ms[k] = {t: statistics.median(sum(v for (tt, _), v in run.items() if tt == t) for run in runs) for t in types}
        total: dict[tuple[str, str], float] = {}
        for run in runs:
            for key, v in run.items():
                total[key] = total.get(key, 0.0) + v
        kernel[k] = {t: max((v, e) for (tt, e), v in total.items() if tt == t)[1] for t in types}
    return ms, kernel


def layer_profile(group: dict[str, inference.Session], x: np.ndarray, rounds: int, threads: int) -> str:
    """``--profile``: a Markdown table of the OpenVINO sessions' milliseconds per call by layer type (the kernel
    that ran most of it in brackets), medians of interleaved rounds of 20 calls after a warm-up."""
    ov = inference.get("openvino")
    prof = {k: ov.session(s.path, threads, options={**s.options, "PERF_COUNT": "YES"})
            for k, s in group.items() if s.runtime == "openvino"}
    samples: dict[str, list[dict]] = {k: [] for k in prof}
    for _ in range(rounds):
        for k, sess in prof.items():
            for _ in range(5):
                sess.run(x)
            samples[k].append(sess.layer_times(x))
    ms, kernel = _by_layer_type(samples)
    order = sorted({t for m in ms.values() for t in m}, key=lambda t: -max(m.get(t, 0.0) for m in ms.values()))
    lines = ["| layer type | " + " | ".join(ms) + " |", "|---|" + "---|" * len(ms)]
    for t in order:
        cells = [f"{ms[k][t]:.2f} ({kernel[k][t]})" if t in ms[k] else "–" for k in ms]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines.append("| **sum** | " + " | ".join(f"**{sum(m.values()):.2f}**" for m in ms.values()) + " |")
    return "\n".join(lines)


def _from_run(run: Path, threads: int) -> tuple[dict, dict]:
    if not (run / "report.json").is_file():
        raise SystemExit(f"error: {run} has no report.json: pass the folder of a run whose validate stage finished "
                         "(outputs/runs/<run>)")
    rep = json.loads((run / "report.json").read_text())
    sessions, precision = {}, {}
    for row in rep["rows"]:
        if row.get("runtime", "onnxruntime") != "onnxruntime":
            continue
        for k, s in sessions_for(row["name"], run / row["onnx"], row["precision"], threads).items():
            sessions[k], precision[k] = s, _label(k, row["precision"])
    return sessions, precision


def _qat_int8(model, calib: np.ndarray, size: int, target: str, path: Path) -> None:
    """The pipeline's INT8 QDQ model of ``model`` placed for ``target``, calibrated on ``calib`` (no training)."""
    import torch

    from pipeline import quant

    x = torch.from_numpy(calib)
    gm = quant.prepare_qat(model, quant.QuantSpec("uint8", 8, 0.01, (), target=target), size)
    quant.calibrate(gm, [(x[i : i + 8], None) for i in range(0, len(x), 8)])
    onnxio.export_onnx(quant.to_deploy(gm.eval()), x[:2], path, 18, quant.onnx_translations())


def _torchvision(names: list[str], size: int, int8: bool, threads: int, folder: Path,
                 targets: list[str]) -> tuple[dict, dict]:
    import torch

    from pipeline.inference import ort_quantize
    from pipeline.models import build_model

    calib, _ = _images(size, 64)
    sessions, precision = {}, {}
    for name in names:
        torch.manual_seed(0)
        model = build_model({"name": name, "num_classes": 1000, "image_size": size, "small_input": False}).eval()
        fp32 = folder / f"{name}.onnx"
        onnxio.export_onnx(model, torch.from_numpy(calib[:2]), fp32, 18)
        files = [(name, fp32, "fp32")]
        if int8:
            q = folder / f"{name}.int8.onnx"
            ort_quantize.static_quantize(fp32, q, calib, "uint8", 8, folder)
            files.append((f"{name}-int8", q, "int8"))
        for target in targets:
            q = folder / f"{name}.qat-{target}.onnx"
            _qat_int8(model, calib, size, target, q)
            files.append((f"{name}-int8-qat-{target}", q, "int8"))
        for label, path, prec in files:
            for k, s in sessions_for(label, path, prec, threads).items():
                sessions[k], precision[k] = s, _label(k, prec)
    return sessions, precision


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="a run folder with report.json (validate's rows)")
    src.add_argument("--models", help="comma-separated torchvision model names (untrained weights)")
    ap.add_argument("--size", type=int, default=224, help="input size for --models")
    ap.add_argument("--int8", action="store_true", help="--models: also ONNX Runtime's static INT8 QDQ")
    ap.add_argument("--qat", default="", help="--models: also the pipeline's INT8 model placed for each of these "
                    "comma-separated qat.target values (onnxruntime,openvino)")
    ap.add_argument("--batch", default="8")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.5)
    ap.add_argument("--profile", action="store_true", help="also OpenVINO's milliseconds per call by layer type")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    cpu = cpu_info()
    ov = inference.get("openvino")
    print(f"{cpu['cpu']} ({cpu['cores']} cores, {', '.join(cpu['flags'])}); ONNX Runtime {inference.get().version()},"
          f" OpenVINO {ov.version()}, threads {args.threads or 'default'}, interleaved medians of {args.rounds} "
          "rounds")
    with tempfile.TemporaryDirectory() as tmp:
        if args.run:
            sessions, precision = _from_run(args.run, args.threads)
            ref = "baseline ort"
            size = sessions[ref].input_shape[-1]
            made = _run_data(args.run)
            test_x, test_y = _images(size if isinstance(size, int) else args.size, 10**6, "test", made)
            print(f"top-1 on {len(test_y)} test images of "
                  f"{made[0].root or made[0].source if made else 'the embedded data (the run has no saved config)'}")
        else:
            sessions, precision = _torchvision(args.models.split(","), args.size, args.int8, args.threads, Path(tmp),
                                               [t for t in args.qat.split(",") if t])
            ref, test_x, test_y = None, None, None
        acc = {}
        if test_x is not None:
            acc = {k: float((inference.predict(s, test_x).argmax(1) == test_y).mean() * 100)
                   for k, s in sessions.items()}
        for b in (int(v) for v in args.batch.split(",")):
            shape = next(iter(sessions.values())).input_shape
            size = shape[-1] if isinstance(shape[-1], int) else args.size
            x = np.ascontiguousarray(np.resize(_images(size, 64)[0], (b, 3, size, size)).astype(np.float32))
            print(f"\nbatch {b}:\n| row | precision | top-1 % | img/s | vs ORT FP32 |\n|---|---|---|---|---|")
            groups = [sessions] if ref else [{k: s for k, s in sessions.items() if k.split(" ")[0].split("-int8")[0]
                                              == m} for m in args.models.split(",")]
            for group in groups:
                base = ref or next(iter(group))
                med = timed(group, x, args.rounds, args.seconds, base)
                for k, t in med.items():
                    top1 = f"{acc[k]:.2f}" if k in acc else "–"
                    print(f"| {k} | {precision[k]} | {top1} | {b / t:.0f} | {med[base] / t:.2f}x |", flush=True)
                if args.profile:
                    print(f"\nOpenVINO, ms per call at batch {b} by layer type (kernel):\n"
                          f"{layer_profile(group, x, args.rounds, args.threads)}\n", flush=True)


if __name__ == "__main__":
    main()
