"""What the over-seeds benchmarks (``kd_seeds``, ``qat_init_seeds``) share: their command line, running one
pipeline job in a process of its own, reading its artifacts' metrics, and mean ± s.d."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def parser(doc: str, seeds_help: str, jobs_help: str) -> argparse.ArgumentParser:
    """``--seeds``, ``--jobs``, ``--out`` and the pipeline overrides after ``--``; the tool adds its own."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2", help=seeds_help)
    ap.add_argument("--jobs", type=int, default=1, help=jobs_help)
    ap.add_argument("--out", default=None, help="folder for the runs (default: outputs/<tool>/<time>)")
    ap.add_argument("overrides", nargs="*", help="pipeline overrides after --, e.g. experiment=... data.root=...")
    return ap


def seeds_and_out(args: argparse.Namespace, tool: str) -> tuple[list[int], Path]:
    """The seeds (at least two, for a standard deviation) and the folder for the runs."""
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if len(seeds) < 2:
        raise SystemExit(f"{tool}: give at least two seeds (--seeds 0,1,2) for a standard deviation")
    return seeds, Path(args.out or f"outputs/{tool}/{time.strftime('%Y-%m-%d_%H-%M-%S')}")


def run_job(tool: str, overrides: list[str], run_dir: Path) -> dict[str, dict]:
    """``python -m pipeline <overrides>`` into ``run_dir`` (its log in ``log.txt``); each artifact's ``metrics.json``
    by node name, with ``path``. A failed job ends the tool with its last log line."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pipeline", "progress=false", f"hydra.run.dir={run_dir}", *overrides]
    with open(run_dir / "log.txt", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = (run_dir / "log.txt").read_text().strip().splitlines()[-1:]
        raise SystemExit(f"{tool}: {' '.join(overrides)} failed (rc {rc}): {tail[0] if tail else ''}; "
                         f"see {run_dir / 'log.txt'}")
    arts = json.loads((run_dir / "artifacts.json").read_text())
    return {name: {**json.loads((Path(a["path"]) / "metrics.json").read_text()), "path": a["path"]}
            for name, a in arts.items() if (Path(a["path"]) / "metrics.json").is_file()}


def stats(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else float("nan")
    return f"{statistics.mean(xs):.2f} ± {sd:.2f}"
