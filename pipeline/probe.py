"""A quick speed probe of an architecture before training it: how much faster than the unpruned baseline
would this trial's pruned (and quantized) model run in ONNX Runtime?

Speed does not depend on the weights, so the probe prunes a freshly initialised model exactly as the
prune stage would (per-layer channel counts; with ``prune.global_pruning`` the counts depend on the
trained weights and the probe is an estimate), quantizes it like the qat stage for INT8 rows
(calibrated on random inputs), exports it and times it interleaved against the unpruned FP32 baseline.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline import inference, onnxio, placement, pruning, quant
from pipeline.artifacts import stable_hash
from pipeline.models import build_model

log = logging.getLogger(__name__)


def _export(model: torch.nn.Module, size: int, path: Path, int8: bool, qat: DictConfig | None) -> Path:
    x = torch.randn(8, 3, size, size)
    model = model.eval()
    if int8:
        spec = placement.base_spec(qat, model)
        if placement.MEASURE in qat.float_layers:  # the placement the qat stage would measure
            spec = spec.keeping_fp32(placement.measure(model, spec, size, x, int(qat.measure_batch),
                                                       progress=False).float_layers)
        placement.export_int8(quant.prepare_qat(model, spec, size), x, path)
    else:
        onnxio.export_onnx(model, x[:2], path, 18)
    return path


def probe_speedup(cfg: DictConfig, int8: bool, cache: dict, rounds: int = 5, runs: int = 20, warmup: int = 10) -> float:
    """Throughput of the trial's deployed architecture over the unpruned FP32 baseline's (median ratio)."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    size, batch, threads = int(cfg.data.image_size), int(cfg.validate.batch_size), int(cfg.validate.threads)
    if "tmp" not in cache:  # removed with the cache (at the latest when the process exits)
        cache["tmp"] = tempfile.TemporaryDirectory(prefix="probe-")
    folder = Path(cache["tmp"].name)
    base_key = stable_hash([model_cfg, size])
    if base_key not in cache:
        torch.manual_seed(0)
        cache[base_key] = _export(build_model(model_cfg), size, folder / f"base-{base_key}.onnx", False, None)
    torch.manual_seed(0)
    model = build_model(model_cfg).eval()
    model = pruning.prune_architecture(model, cfg.prune, size)  # the prune stage's recipe, untrained
    trial = _export(model, size, folder / "trial.onnx", int8, cfg.qat)  # the previous trial's file is done with
    # two sessions only, each warmed up before its timed block (ORT's default thread spinning, as deployed:
    # without it INT8 kernels ran 1.5x slower here)
    rt = inference.get()
    sessions = [rt.session(p, threads) for p in (cache[base_key], trial)]
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    times: list[list[float]] = [[], []]
    for _ in range(rounds):
        for i, sess in enumerate(sessions):
            times[i].append(float(np.median(inference.time_runs(sess, x, warmup, runs))))
    return float(np.median(times[0]) / np.median(times[1]))
