"""Benchmark: the train stage's loop vs a bare PyTorch loop (same model, batch, data), interleaved.

    python -m pipeline.tools.bench_train --rounds 5 --steps 20

Prints images/s of both per round and the median ratio (pipeline / bare); the target is >= 0.95.
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


def bare_loop(model, x, y, batch, steps, mean, std) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    m = torch.tensor(mean).view(1, 3, 1, 1) * 255
    s = torch.tensor(std).view(1, 3, 1, 1) * 255
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,))
        xb = ((x[idx].float() - m) / s).contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    dc = data_config("data.val_fraction=0.0")
    full = load_splits(dc, 0)
    n = args.batch * args.steps
    splits = Splits(full.train_x[:n], full.train_y[:n], full.train_x[:0], full.train_y[:0], full.test_x[:0],
                    full.test_y[:0], full.classes)
    rt = make_runtime("cpu", 0, "off", True, False, False)
    cfg = FitConfig(epochs=1, batch_size=args.batch, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4,
                    schedule="cosine", warmup_epochs=0.0, label_smoothing=0.0, select="last")
    mc = {"name": args.model, "num_classes": 10}
    ratios = []
    for r in range(args.rounds):
        bare_model = build_model(mc).to(memory_format=torch.channels_last)
        bare = bare_loop(bare_model, splits.train_x, splits.train_y, args.batch, args.steps, dc.mean, dc.std)
        with tempfile.TemporaryDirectory() as tmp:
            res = fit(build_model(mc), splits, dc, cfg, rt, Path(tmp))
        ratios.append(res.images_per_s / bare)
        print(f"round {r + 1}: pipeline {res.images_per_s:.1f} img/s, bare {bare:.1f} img/s, "
              f"ratio {ratios[-1]:.3f}")
    print(f"median ratio pipeline/bare over {args.rounds} rounds: {statistics.median(ratios):.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
