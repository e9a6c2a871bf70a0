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
    pytest.param(["search=base"], "the search space is empty", marks=pytest.mark.heavy),  # and in test_bad_inputs
    (["search=prune_qat"], r"search space: prune.drop_blocks=\[layer1.1\] is not valid here \(prune.drop_blocks: "
                           "no layer named 'layer1.1' in resnet8"),
    # the rest in the heavy run (each case is a CLI run of about 15 s on 2 cores)
    pytest.param(["search=prune_ratio", "+hydra.sweeper.params.prune_ratioo='choice(1,2)'"],
                 "hydra.sweeper.params: 'prune_ratioo' is not a config key", marks=pytest.mark.heavy),
    pytest.param(["search=prune_ratio", "search.objectives=[accuracy,speed]"], "search.objectives: unknown 'speed'",
                 marks=pytest.mark.heavy),
    pytest.param(["search=prune_ratio", "prune.ratio=0.3,0.5"],
                 "prune.ratio=0.3,0.5: searched keys go into hydra.sweeper.params", marks=pytest.mark.heavy),
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
    cheap = ("prune.epochs=0", "qat.epochs=0", "search.pruner=none")  # 1 distillation epoch per trial
    out = _search(tmp_path, "search=prune_ratio", "hydra.sweeper.n_trials=1", "search.min_speedup=50", *cheap)
    assert out.returncode == 0, out.stderr[-3000:]
    first = json.loads((tmp_path / "sweep/search.json").read_text())
    assert [t["state"] for t in first["trials"]] == ["PRUNED"] and first["recommended"] is None
    assert "no trial meets the constraints" in (tmp_path / "sweep/summary.md").read_text()
    assert not (tmp_path / "o/artifacts/train").exists()  # pruned before any training
    out = _search(tmp_path, "search=prune_ratio", "hydra.sweeper.n_trials=3", "search.min_speedup=0.01",
                  "search.max_accuracy_drop=100", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                  "hydra.sweeper.n_jobs=2", *cheap)  # the two missing trials in parallel
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "sweep/search.json").read_text())
    assert len(res["trials"]) == 3 and res["trials"][0] == {**first["trials"][0], "pareto": False}
    assert [t["state"] for t in res["trials"][1:]] == ["COMPLETE", "COMPLETE"]
    assert [t["epochs_trained"] for t in res["trials"]] == [0, 1, 1] and res["budget"]["spent"] == 2
    assert res["recommended"] in res["pareto"] and res["reproduce"].startswith("python -m pipeline experiment=tiny")
    assert "hydra" not in res["reproduce"]
    summary = (tmp_path / "sweep/summary.md").read_text()
    assert "recommended" in summary and "Pareto" in summary
    assert len(list((tmp_path / "o/artifacts/train").glob("*/manifest.json"))) == 1  # the baseline, shared


# ---------------------------------------------------------------- multi-fidelity, warm start, storage


def test_pruner_stops_a_weaker_trial_at_its_first_rung_and_replays_cached_stages(tmp_path):
    import optuna

    from pipeline.fidelity import FIDELITY_SUFFIX, TrialPruned, TrialReporter, make_pruner, open_storage

    storage = open_storage(f"sqlite:///{tmp_path}/s.db")
    study = optuna.create_study(storage=storage, study_name="s" + FIDELITY_SUFFIX, direction="maximize",
                                pruner=make_pruner("successive_halving", 1, 2, 3))
    first = TrialReporter(study.ask(), ["prune", "distill"], 3)
    first.reused("prune", [{"epoch": 1, "val_acc": 40.0}])  # a cached stage: step 1, no epoch trained
    first.epoch("distill", 1, 45.0, main=True)
    first.epoch("distill", 1, 99.0, main=False)  # a side model: counted, not reported
    first.epoch("train", 1, 99.0, main=True)  # not a fidelity stage
    assert first.step == 2 and first.trained == 2
    assert study.trials[0].intermediate_values == {1: 40.0, 2: 45.0}
    assert study.trials[0].user_attrs["epochs_trained"] == 2
    study.tell(0, 45.0)
    weak = TrialReporter(study.ask(), ["prune", "distill"], 3)
    with pytest.raises(TrialPruned, match="after fine-tuning epoch 1"):
        weak.epoch("prune", 1, 20.0, main=True)
    assert study.trials[1].user_attrs == {"epochs_trained": 1, "stopped_at_epoch": 1}
    study.tell(1, state=optuna.trial.TrialState.PRUNED)
    last = TrialReporter(study.ask(), ["prune"], 1)  # after its last epoch a trial is never stopped
    last.epoch("prune", 1, 5.0, main=True)
    assert last.step == 1


