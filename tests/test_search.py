"""The multi-objective search sweeper (hydra/sweeper=pareto): space parsing, Pareto front, recommendation,
bad input, resuming, and a real search on the tiny preset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.search import Dimension, pareto, recommend

ROOT = Path(__file__).resolve().parent.parent


def test_dimensions_parse_hydra_sweep_syntax():
    import optuna

    study = optuna.create_study()
    trial = study.ask()
    d = Dimension("prune.drop_blocks", "choice([], [layer1.1], [layer1.1,layer1.2])")
    assert d.choices == ["[]", "[layer1.1]", "[layer1.1,layer1.2]"]
    assert d.suggest(trial).split("=", 1)[1] in d.choices
    r = Dimension("prune.ratio", "interval(0.2, 0.7)")
    v = float(r.suggest(trial).split("=")[1])
    assert 0.2 <= v <= 0.7 and len(str(v)) <= 5  # readable: three decimals
    assert Dimension("train.epochs", "range(1,4)").choices == ["1", "2", "3"]
    with pytest.raises(PipelineError, match="is a single value"):
        Dimension("prune.ratio", "0.3")


def test_pareto_front_and_recommendation():
    points = [(0, [50.0, 2.0]), (1, [55.0, 1.5]), (2, [49.0, 1.9]), (3, [55.0, 1.5])]
    assert pareto(points, ["maximize", "maximize"]) == {0, 1, 3}
    assert pareto([(0, [1.0, 5.0]), (1, [2.0, 4.0])], ["maximize", "minimize"]) == {1}
    trials = [{"number": 0, "state": "COMPLETE", "feasible": True, "row": {"accuracy": 50, "speedup_vs_baseline": 2}},
              {"number": 1, "state": "COMPLETE", "feasible": False, "row": {"accuracy": 60, "speedup_vs_baseline": 1}},
              {"number": 2, "state": "PRUNED", "feasible": False, "row": None}]
    assert recommend(trials)["number"] == 0
    assert recommend(trials[1:]) is None


def _search(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "pipeline", "-m", "experiment=tiny", f"paths.outputs={tmp_path}/o",
                           f"hydra.sweep.dir={tmp_path}/sweep", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.parametrize("args,match", [
    (["search=base"], "the search space is empty"),
    (["search=prune_qat"], r"search space: prune.drop_blocks=\[layer1.1\] is not valid here \(prune.drop_blocks: "
                           "no layer named 'layer1.1' in resnet8"),
    (["search=prune_ratio", "+hydra.sweeper.params.prune_ratioo='choice(1,2)'"],
     "hydra.sweeper.params: 'prune_ratioo' is not a config key"),
    (["search=prune_ratio", "search.objectives=[accuracy,speed]"], "search.objectives: unknown 'speed'"),
    (["search=prune_ratio", "prune.ratio=0.3,0.5"], "prune.ratio=0.3,0.5: searched keys go into hydra.sweeper.params"),
])
def test_bad_searches_are_one_line_errors_before_any_trial(tmp_path, args, match):
    out = _search(tmp_path, *args)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    import re

    assert re.search(match, out.stderr), out.stderr[-2000:]
    assert not (tmp_path / "o/artifacts").exists()


@pytest.mark.slow
def test_search_runs_prunes_resumes_and_recommends(tmp_path):
    # trial 0: a probe-pruned trial is impossible to meet (min_speedup 50); then relax and resume
    out = _search(tmp_path, "search=prune_ratio", "hydra.sweeper.n_trials=1", "search.min_speedup=50")
    assert out.returncode == 0, out.stderr[-3000:]
    first = json.loads((tmp_path / "sweep/search.json").read_text())
    assert [t["state"] for t in first["trials"]] == ["PRUNED"] and first["recommended"] is None
    assert "no trial meets the constraints" in (tmp_path / "sweep/summary.md").read_text()
    assert not (tmp_path / "o/artifacts/train").exists()  # pruned before any training
    out = _search(tmp_path, "search=prune_ratio", "hydra.sweeper.n_trials=3", "search.min_speedup=0.01",
                  "search.max_accuracy_drop=100", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                  "hydra.sweeper.n_jobs=2")  # the two missing trials in parallel
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "sweep/search.json").read_text())
    assert len(res["trials"]) == 3 and res["trials"][0] == {**first["trials"][0], "pareto": False}
    assert [t["state"] for t in res["trials"][1:]] == ["COMPLETE", "COMPLETE"]
    assert res["recommended"] in res["pareto"] and res["reproduce"].startswith("python -m pipeline experiment=tiny")
    assert "hydra" not in res["reproduce"]
    summary = (tmp_path / "sweep/summary.md").read_text()
    assert "recommended" in summary and "Pareto" in summary
    assert len(list((tmp_path / "o/artifacts/train").glob("*/manifest.json"))) == 1  # the baseline, shared
