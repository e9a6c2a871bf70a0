"""MLflow (``logger=mlflow``): one run per pipeline run, a parent run per sweep or search.

The only module of the pipeline that imports ``mlflow`` (``pip install -e '.[mlflow]'``: the lightweight
``mlflow-skinny`` client with SQLAlchemy for the local SQLite store; ``mlflow ui`` needs the full ``mlflow``
package). By default the store is a SQLite file under ``paths.outputs``; ``logger.mlflow.tracking_uri`` points
it at a server.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline.tracking.base import RunInfo, Tracker

MAX_PARAM = 6000  # MLflow's limit on a param value's length (characters)
MAX_TAG = 8000  # and on a tag value's
BATCH = 100  # params or tags per log_batch call
METRICS_BATCH = 1000


@dataclass
class Settings:
    """``conf/logger/mlflow.yaml`` (``logger.mlflow.*``)."""

    tracking_uri: str  # sqlite:///<file>, a folder, or http(s)://host:port of a tracking server
    artifact_location: str | None  # where a new experiment stores files (null: the server's default)
    experiment: str | None  # null: the experiment preset's name, else the model's name
    run_name: str | None  # null: the run folder's name
    log_bundle: bool  # also store the deploy bundle (the ONNX models) with the run
    register_model: str | None = None  # the bundle's recommended model as a new version of this registered model

    def check(self) -> list[str]:
        if self.register_model and not self.log_bundle:
            return [f"register_model={self.register_model} registers the logged bundle's model; set log_bundle=true"]
        return []


def local_uri(uri: str) -> str:
    """A relative SQLite path made absolute (so the printed ``mlflow ui`` command works from anywhere)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).absolute())
    return uri


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    for name in ("mlflow", "alembic"):  # after the import, which sets mlflow's level ("Creating initial MLflow
        logging.getLogger(name).setLevel(logging.WARNING)  # database tables..." is not news)
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, name: str, artifact_location: str | None) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = Path(artifact_location).absolute().as_uri() if artifact_location and "://" not in artifact_location \
        else artifact_location
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # a parallel job created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _log_batch(client, run_id: str, params: dict[str, str] | None = None, tags: dict[str, str] | None = None) -> None:
    from mlflow.entities import Param, RunTag

    ps = [Param(k[:250], v[:MAX_PARAM]) for k, v in (params or {}).items()]
    ts = [RunTag(k[:250], v[:MAX_TAG]) for k, v in (tags or {}).items()]
    for i in range(0, len(ps), BATCH):
        client.log_batch(run_id, params=ps[i:i + BATCH])
    for i in range(0, len(ts), BATCH):
        client.log_batch(run_id, tags=ts[i:i + BATCH])


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.uri = local_uri(settings.tracking_uri)
        self.client = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None

    def start(self, run: RunInfo) -> None:
        s: Settings = self.settings
        parent = run.parent or {}
        if parent.get("tracking_uri"):
            self.uri = parent["tracking_uri"]
        self.client = _client(self.uri)
        self.experiment_id = parent.get("experiment_id") or _experiment_id(self.client, s.experiment or run.experiment,
                                                                           s.artifact_location)
        tags = {**run.tags, "mlflow.runName": s.run_name or run.run_name}
        if run.tags.get("git_commit"):
            tags["mlflow.source.git.commit"] = run.tags["git_commit"]
        if parent.get("run_id"):
            tags["mlflow.parentRunId"] = parent["run_id"]
        created = self.client.create_run(self.experiment_id, run_name=s.run_name or run.run_name)
        self.run_id = created.info.run_id
        _log_batch(self.client, self.run_id, run.params, tags)
        self.client.log_text(self.run_id, run.config_yaml, "config.yaml")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        ms = [Metric(k, v, now, step) for k, v in metrics.items()]
        for i in range(0, len(ms), METRICS_BATCH):
            self.client.log_batch(self.run_id, metrics=ms[i:i + METRICS_BATCH])

    def set_tags(self, tags: dict[str, str]) -> None:
        _log_batch(self.client, self.run_id, tags=tags)

    def log_file(self, path: Path, folder: str | None = None) -> None:
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, str(path), folder)
        else:
            self.client.log_artifact(self.run_id, str(path), folder)

    def register(self, bundle: Path, folder: str) -> None:
        """The bundle's recommended ONNX model (logged under ``folder``) as a new version of
        ``register_model`` in the model registry, tagged with the runtime it was measured on."""
        name = self.settings.register_model
        if not name:
            return
        from mlflow.exceptions import MlflowException

        meta = json.loads((bundle / "bundle.json").read_text())
        model = meta["recommended"]
        try:
            self.client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{self.client.get_run(self.run_id).info.artifact_uri}/{folder}/{model}"
        runtime = (meta["models"].get(model, {}).get("runtime") or {}).get("name", "onnxruntime")
        version = self.client.create_model_version(name, source, run_id=self.run_id,
                                                   tags={"file": model, "runtime": runtime})
        self.client.set_tag(self.run_id, "registered_model", f"{name}/{version.version}")

    def finish(self, status: str, error: str | None = None) -> None:
        if error:
            self.client.set_tag(self.run_id, "error", error[:MAX_TAG])
        self.client.set_terminated(self.run_id, status)

    def info(self) -> dict:
        return {"backend": self.name, "uri": self.uri, "run_id": self.run_id, "experiment_id": self.experiment_id}

    def open_hint(self) -> str:
        if self.uri.startswith(("http://", "https://")):
            return f"{self.uri}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return f"mlflow ui --backend-store-uri {self.uri}"

    # ------------------------------------------------------------ sweeps

    @classmethod
    def sweep_start(cls, settings: Settings, run: RunInfo) -> dict | None:
        uri = local_uri(settings.tracking_uri)
        client = _client(uri)
        experiment_id = _experiment_id(client, settings.experiment or run.experiment, settings.artifact_location)
        parent = client.create_run(experiment_id, run_name=run.run_name)
        _log_batch(client, parent.info.run_id, run.params, {**run.tags, "mlflow.runName": run.run_name})
        return {"run_id": parent.info.run_id, "experiment_id": experiment_id, "tracking_uri": uri}

    @classmethod
    def sweep_end(cls, settings: Settings, parent: dict, files: list[Path], tags: dict[str, str],
                  job_tags: dict[str, dict[str, str]], status: str) -> None:
        client = _client(parent["tracking_uri"])
        run_id = parent["run_id"]
        for f in files:
            client.log_artifact(run_id, str(f), "summary")
        _log_batch(client, run_id, tags=tags)
        if job_tags:
            children = client.search_runs([parent["experiment_id"]],
                                          filter_string=f"tags.mlflow.parentRunId = '{run_id}'", max_results=10_000)
            for child in children:
                if (extra := job_tags.get(child.data.tags.get("job", ""))) is not None:
                    _log_batch(client, child.info.run_id, tags=extra)
        client.set_terminated(run_id, status)