def test_a_trial_job_reports_to_its_fidelity_trial_by_number(tmp_path):
    """The job side of ``search.trial=<number>``: its epochs reach that trial of the fidelity study (read back as
    the search reads it), and a number the study does not hold is a one-line error."""
    import optuna
    from omegaconf import OmegaConf

    from pipeline.fidelity import FIDELITY_SUFFIX, open_storage, reporting, storage_url

    fid = optuna.create_study(storage=open_storage(storage_url(None, tmp_path)), direction="maximize",
                              study_name="search" + FIDELITY_SUFFIX)
    fid.ask(), fid.ask()
    cfg = OmegaConf.create({"prune": {"epochs": 2}, "search": {
        "trial": 1, "fidelity_stages": ["prune"], "pruner": "none", "min_epochs": 1, "reduction_factor": 3,
        "storage": None}})
    with reporting(cfg, tmp_path) as reporter:  # its own storage object, as in the job's process
        reporter.epoch("prune", 1, 42.0, main=True)
    reported = {t.number: t for t in fid.get_trials(deepcopy=False)}
    assert reported[1].intermediate_values == {1: 42.0} and reported[1].user_attrs == {"epochs_trained": 1}
    assert reported[0].intermediate_values == {} and reported[0].user_attrs == {}
    cfg.search.trial = 5
    with pytest.raises(PipelineError, match=r"search.trial=5: the study 'search:fidelity' has no such trial"), \
            reporting(cfg, tmp_path):
        pass


def test_budget_counts_each_trials_full_fine_tuning():
    from omegaconf import OmegaConf

    from pipeline.fidelity import fine_tune_epochs

    cfg = OmegaConf.create({"prune": {"epochs": 1, "steps": 3, "step_epochs": 1}, "distill": {"epochs": 2,
                            "compare_no_kd": True}, "qat": {"epochs": 1}, "train": {"epochs": 30}})
    assert fine_tune_epochs(cfg, ["prune", "distill", "qat"]) == (4, 1 + 3 + 2 * 2 + 1)


def test_warm_start_points_must_lie_in_the_space(tmp_path):
    d = Dimension("prune.ratio", "interval(0.2, 0.7)")
    c = Dimension("prune.drop_blocks", "choice([], [layer1.1])")
    assert d.param(0.3, "point 0") == 0.3 and c.param(["layer1.1"], "point 0") == "[layer1.1]"
    with pytest.raises(PipelineError, match=r"point 1 sets prune.ratio=0.9, outside the searched interval"):
        d.param(0.9, "point 1")
    with pytest.raises(PipelineError, match=r"not one of the searched choices \(\[\], \[layer1.1\]\)"):
        c.param(["layer2.0"], "point 0")
    from pipeline.search_report import sweep_points

    job = tmp_path / "grid/0_prune.ratio=0.3"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra/overrides.yaml").write_text("- experiment=tiny\n- prune.ratio=0.3\n- hydra.verbose=true\n")
    (job / "report.json").write_text('{"rows": []}')
    assert sweep_points(tmp_path / "grid") == [("job 0_prune.ratio=0.3", {"prune.ratio": 0.3})]
    with pytest.raises(PipelineError, match="is not a sweep folder"):
        sweep_points(tmp_path / "nope")


def test_grid_comparison_verdicts():
    from types import SimpleNamespace

    from pipeline.search_report import compare_grid

    grid = {"sweep": "g", "epochs": 12, "points": [
        {"point": "prune.ratio=0.3", "accuracy": 50.0, "delta": -1.0, "speedup": 1.5},
        {"point": "prune.ratio=0.7", "accuracy": 40.0, "delta": -11.0, "speedup": 2.5}]}
    s = SimpleNamespace(max_accuracy_drop=2.0, min_speedup=2.0)

    def best(acc, speed):
        return {"row": {"accuracy": acc, "speedup_vs_baseline": speed}}

    assert compare_grid(grid, best(49.5, 2.1), s)["verdict"] == "meets the constraints where no grid point does"
    assert compare_grid(grid, best(50.0, 1.5), s)["grid_best"]["point"] == "prune.ratio=0.3"  # most accurate
    assert compare_grid(grid, best(50.0, 1.5), s)["verdict"] == "dominates or equals the grid's best"
    s.min_speedup = 1.0
    assert compare_grid(grid, best(49.0, 3.0), s)["verdict"] == "does not beat the grid's best"
    assert compare_grid(grid, None, s)["verdict"] == "no recommended trial"


