"""Experiment tracking with the real libraries: runs written by the pipeline, read back with MLflow's client
and TensorBoard's event reader; reused stages, failed runs, a failing store, sweeps as parent + children."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.runner import Runner, run_pipeline
from pipeline.tracking import RunInfo, Tracking, flatten, node_metrics, report_metrics
from pipeline.tracking.mlflow_tracker import MlflowTracker, Settings

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")

ROOT = Path(__file__).resolve().parents[1]
# fewer images and a cheap validate (no serving sweeps); the bundle stays on (it is stored as an artifact)
CHEAP = ["pipeline=[train,export,validate]", "data.train_subset=256", "validate.serving_batch_sizes=[]",
         "validate.concurrency=[]", "validate.deploy_optimized=false"]


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made once (creating them takes seconds); tests copy it."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def _store(empty_store: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(empty_store, folder / "mlflow.db"))


def _client(outputs: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{outputs}/mlflow.db")


def _runs(client, **kw) -> list:
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, order_by=["attributes.start_time ASC"], **kw)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pipeline.tracking" and r.levelno == logging.WARNING]


def test_flatten_and_metric_names():
    assert flatten({"prune": {"ratio": 0.5, "exclude": ["fc"]}, "seed": 0, "x": None}) == \
        {"prune.ratio": "0.5", "prune.exclude": '["fc"]', "seed": "0", "x": "null"}
    series, scalars = node_metrics("train", {"history": [{"epoch": 1, "loss": 2.0, "val_acc": float("nan")},
                                                         {"epoch": 2, "loss": 1.5, "val_acc": 40.0}],
                                             "test_acc": 41.0, "parity": {"top1_agreement": 99.0}, "ok": True,
                                             "float_ops": {"GELU (no INT8 kernel in ONNX Runtime)": 2}})
    assert series == [(1, {"train/loss": 2.0}), (2, {"train/loss": 1.5, "train/val_acc": 40.0})]
    assert scalars == {"train/test_acc": 41.0, "train/parity/top1_agreement": 99.0, "train/float_ops/GELU": 2.0}
    assert report_metrics({"rows": [{"name": "qat-int8", "accuracy": 50.0, "int8_coverage": None},
                                    {"name": "qat-int8@openvino", "accuracy": 51.0}]}) == \
        {"validate/qat-int8/accuracy": 50.0, "validate/qat-int8:openvino/accuracy": 51.0}


def test_logger_config_errors_are_one_line_before_anything_runs(cfg_factory, tmp_path, monkeypatch):
    with pytest.raises(PipelineError, match=r"logger\.wandb: unknown experiment tracker; choose from mlflow, "):
        Runner(cfg_factory("pipeline=[train]", "+logger.wandb={}"), tmp_path)
    with pytest.raises(PipelineError, match=r"logger\.mlflow\.log_bundle: got 'maybe'"):
        Runner(cfg_factory("pipeline=[train]", "logger=mlflow", "logger.mlflow.log_bundle=maybe"), tmp_path)
    with pytest.raises(PipelineError, match=r"^config error: logger\.mlflow\.register_model=m registers the logged "
                                            r"bundle's model; set log_bundle=true$"):
        Runner(cfg_factory("pipeline=[train]", "logger=mlflow", "logger.mlflow.register_model=m",
                           "logger.mlflow.log_bundle=false"), tmp_path)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if the package were not installed
    with pytest.raises(PipelineError, match=r"logger=mlflow needs the mlflow package, which is not installed; "
                                            r"pip install -e '\.\[mlflow\]'"):
        Runner(cfg_factory("pipeline=[train]", "logger=[mlflow,tensorboard]"), tmp_path)
    assert not (tmp_path / "outputs").exists()  # nothing ran


def test_tracked_run_reads_back_and_reused_and_failed_runs_are_complete(cfg_factory, tmp_path, caplog, empty_store):
    """One tiny tracked run (MLflow and TensorBoard), then the same training reused, then a run that fails."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    caplog.set_level(logging.INFO, logger="pipeline.tracking")
    outputs = tmp_path / "outputs"
    _store(empty_store, outputs)
    run1 = tmp_path / "run1"
    run_pipeline(cfg_factory(*CHEAP, "train.epochs=2", "logger=[mlflow,tensorboard]",
                             "logger.mlflow.register_model=tiny-classifier"), run1)
    client = _client(outputs)
    [r1] = _runs(client)
    assert r1.info.status == "FINISHED" and r1.info.run_name == "run1"
    exp = client.get_experiment(r1.info.experiment_id)
    assert exp.name == "resnet8" and exp.artifact_location == (outputs / "mlflow-artifacts").as_uri()
    assert r1.data.params["train.epochs"] == "2" and r1.data.params["model.name"] == "resnet8"
    assert r1.data.params["pipeline"] == '["train", "export", "validate"]'
    tags = r1.data.tags
    assert tags["reused.train"] == "false" and tags["artifact.train"] == run1.joinpath(
        "artifacts.json").read_text().split('"key": "')[1][:12]
    assert {"git_commit", "cpu", "version.torch", "artifact.export/train"} <= set(tags) and tags["best"] == "baseline"
    history = client.get_metric_history(r1.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2]
    assert {"train/val_acc", "train/lr", "train/test_acc", "export/train/size_mb", "validate/baseline/accuracy",
            "validate/baseline/latency_ms_p50", "validate/baseline/speedup_vs_baseline"} <= set(r1.data.metrics)
    files = {a.path for folder in ("", "report", "deploy") for a in client.list_artifacts(r1.info.run_id, folder)}
    assert {"config.yaml", "artifacts.json", "report/report.md", "report/report.json", "report/report.png",
            "deploy/model.onnx", "deploy/bundle.json"} <= files
    [version] = client.search_model_versions("name='tiny-classifier'")  # the recommended model, registered
    assert version.run_id == r1.info.run_id and version.tags == {"file": "model.onnx", "runtime": "onnxruntime"}
    assert version.source.endswith("/deploy/model.onnx") and tags["registered_model"] == "tiny-classifier/1"
    rep = json.loads((run1 / "report.json").read_text())
    assert rep["tracking"][0] == {"backend": "mlflow", "uri": f"sqlite:///{outputs}/mlflow.db",
                                  "run_id": r1.info.run_id, "experiment_id": r1.info.experiment_id}
    assert rep["tracking"][1]["backend"] == "tensorboard"
    opened = [m for m in caplog.messages if m.startswith("tracking: mlflow run")]
    assert opened == [f"tracking: mlflow run {r1.info.run_id} in sqlite:///{outputs}/mlflow.db; open it with: "
                      f"mlflow ui --backend-store-uri sqlite:///{outputs}/mlflow.db"]

    events = EventAccumulator(str(run1 / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([m.value for m in history])
    assert "validate/baseline/accuracy" in events.Tags()["scalars"]
    assert {"config/text_summary", "tags/text_summary"} <= set(events.Tags()["tensors"])
    assert "model:\n" in events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "report" in events.Tags()["images"]

    # the same training again: reused, and its run still has the stored per-epoch metrics
    run_pipeline(cfg_factory(*CHEAP, "stage=train", "train.epochs=2", "logger=mlflow"), tmp_path / "run2")
    r2 = _runs(client)[1]
    assert r2.data.tags["reused.train"] == "true" and r2.data.tags["artifact.train"] == tags["artifact.train"]
    assert [(m.step, m.value) for m in client.get_metric_history(r2.info.run_id, "train/loss")] == \
        [(m.step, m.value) for m in history]

    # a run that fails is marked FAILED with its error line
    with pytest.raises(PipelineError, match="fewer than one batch"):
        run_pipeline(cfg_factory(*CHEAP, "stage=train", "train.batch_size=512", "logger=mlflow"), tmp_path / "run3")
    r3 = _runs(client)[2]
    assert r3.info.status == "FAILED" and "training images are fewer than one batch of 512" in r3.data.tags["error"]
    assert not _warnings(caplog)


def test_a_store_that_fails_mid_run_is_warned_about_once_and_the_run_goes_on(tmp_path, caplog, empty_store):
    """A real MLflow store that stops working after the run started (its database overwritten, its artifact
    folder replaced by a file): one warning, no exception, and report.json learns what happened."""
    caplog.set_level(logging.INFO, logger="pipeline.tracking")
    db, art = _store(empty_store, tmp_path), tmp_path / "artifacts"
    tracking = Tracking([MlflowTracker(Settings(f"sqlite:///{db}", str(art), "x", None, True))])
    run = RunInfo("x", "run", tmp_path, {"a": "1"}, {}, "a: 1\n")
    tracking.start(run, {})
    tracking.node_done("train", "k1", {"history": [{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 0.5}]}, False)
    tracking.flush()
    run_id = tracking.info()["run_id"]
    from mlflow.tracking import MlflowClient

    assert len(MlflowClient(f"sqlite:///{db}").get_metric_history(run_id, "train/loss")) == 2
    # break the store under the running tracker
    (tmp_path / "report.json").write_text(json.dumps({"rows": [], "gates": {"failures": []}, "best": None}))
    (tmp_path / "report.md").write_text("# report\n")
    shutil.rmtree(art, ignore_errors=True)
    art.write_text("not a folder")
    db.write_bytes(b"not a database" * 100)
    tracking.node_done("export/train", "k2", {"size_mb": 1.0}, reused=True)
    tracking.run_files(tmp_path, lambda t: True)
    tracking.close()
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and warnings[0].startswith("tracking: mlflow failed to ")
    assert "error" in tracking.info()


@pytest.mark.slow
def test_a_submitit_sweep_is_one_parent_run_with_a_child_per_job_process(tmp_path):
    """Two jobs through the SLURM launcher's code path (Submitit's local executor: a process each, at once)
    over a knob training does not read: one job trains under the artifact lock, the other reuses it; the
    tracker shows one parent run and a child per job."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "pipeline", "-m", "experiment=tiny", "pipeline=[train]",
                          "train.epochs=2", "validate.batch_size=8,16", f"paths.outputs={tmp_path}",
                          f"hydra.sweep.dir={tmp_path}/sweep", "hydra/launcher=submitit_local",
                          "hydra.launcher.timeout_min=10", "logger=mlflow"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(list((tmp_path / "sweep/.submitit").glob("*/*_result.pkl"))) == 2  # a Submitit job each
    assert len(list((tmp_path / "artifacts/train").glob("*/manifest.json"))) == 1  # built once
    runs = _runs(client := _client(tmp_path))
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2 and parents[0].info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert sorted(c.data.tags["reused.train"] for c in children) == ["false", "true"]
    assert all(len(client.get_metric_history(c.info.run_id, "train/loss")) == 2 for c in children)


@pytest.mark.heavy
def test_sweep_is_one_parent_run_with_a_child_per_job(tmp_path):
    """A 2-job sweep over a validate knob: one parent run, two children; the second job reuses the training."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "pipeline", "-m", "experiment=tiny", *CHEAP, "validate.deploy=false",
                          f"paths.outputs={tmp_path}", "validate.batch_size=8,16", "logger=mlflow"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    client = _client(tmp_path)
    runs = _runs(client)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["jobs"] == "2"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(c.data.params["validate.batch_size"] for c in children) == ["16", "8"]
    assert sorted(c.data.tags["reused.train"] for c in children) == ["false", "true"]
    assert all(len(client.get_metric_history(c.info.run_id, "train/loss")) == 1 for c in children)
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "summary")} >= {"summary/summary.md",
                                                                                       "summary/summary.json"}


