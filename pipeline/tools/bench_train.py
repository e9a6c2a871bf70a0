"""Benchmark: the train stage's loop vs a bare PyTorch loop (same model, batch, data), interleaved.

    python -m pipeline.tools.bench_train --rounds 5 --steps 20
    python -m pipeline.tools.bench_train --device cuda --amp bf16 --data-root <cifar10-jpg> --steps 100

Prints images/s of both per round and the median ratio (pipeline / bare); the target is >= 0.95 on
CPU and within 20% (>= 0.80) on a GPU, where the bare loop is the textbook AMP loop (autocast, and a
gradient scaler for fp16) over batches already on the GPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.data import Splits, load_splits
from pipeline.models import build_model
from pipeline.runtime import make_runtime
from pipeline.tools import data_config
from pipeline.training import FitConfig, fit


def bare_loop(model, x, y, batch, steps, mean, std, device: torch.device, amp: str) -> float:
    """A plain loop: random batches from the (device-resident) uint8 set, normalise, step; AMP if asked."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x, y = x.to(device), y.to(device)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
    s = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    model.to(device).train()
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), device=device)
        xb = ((x[idx].float() - m) / s).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--amp", default="off", help="off | bf16 | fp16 (both loops)")
    ap.add_argument("--data-root", default=None, help="an image-folder tree (default: the embedded subset)")
    ap.add_argument("--cache-dir", default=None, help="decoded-image cache of the pipeline (paths.cache) to reuse")
    args = ap.parse_args()
    overrides = ["data.val_fraction=0.0"]
    if args.data_root:
        overrides += ["data=imagefolder", f"data.root={args.data_root}"]
    dc = data_config(*overrides)
    full = load_splits(dc, 0, Path(args.cache_dir) if args.cache_dir else None)
    n = args.batch * args.steps
    splits = Splits(full.train_x[:n], full.train_y[:n], full.train_x[:0], full.train_y[:0], full.test_x[:0],
                    full.test_y[:0], full.classes)
    rt = make_runtime(args.device, 0, args.amp, True, False, False)
    cfg = FitConfig(epochs=1, batch_size=args.batch, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4,
                    schedule="cosine", warmup_epochs=0.0, label_smoothing=0.0, select="last",
                    clip_grad_norm=None)
    mc = {"name": args.model, "num_classes": 10}
    ratios = []
    for r in range(args.rounds):
        bare_model = build_model(mc).to(memory_format=torch.channels_last)
        bare_loop(bare_model, splits.train_x, splits.train_y, args.batch, 3, dc.mean, dc.std, rt.device,
                  args.amp)  # warm-up (cuDNN algorithm search, allocator)
        bare = bare_loop(bare_model, splits.train_x, splits.train_y, args.batch, args.steps, dc.mean, dc.std,
                         rt.device, args.amp)
        with tempfile.TemporaryDirectory() as tmp:
            res = fit(build_model(mc), splits, dc, cfg, rt, Path(tmp))
        ratios.append(res.images_per_s / bare)
        print(f"round {r + 1}: pipeline {res.images_per_s:.1f} img/s, bare {bare:.1f} img/s, "
              f"ratio {ratios[-1]:.3f}")
    target = "0.95" if rt.device.type == "cpu" else "0.80"
    gpu = f" on {torch.cuda.get_device_name()}" if rt.device.type == "cuda" else ""
    print(f"median ratio pipeline/bare over {args.rounds} rounds{gpu} (amp {args.amp}): "
          f"{statistics.median(ratios):.3f} (target >= {target})")


if __name__ == "__main__":
    main()
