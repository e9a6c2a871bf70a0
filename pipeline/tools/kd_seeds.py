"""Benchmark: does knowledge distillation help? KD vs the same student without KD, over several seeds.

    python -m pipeline.tools.kd_seeds --seeds 0,1,2 --jobs 2 -- experiment=cifar10_converged data.root=...

Runs ``stage=distill`` twice per seed (``distill.alpha`` as configured, and ``distill.alpha=0``: plain
cross-entropy, no teacher pass), each with ``distill.seed=<seed>`` from the same teacher and pruned start
(built once under the artifact lock, then reused from the cache), ``--jobs`` processes at a time. Prints each seed's
test accuracies and the mean ± s.d. of both and of the gain; writes ``kd_seeds.json`` next to the runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _run(overrides: list[str], run_dir: Path) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pipeline", "stage=distill", "progress=false", f"hydra.run.dir={run_dir}",
           *overrides]
    with open(run_dir / "log.txt", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = (run_dir / "log.txt").read_text().strip().splitlines()[-1:]
        raise SystemExit(f"kd_seeds: {' '.join(overrides)} failed (rc {rc}): {tail[0] if tail else ''}; "
                         f"see {run_dir / 'log.txt'}")
    art = json.loads((run_dir / "artifacts.json").read_text())["distill"]
    return json.loads((Path(art["path"]) / "metrics.json").read_text())


def _stats(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else float("nan")
    return f"{statistics.mean(xs):.2f} ± {sd:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated student seeds")
    ap.add_argument("--jobs", type=int, default=1, help="distill processes at a time (GPU: several fit)")
    ap.add_argument("--out", default=None, help="folder for the runs (default: outputs/kd_seeds/<time>)")
    ap.add_argument("overrides", nargs="*", help="pipeline overrides after --, e.g. experiment=... data.root=...")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if len(seeds) < 2:
        raise SystemExit("kd_seeds: give at least two seeds (--seeds 0,1,2) for a standard deviation")
    out = Path(args.out or f"outputs/kd_seeds/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    jobs = [(s, kd) for s in seeds for kd in (True, False)]  # a shared upstream is built once (artifact lock)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {(s, kd): pool.submit(_run, [*args.overrides, f"distill.seed={s}",
                                               *([] if kd else ["distill.alpha=0"])],
                                        out / f"seed{s}-{'kd' if kd else 'no_kd'}") for s, kd in jobs}
        results = {k: f.result() for k, f in futures.items()}
    rows = [{"seed": s, "kd": results[(s, True)]["test_acc"], "no_kd": results[(s, False)]["test_acc"]}
            for s in seeds]
    for r in rows:
        r["gain"] = r["kd"] - r["no_kd"]
        print(f"seed {r['seed']}: KD {r['kd']:.2f}%, no KD {r['no_kd']:.2f}%, gain {r['gain']:+.2f} points")
    kd, no_kd, gain = ([r[k] for r in rows] for k in ("kd", "no_kd", "gain"))
    teacher = results[(seeds[0], True)]["teacher_test_acc"]
    print(f"over {len(seeds)} seeds (teacher {teacher:.2f}%): KD {_stats(kd)}%, no KD {_stats(no_kd)}%, "
          f"gain {_stats(gain)} points")
    summary = {"overrides": args.overrides, "teacher_test_acc": teacher, "rows": rows,
               "kd_mean": statistics.mean(kd), "no_kd_mean": statistics.mean(no_kd),
               "gain_mean": statistics.mean(gain), "gain_sd": statistics.stdev(gain)}
    (out / "kd_seeds.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
