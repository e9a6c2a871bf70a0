"""Benchmark: does knowledge distillation help? KD vs the same student without KD, over several seeds.

    python -m pipeline.tools.kd_seeds --seeds 0,1,2 --jobs 2 -- experiment=cifar10_converged data.root=...

Runs ``stage=distill`` twice per seed (``distill.alpha`` as configured, and ``distill.alpha=0``: plain
cross-entropy, no teacher pass), each with ``distill.seed=<seed>`` from the same teacher and pruned start
(built once under the artifact lock, then reused from the cache), ``--jobs`` processes at a time. Prints each seed's
test accuracies and the mean ± s.d. of both and of the gain; writes ``kd_seeds.json`` next to the runs.
"""

from __future__ import annotations

import json
import statistics
from concurrent.futures import ThreadPoolExecutor

from pipeline.tools._seeds import parser, run_job, seeds_and_out, stats


def _run(overrides: list[str], run_dir) -> dict:
    return run_job("kd_seeds", ["stage=distill", *overrides], run_dir)["distill"]


def main() -> None:
    ap = parser(__doc__, "comma-separated student seeds", "distill processes at a time (GPU: several fit)")
    args = ap.parse_args()
    seeds, out = seeds_and_out(args, "kd_seeds")
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
    print(f"over {len(seeds)} seeds (teacher {teacher:.2f}%): KD {stats(kd)}%, no KD {stats(no_kd)}%, "
          f"gain {stats(gain)} points")
    summary = {"overrides": args.overrides, "teacher_test_acc": teacher, "rows": rows,
               "kd_mean": statistics.mean(kd), "no_kd_mean": statistics.mean(no_kd),
               "gain_mean": statistics.mean(gain), "gain_sd": statistics.stdev(gain)}
    (out / "kd_seeds.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
