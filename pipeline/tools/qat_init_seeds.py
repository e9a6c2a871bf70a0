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

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.tools._seeds import parser, run_job, seeds_and_out, stats


def _run(overrides: list[str], run_dir: Path, stage: str) -> dict:
    """One pipeline job: the metrics of ``stage``'s artifact, its ``model.pt``, the ptq stage's test accuracy
    (where it ran) and the job's seconds."""
    start = time.perf_counter()
    metrics = run_job("qat_init_seeds", overrides, run_dir)
    return {**metrics[stage], "model_pt": str(Path(metrics[stage]["path"]) / "model.pt"),
            "ptq_test_acc": metrics.get("ptq", {}).get("test_acc"), "seconds": time.perf_counter() - start}


def _weights(overrides: list[str], out: Path) -> list[str]:
    """The overrides every job starts from: the given ``model.weights``, or those of a model trained once here."""
    if any(o.startswith("model.weights=") for o in overrides):
        return [*overrides, "train.epochs=0"]
    print("qat_init_seeds: training the model once (stage=train) ...", flush=True)
    trained = _run([*overrides, "stage=train"], out / "train", "train")
    print(f"qat_init_seeds: trained model {trained['test_acc']:.2f}% ({trained['model_pt']})", flush=True)
    return [*overrides, f"model.weights={trained['model_pt']}", "train.epochs=0"]


def main() -> None:
    ap = parser(__doc__, "comma-separated seeds", "pipeline processes at a time (GPU: several fit)")
    ap.add_argument("--ptq-epochs", type=int, default=1, help="QAT epochs from the PTQ model")
    ap.add_argument("--calibration-epochs", type=int, default=2, help="QAT epochs from min/max calibration")
    ap.add_argument("--source", default="train", help="the model stage both quantize (ptq.source, qat.source)")
    args = ap.parse_args()
    seeds, out = seeds_and_out(args, "qat_init_seeds")
    if min(args.ptq_epochs, args.calibration_epochs) < 1:
        raise SystemExit("qat_init_seeds: --ptq-epochs and --calibration-epochs must be at least 1")
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
    print(f"over {len(seeds)} seeds: PTQ alone {stats(cols['ptq_alone'])}%, QAT from PTQ ({e1} ep) "
          f"{stats(cols['from_ptq'])}%, from calibration ({e2} ep) {stats(cols['from_calibration'])}%, "
          f"difference {stats(gap)} points")
    summary = {"overrides": args.overrides, "ptq_epochs": e1, "calibration_epochs": e2, "rows": rows,
               **{f"{k}_mean": statistics.mean(v) for k, v in cols.items()},
               "difference_mean": statistics.mean(gap), "difference_sd": statistics.stdev(gap)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "qat_init_seeds.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