def test_storage_urls_and_missing_drivers():
    from pipeline.fidelity import open_storage, safe_url, storage_url

    assert storage_url(None, Path("/x/sweep")) == "sqlite:////x/sweep/search.db"
    assert safe_url("postgresql://me:secret@db:5432/search") == "postgresql://me:***@db:5432/search"
    for url, package in [("postgresql://me@127.0.0.1:1/s", "psycopg2-binary"),
                         ("mysql+pymysql://me@127.0.0.1:1/s", "PyMySQL")]:
        try:
            open_storage(url)
        except PipelineError as e:
            assert str(e).endswith(f"pip install {package}") or "cannot open" in str(e), e
        else:  # the driver is installed and connected to nothing: open_storage must have failed
            raise AssertionError(url)


@pytest.mark.heavy
def test_four_trial_search_through_submitit_local_shares_one_study_and_the_baseline(tmp_path):
    # 4 trials, 2 at a time, each a separate process started by Submitit's local executor (the SLURM
    # launcher's code path); the two first trials need the same baseline: one builds it under the lock
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    out = _search(tmp_path, "search=base", "hydra/launcher=submitit_local", "hydra.sweep.subdir=${hydra.job.num}",
                  "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2", "pipeline=[train,prune,export,validate]",
                  "validate.models=[baseline,prune]", "search.row=prune", "search.fidelity_stages=[prune]",
                  "++hydra.sweeper.params={prune.ratio:'interval(0.2,0.6)'}", "search.min_speedup=null",
                  "search.max_accuracy_drop=null", "search.probe=false", "search.budget_epochs=null")
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads((tmp_path / "sweep/search.json").read_text())
    assert len(res["trials"]) == 4 and res["storage"] == f"sqlite:///{tmp_path}/sweep/search.db"
    for t in res["trials"]:  # each trial's job reported its epoch to the one study, from its own process
        assert t["state"] == "COMPLETE" and list(t["intermediate"]) == ["1"] and t["epochs_trained"] == 1, t
        assert (tmp_path / "sweep" / t["job"] / "report.json").is_file()
    assert res["budget"]["spent"] == 4 and res["recommended"] is not None
    assert len(list((tmp_path / "sweep/.submitit").glob("*/*_result.pkl"))) == 4
    assert len(list((tmp_path / "o/artifacts/train").glob("*/manifest.json"))) == 1  # the baseline, built once


@pytest.mark.heavy
def test_four_trial_search_through_the_ray_launcher_shares_one_study_and_the_baseline(tmp_path, ray_env):
    # the same search as through Submitit, each trial a Ray task in a worker process of its own on a local Ray
    # instance the search starts once (for both batches) and stops at its end
    env = {**ray_env, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
    out = subprocess.run([sys.executable, "-m", "pipeline", "-m", "experiment=tiny", f"paths.outputs={tmp_path}/o",
                          f"hydra.sweep.dir={tmp_path}/sweep", "search=base", "hydra/launcher=ray",
                          "hydra.sweep.subdir=${hydra.job.num}", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
                          "pipeline=[train,prune,export,validate]", "validate.models=[baseline,prune]",
                          "search.row=prune", "search.fidelity_stages=[prune]",
                          "++hydra.sweeper.params={prune.ratio:'interval(0.2,0.6)'}", "search.min_speedup=null",
                          "search.max_accuracy_drop=null", "search.probe=false", "search.budget_epochs=null",
                          "hydra.job_logging.formatters.simple.format='pid %(process)d: %(message)s'"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("Ray: a local Ray instance") == 1 and out.stdout.count("Ray is launching 2 jobs") == 2
    res = json.loads((tmp_path / "sweep/search.json").read_text())
    assert len(res["trials"]) == 4 and res["storage"] == f"sqlite:///{tmp_path}/sweep/search.db"
    pids = set()
    for t in res["trials"]:  # each trial's job reported its epoch to the one study, from its own process
        assert t["state"] == "COMPLETE" and list(t["intermediate"]) == ["1"] and t["epochs_trained"] == 1, t
        assert (tmp_path / "sweep" / t["job"] / "report.json").is_file()
        log = (tmp_path / "sweep" / t["job"] / "__main__.log").read_text()
        pids |= {line.split(":")[0] for line in log.splitlines() if line.startswith("pid ")}
    assert len(pids) == 4, pids  # a worker process per trial
    assert res["budget"]["spent"] == 4 and res["recommended"] is not None
    assert len(list((tmp_path / "o/artifacts/train").glob("*/manifest.json"))) == 1  # the baseline, built once
