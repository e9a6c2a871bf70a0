"""Benchmark: does QAT from the PTQ model need fewer epochs? QAT from the ptq stage's model against QAT from
min/max calibration, from the same trained weights, over several seeds.

    python -m pipeline.tools.qat_init_seeds --seeds 0,1,2 --ptq-epochs 1 --calibration-epochs 2 -- \\
        experiment=cifar10_full data.root=... model.name=efficientnet_b0 qat.lr=0.001 qat.select=best

Without ``model.weights`` among the overrides the model is trained first (``stage=train``, once); every job then
starts from its ``model.pt`` (``model.weights=<it> train.epochs=0``). Per seed (``seed=<s>``: validation split,
calibration images, shuffling) two jobs run: ``qat.init=ptq qat.freeze_observer_epoch=0`` for ``--ptq-epochs``
(``pipeline=[train,ptq,qat]``) and ``qat.init=calibration`` for ``--calibration-epochs`` (``pipeline=[train,qat]``),
both quantizing ``--source`` (ptq.source, qat.source), ``--jobs`` processes at a time. Prints each seed's test
accuracies (PTQ alone too) and their mean ± s.d.; writes ``qat_init_seeds.json`` next to the runs.
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


def _run(overrides: list[str], run_dir: Path, stage: str) -> dict:
    """One pipeline process; the metrics of ``stage``'s artifact."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pipeline", "progress=false", f"hydra.run.dir={run_dir}", *overrides]
    start = time.perf_counter()
    with open(run_dir / "log.txt", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = (run_dir / "log.txt").read_text().strip().splitlines()[-1:]
        raise SystemExit(f"qat_init_seeds: {' '.join(overrides)} failed (rc {rc}): {tail[0] if tail else ''}; "
                         f"see {run_dir / 'log.txt'}")
    arts = json.loads((run_dir / "artifacts.json").read_text())
    metrics = {name: json.loads((Path(a["path"]) / "metrics.json").read_text()) for name, a in arts.items()
               if (Path(a["path"]) / "metrics.json").is_file()}
    return {**metrics[stage], "model_pt": str(Path(arts[stage]["path"]) / "model.pt"),
            "ptq_test_acc": metrics.get("ptq", {}).get("test_acc"), "seconds": time.perf_counter() - start}


def _stats(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else float("nan")
    return f"{statistics.mean(xs):.2f} ± {sd:.2f}"


def _weights(overrides: list[str], out: Path) -> list[str]:
    """The overrides every job starts from: the given ``model.weights``, or those of a model trained once here."""
    if any(o.startswith("model.weights=") for o in overrides):
        return [*overrides, "train.epochs=0"]
    print("qat_init_seeds: training the model once (stage=train) ...", flush=True)
    trained = _run([*overrides, "stage=train"], out / "train", "train")
    print(f"qat_init_seeds: trained model {trained['test_acc']:.2f}% ({trained['model_pt']})", flush=True)
    return [*overrides, f"model.weights={trained['model_pt']}", "train.epochs=0"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--ptq-epochs", type=int, default=1, help="QAT epochs from the PTQ model")
    ap.add_argument("--calibration-epochs", type=int, default=2, help="QAT epochs from min/max calibration")
    ap.add_argument("--source", default="train", help="the model stage both quantize (ptq.source, qat.source)")
    ap.add_argument("--jobs", type=int, default=1, help="pipeline processes at a time (GPU: several fit)")
    ap.add_argument("--out", default=None, help="folder for the runs (default: outputs/qat_init_seeds/<time>)")
    ap.add_argument("overrides", nargs="*", help="pipeline overrides after --, e.g. experiment=... data.root=...")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if len(seeds) < 2:
        raise SystemExit("qat_init_seeds: give at least two seeds (--seeds 0,1,2) for a standard deviation")
    if min(args.ptq_epochs, args.calibration_epochs) < 1:
        raise SystemExit("qat_init_seeds: --ptq-epochs and --calibration-epochs must be at least 1")
    out = Path(args.out or f"outputs/qat_init_seeds/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    common = [f"ptq.source={args.source}", f"qat.source={args.source}", *_weights(args.overrides, out)]
    arms = {"ptq": ["pipeline=[train,ptq,qat]", "qat.init=ptq", "qat.freeze_observer_epoch=0",
                    f"qat.epochs={args.ptq_epochs}"],
            "calibration": ["pipeline=[train,qat]", "qat.init=calibration", f"qat.epochs={args.calibration_epochs}"]}
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {(s, arm): pool.submit(_run, [*common, *extra, f"seed={s}"], out / f"seed{s}-{arm}", "qat")
                   for s in seeds for arm, extra in arms.items()}
        results = {k: f.result() for k, f in futures.items()}
    rows = [{"seed": s, "ptq_alone": results[(s, "ptq")]["ptq_test_acc"], "from_ptq": results[(s, "ptq")]["test_acc"],
             "from_calibration": results[(s, "calibration")]["test_acc"],
             "seconds_from_ptq": round(results[(s, "ptq")]["seconds"], 1),
             "seconds_from_calibration": round(results[(s, "calibration")]["seconds"], 1)} for s in seeds]
    e1, e2 = args.ptq_epochs, args.calibration_epochs
    for r in rows:
        print(f"seed {r['seed']}: PTQ alone {r['ptq_alone']:.2f}%, QAT from PTQ ({e1} ep) {r['from_ptq']:.2f}%, "
              f"from calibration ({e2} ep) {r['from_calibration']:.2f}%")
    cols = {k: [r[k] for r in rows] for k in ("ptq_alone", "from_ptq", "from_calibration")}
    gap = [a - b for a, b in zip(cols["from_ptq"], cols["from_calibration"], strict=True)]
    print(f"over {len(seeds)} seeds: PTQ alone {_stats(cols['ptq_alone'])}%, QAT from PTQ ({e1} ep) "
          f"{_stats(cols['from_ptq'])}%, from calibration ({e2} ep) {_stats(cols['from_calibration'])}%, "
          f"difference {_stats(gap)} points")
    summary = {"overrides": args.overrides, "ptq_epochs": e1, "calibration_epochs": e2, "rows": rows,
               **{f"{k}_mean": statistics.mean(v) for k, v in cols.items()},
               "difference_mean": statistics.mean(gap), "difference_sd": statistics.stdev(gap)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "qat_init_seeds.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