def test_search_marks_reach_the_parent_and_child_runs(tmp_path, empty_store):
    """A search's parent run (opened and closed by the sweep callback's hooks) gets the summary and the
    recommended trial; its child runs get their trial's Pareto and recommended marks."""
    from omegaconf import OmegaConf

    from pipeline import tracking

    sweep = tmp_path / "sweep"
    _store(empty_store, tmp_path)
    config = OmegaConf.create({
        "model": {"name": "resnet8"},
        "logger": {"mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                              "artifact_location": str(tmp_path / "art"), "experiment": None, "run_name": None,
                              "log_bundle": False}},
        "hydra": {"sweep": {"dir": str(sweep)}, "overrides": {"task": ["search=prune_ratio"]},
                  "runtime": {"choices": {"experiment": "tiny"}}}})
    tracking.sweep_start(config)
    parents = json.loads((sweep / tracking.PARENT_FILE).read_text())
    for job in ("0_a", "1_b"):  # what each job's runner does, with the parent the sweep wrote
        t = Tracking([MlflowTracker(Settings(**config.logger.mlflow))])
        t.start(RunInfo("tiny", job, sweep / job, {}, {"job": job}, ""), parents)
        t.close()
    trials = [{"number": 0, "job": "0_a", "pareto": True, "feasible": True},
              {"number": 1, "job": "1_b", "pareto": False, "feasible": False},
              {"number": 2, "job": None, "pareto": False, "feasible": False}]  # pruned by the probe: no job
    (sweep / "search.json").write_text(json.dumps({"trials": trials, "recommended": 0,
                                                   "reproduce": "python -m pipeline prune.ratio=0.3"}))
    (sweep / "summary.md").write_text("# Sweep summary\n")
    tracking.sweep_end(config, {"jobs": [{}, {}], "rows": [], "failed": []})
    client = _client(tmp_path)
    runs = {r.data.tags.get("job", "parent"): r for r in _runs(client)}
    assert client.get_experiment(runs["parent"].info.experiment_id).name == "tiny"
    parent = runs["parent"]
    assert parent.info.status == "FINISHED" and parent.data.params["sweep.overrides"] == "search=prune_ratio"
    assert parent.data.tags["search.recommended_trial"] == "0"
    assert parent.data.tags["search.reproduce"] == "python -m pipeline prune.ratio=0.3"
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "summary")} == \
        {"summary/search.json", "summary/summary.md"}
    assert runs["0_a"].data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert (runs["0_a"].data.tags["search.pareto"], runs["0_a"].data.tags["search.recommended"]) == ("true", "true")
    assert (runs["1_b"].data.tags["search.pareto"], runs["1_b"].data.tags["search.feasible"]) == ("false", "false")


def test_a_search_that_stops_on_a_bad_space_closes_its_parent_run_as_failed(tmp_path, empty_store):
    """The sweep callback opens the parent run before the search sweeper checks its space; the sweeper's
    one-line error closes it FAILED with that line (Hydra does not call the callback's end after an exit)."""
    _store(empty_store, tmp_path / "o")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
    out = subprocess.run([sys.executable, "-m", "pipeline", "-m", "experiment=tiny", "search=base", "logger=mlflow",
                          f"paths.outputs={tmp_path}/o", f"hydra.sweep.dir={tmp_path}/sweep"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "the search space is empty" in out.stderr, out.stderr[-2000:]
    runs = _runs(_client(tmp_path / "o"))
    assert [r.info.status for r in runs] == ["FAILED"]  # the parent, no job ran; none left RUNNING
    assert "the search space is empty" in runs[0].data.tags["error"] and runs[0].info.end_time is not None
