"""Benchmark: the train stage's accuracy and throughput with 1 process vs 2 torchrun processes (DDP, CPU).

    python -m pipeline.tools.bench_ddp --seeds 0,1,2

Both use the same config and global batch (each of the 2 ranks gets half of it). For every seed it
runs ``python -m pipeline stage=train`` once per mode, alternating, and prints the test accuracies,
the mean difference (2 processes - 1 process) and the seed-to-seed spread it should be compared with,
and the median ratio of training images/s (2 processes on the same cores / 1 process).
Extra arguments are passed to the pipeline (e.g. ``train.epochs=3``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def train_accuracy(nproc: int, seed: int, out: Path, overrides: list[str]) -> tuple[float, float]:
    """Run the train stage with ``nproc`` processes; return its test accuracy (%) and training images/s."""
    launch = [sys.executable, "-m", "pipeline"]
    if nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                  "-m", "pipeline"]
    cmd = [*launch, "stage=train", "device=cpu", "progress=false", f"seed={seed}", f"paths.outputs={out}",
           f"hydra.run.dir={out}/run", *overrides]
    threads = max(1, (os.cpu_count() or 1) // nproc)  # the same cores in both modes
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    (metrics,) = out.glob("artifacts/train/*/metrics.json")
    m = json.loads(metrics.read_text())
    return m["test_acc"], m["train_images_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    args, overrides = ap.parse_known_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    acc: dict[int, list[float]] = {1: [], 2: []}
    speed: dict[int, list[float]] = {1: [], 2: []}
    for seed in seeds:
        for nproc in (1, 2) if seed % 2 == 0 else (2, 1):  # alternate which mode runs first
            with tempfile.TemporaryDirectory() as tmp:
                a, ips = train_accuracy(nproc, seed, Path(tmp), overrides)
            acc[nproc].append(a)
            speed[nproc].append(ips)
            print(f"seed {seed}, {nproc} process{'es' if nproc > 1 else ''}: test top-1 {a:.2f}%, "
                  f"{ips:.0f} train img/s", flush=True)
    diffs = [b - a for a, b in zip(acc[1], acc[2], strict=True)]
    spread = (statistics.mean([statistics.stdev(acc[1]), statistics.stdev(acc[2])])
              if len(seeds) > 1 else float("nan"))
    print(f"mean test top-1: 1 process {statistics.mean(acc[1]):.2f}%, 2 processes {statistics.mean(acc[2]):.2f}%")
    print(f"mean difference (2 - 1): {statistics.mean(diffs):+.2f} points; "
          f"seed-to-seed standard deviation (mean of both modes): {spread:.2f} points")
    ratio = statistics.median(b / a for a, b in zip(speed[1], speed[2], strict=True))
    print(f"train throughput, 2 processes / 1 process on the same {os.cpu_count()} cores: median {ratio:.2f}")


if __name__ == "__main__":
    main()
