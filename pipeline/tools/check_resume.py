"""Check: kill -9 a training stage after its 2nd epoch, run the same command again, compare with an
uninterrupted run (bit for bit, on CPU).

    python -m pipeline.tools.check_resume --stage distill [--outputs /tmp/resume-check]

Prints, per stage, the epoch it was killed after, ``resumed_at_epoch`` from the artifact, and whether
every tensor of the resumed ``model.pt`` equals the uninterrupted run's.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _run(overrides: list[str], out: Path, wait: bool = True) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipeline", *overrides, f"paths.outputs={out}",
           f"hydra.run.dir={out}/run{time.time_ns()}"]
    p = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if wait and p.wait() != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return p


def _state(out: Path, stage: str) -> tuple[dict, dict]:
    path = Path(glob.glob(f"{out}/artifacts/{stage}/*/model.pt")[0])
    return torch.load(path, weights_only=True)["state_dict"], json.loads((path.parent / "metrics.json").read_text())


def check(stage: str, root: Path, kill_after: int = 2, extra: list[str] | None = None) -> bool:
    overrides = ["experiment=tiny", f"stage={stage}", "data.train_subset=3000", f"{stage}.epochs=4", "progress=false",
                 *(extra or [])]
    ref, victim = root / f"{stage}-ref", root / f"{stage}-victim"
    _run(overrides, ref)
    p = _run(overrides, victim, wait=False)
    while True:  # wait for the stage's own resume checkpoint after epoch `kill_after`
        hits = glob.glob(f"{victim}/artifacts/{stage}/*.work/**/last.pt", recursive=True)
        with_epoch = [h for h in hits if torch.load(h, weights_only=True)["epoch"] >= kill_after] if hits else []
        if with_epoch:
            break
        if p.poll() is not None:
            raise SystemExit(f"{stage} finished before it could be killed; raise {stage}.epochs")
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    _run(overrides, victim)
    (a, _), (b, metrics) = _state(ref, stage), _state(victim, stage)
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(f"{stage}: killed after epoch {kill_after}, resumed_at_epoch={metrics.get('resumed_at_epoch')}, "
          f"bit-identical to the uninterrupted run: {same}")
    return same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", action="append", choices=["train", "prune", "distill", "qat"],
                    help="training stage to check (repeatable; default: all four)")
    ap.add_argument("--outputs", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--kill-after", type=int, default=2, help="kill once this epoch's checkpoint exists")
    ap.add_argument("overrides", nargs="*", help="more pipeline overrides, e.g. qat.distill_alpha=0.5")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.outputs or tmp)
        stages = args.stage or ["train", "prune", "distill", "qat"]
        ok = [check(s, root, args.kill_after, args.overrides) for s in stages]
    sys.exit(0 if all(ok) else 1)


if __name__ == "__main__":
    main()
