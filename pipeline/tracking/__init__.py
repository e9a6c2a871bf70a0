"""Experiment tracking: every run, sweep and search in MLflow and/or TensorBoard (``logger=...``).

``conf/logger/<name>.yaml`` puts a backend's settings at ``logger.<name>`` (``logger=[mlflow,tensorboard]``
selects several). A backend is one module of this package (``_REGISTRY``), imported only when it is used;
a missing package is a one-line error naming the pip extra, raised by the config check before anything runs.

The runner opens one :class:`Tracking` per pipeline run (rank 0 only under torchrun). Every call goes to a
background thread in order, so a slow store does not hold training up; a backend that fails is reported
once and left out for the rest of the run, which finishes its artifacts and report as usual.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import queue
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pipeline.errors import first_line
from pipeline.tracking.base import RunInfo, Tracker, finite

log = logging.getLogger(__name__)

# name -> ("module:Class", "module:SettingsClass", the package it needs, the pip extra that installs it)
_REGISTRY: dict[str, tuple[str, str, str, str]] = {
    "mlflow": ("pipeline.tracking.mlflow_tracker:MlflowTracker", "pipeline.tracking.mlflow_tracker:Settings",
               "mlflow", "mlflow"),
    "tensorboard": ("pipeline.tracking.tensorboard_tracker:TensorBoardTracker",
                    "pipeline.tracking.tensorboard_tracker:Settings", "tensorboard", "tensorboard"),
}
PARENT_FILE = "tracking.json"  # a sweep's parent runs, at the root of the sweep folder
REPORT_METRICS = ("accuracy", "accuracy_delta_vs_baseline", "speedup_vs_baseline", "throughput_ips",
                  "latency_ms_p50", "latency_ms_p90", "latency_ms_p99", "int8_coverage", "size_mb", "params",
                  "macs", "parity_top1_agreement")  # per report row: validate/<row>/<metric>
CLOSE_TIMEOUT_S = 300.0  # longest wait for the tracker thread at the end of a run (a store that hangs)


def _load(target: str) -> Any:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # ValueError: a module whose __spec__ is None (blocked in sys.modules)
        return False


def bind_settings(section: Any, errors: list[str]) -> dict[str, Any]:
    """``cfg.logger`` -> backend name -> its bound settings; unknown backends and missing packages are
    appended to ``errors`` (one line each, naming the fix)."""
    from pipeline.config import bind

    if section is None:
        return {}
    if not isinstance(section, (dict, DictConfig)):
        errors.append(f"logger: got {section!r}; choose logger=none, logger=mlflow, logger=tensorboard or "
                      "logger=[mlflow,tensorboard]")
        return {}
    out = {}
    for name in section:
        if name not in _REGISTRY:
            errors.append(f"logger.{name}: unknown experiment tracker; choose from {', '.join(sorted(_REGISTRY))}")
            continue
        _, settings_cls, package, extra = _REGISTRY[name]
        bound = bind(section[name], _load(settings_cls), f"logger.{name}", errors)
        if not _installed(package):
            errors.append(f"logger={name} needs the {package} package, which is not installed; "
                          f"pip install -e '.[{extra}]'")
            continue
        if bound is not None:
            out[str(name)] = bound
    return out


def flatten(cfg: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as ``{"prune.ratio": "0.5", ...}`` (lists as text), for a tracker's params."""
    out: dict[str, str] = {}
    items = cfg.items() if isinstance(cfg, dict) else []
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = "null" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return out


def metric_name(name: str) -> str:
    """A name every tracker takes (MLflow: letters, digits, ``_-. :/``): a row on another runtime
    (``qat-int8@openvino``) as ``qat-int8:openvino``, a key's explanation in parentheses dropped
    (``float_ops/GELU (no INT8 kernel in ONNX Runtime)`` as ``float_ops/GELU``), anything else as ``_``."""
    parts = [p.split(" (")[0].replace("@", ":") for p in name.split("/")]
    return re.sub(r"[^\w\-. :/]", "_", "/".join(parts), flags=re.ASCII)


def node_metrics(node: str, metrics: dict) -> tuple[list[tuple[int, dict[str, float]]], dict[str, float]]:
    """A stage's ``metrics.json`` as (per-epoch rows with their epoch, the other numbers), named ``<node>/...``:
    ``history`` rows become ``train/loss``, ``train/val_acc``, ... at step = epoch; numbers at the top level
    and one level down (``export/qat/parity/top1_agreement``) become single values."""
    series = []
    for row in metrics.get("history") or []:
        if isinstance(row, dict) and isinstance(row.get("epoch"), int):
            values = {metric_name(f"{node}/{k}"): float(v) for k, v in row.items() if k != "epoch" and finite(v)}
            series.append((row["epoch"], values))
    scalars: dict[str, float] = {}
    for k, v in metrics.items():
        if finite(v):
            scalars[metric_name(f"{node}/{k}")] = float(v)
        elif isinstance(v, dict):
            scalars.update({metric_name(f"{node}/{k}/{kk}"): float(vv) for kk, vv in v.items() if finite(vv)})
    return series, scalars


def report_metrics(rep: dict) -> dict[str, float]:
    """validate's rows as ``validate/<row>/<metric>`` (accuracy, speedup, latency, INT8 coverage, ...), named by
    ``metric_name``."""
    return {metric_name(f"validate/{r['name']}/{k}"): float(r[k]) for r in rep.get("rows", [])
            for k in REPORT_METRICS if finite(r.get(k))}


def experiment_name(cfg: DictConfig) -> str:
    """The experiment preset's name (``experiment=tiny``), else the model's name."""
    choice = OmegaConf.select(cfg, "hydra.runtime.choices.experiment", default=None)
    if choice is None:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            choice = HydraConfig.get().runtime.choices.get("experiment")
    return str(choice or OmegaConf.select(cfg, "model.name", default=None) or "pipeline")


def run_tags() -> dict[str, str]:
    """Where a result came from: git commit, CPU and its SIMD flags, package versions."""
    from pipeline.env import cpu_info, git_commit, versions

    cpu = cpu_info()
    tags = {"cpu": cpu["cpu"], "cpu.cores": str(cpu["cores"]), "cpu.flags": ",".join(cpu["flags"])}
    tags |= {f"version.{k}": v for k, v in versions().items()}
    if commit := git_commit():
        tags["git_commit"] = commit
    return tags


class _Backend:
    """One tracker and whether it still works (a failure is warned about once, then it is left out)."""

    def __init__(self, tracker: Tracker):
        self.tracker, self.error = tracker, None

    def call(self, what: str, fn: Callable[[Tracker], Any]) -> None:
        if self.error is not None:
            return
        try:
            fn(self.tracker)
        except Exception as e:
            self.error = first_line(e, 300)
            log.warning("tracking: %s failed to %s (%s); the run goes on without %s", self.tracker.name, what,
                        self.error, self.tracker.name)


class Tracking:
    """The configured trackers of one pipeline run, fed in order from a background thread."""

    def __init__(self, trackers: list[Tracker]):
        self.backends = [_Backend(t) for t in trackers]
        self._queue: queue.Queue = queue.Queue()
        self._started = threading.Event()
        self._thread: threading.Thread | None = None
        if self.backends:
            self._thread = threading.Thread(target=self._work, name="tracking", daemon=True)
            self._thread.start()

    def __bool__(self) -> bool:
        return bool(self.backends)

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            if isinstance(job, threading.Event):  # flush(): everything before it is done
                job.set()
                continue
            what, fn = job
            for b in self.backends:
                b.call(what, fn)
            if what == "start the run":
                self._started.set()

    def _submit(self, what: str, fn: Callable[[Tracker], Any]) -> None:
        if self._thread is not None:
            self._queue.put((what, fn))

    # ------------------------------------------------------------ what the runner calls

    def start(self, run: RunInfo, parents: dict[str, dict]) -> None:
        def go(t: Tracker) -> None:
            run.parent = parents.get(t.name)
            t.start(run)

        self._submit("start the run", go)

    def node_done(self, node: str, key: str, metrics: dict, reused: bool) -> None:
        """A finished graph node, built or reused: its artifact key, ``reused`` tag and stored metrics."""
        series, scalars = node_metrics(node, metrics)

        def go(t: Tracker) -> None:
            t.set_tags({f"artifact.{node}": key, f"reused.{node}": str(reused).lower()})
            for step, values in series:
                t.log_metrics(values, step)
            if scalars:
                t.log_metrics(scalars, 0)

        self._submit(f"log {node}", go)

    def run_files(self, run_dir: Path, log_bundle: Callable[[Tracker], bool]) -> None:
        """The run folder's report (metrics, plot, files) and deploy bundle, once the run is done."""
        rep_path = run_dir / "report.json"
        rep = json.loads(rep_path.read_text()) if rep_path.is_file() else None

        def go(t: Tracker) -> None:
            if rep is not None:
                t.log_metrics(report_metrics(rep), 0)
                t.set_tags({"best": str(rep.get("best")), "gates": "; ".join(rep["gates"]["failures"]) or "passed"})
                for name in ("report.md", "report.json"):
                    t.log_file(run_dir / name, "report")
                for png in sorted(run_dir.glob("*.png")):
                    t.log_image(png, png.stem)
            if (run_dir / "artifacts.json").is_file():
                t.log_file(run_dir / "artifacts.json")
            if (run_dir / "deploy").is_dir() and log_bundle(t):
                t.log_file(run_dir / "deploy", "deploy")
                t.register(run_dir / "deploy", "deploy")

        self._submit("log the report", go)

    def flush(self, timeout: float = 60.0) -> None:
        """Wait until everything submitted so far has been handed to the backends."""
        if self._thread is not None:
            done = threading.Event()
            self._queue.put(done)
            done.wait(timeout)

    def info(self, timeout: float = 60.0) -> dict | list[dict] | None:
        """For report.json: ``{"backend", "uri", "run_id"}`` (a list with several backends; ``error`` when one
        failed). Waits for the run to have started."""
        if not self.backends:
            return None
        self._started.wait(timeout)
        out = []
        for b in self.backends:
            try:
                i = b.tracker.info()
            except Exception as e:
                i = {"backend": b.tracker.name, "error": first_line(e)}
            if b.error is not None:
                i["error"] = b.error
            out.append(i)
        return out[0] if len(out) == 1 else out

    def close(self, error: BaseException | None = None) -> None:
        """Finish the runs (``FAILED`` with the error line, ``KILLED`` on Ctrl-C), wait for the thread, and log
        one line per backend saying where the run is and how to open it."""
        if self._thread is None:
            return
        status = "FINISHED" if error is None else "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        line = None if error is None else first_line(error, 500) or type(error).__name__
        self._submit("finish the run", lambda t: t.finish(status, line))
        self._queue.put(None)
        self._thread.join(CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            log.warning("tracking: the tracker did not finish within %.0f s; its run may be incomplete",
                        CLOSE_TIMEOUT_S)
            return
        for b in self.backends:
            if b.error is None:
                i = b.tracker.info()
                log.info("tracking: %s run %s in %s; open it with: %s", b.tracker.name, i.get("run_id"),
                         i.get("uri"), b.tracker.open_hint())


def make_trackers(settings: dict[str, Any]) -> list[Tracker]:
    return [_load(_REGISTRY[name][0])(s) for name, s in settings.items()]


def open_run(settings: dict[str, Any], cfg: DictConfig, run_dir: Path, config_yaml: str) -> Tracking:
    """Start one tracked run for a pipeline run (no backends: a Tracking that does nothing)."""
    tracking = Tracking(make_trackers(settings))
    if not tracking:
        return tracking
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    run = RunInfo(experiment=experiment_name(cfg), run_name=run_dir.name, run_dir=Path(run_dir),
                  params=flatten(container), tags={**run_tags(), "run_dir": str(Path(run_dir).absolute())},
                  config_yaml=config_yaml)
    tracking.start(run, _sweep_parents(run))
    return tracking


def _sweep_parents(run: RunInfo) -> dict[str, dict]:
    """In a multirun job: the parent runs the sweep opened (``<sweep dir>/tracking.json``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return {}
    path = Path(HydraConfig.get().sweep.dir) / PARENT_FILE
    run.tags["job"] = run.run_name
    return json.loads(path.read_text()) if path.is_file() else {}


# ------------------------------------------------------------ sweeps (called by pipeline.sweep's callback)


def sweep_start(config: DictConfig) -> None:
    """Open a parent run per backend for a ``-m`` sweep or search; jobs find it in <sweep dir>/tracking.json."""
    from pipeline.artifacts import write_json

    errors: list[str] = []
    settings = bind_settings(config.get("logger"), errors)
    if not settings:
        return
    sweep_dir = Path(config.hydra.sweep.dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    task = list(config.hydra.overrides.get("task") or [])
    run = RunInfo(experiment=experiment_name(config), run_name=sweep_dir.name, run_dir=sweep_dir,
                  params={"sweep.overrides": " ".join(task)[:6000]},
                  tags={**run_tags(), "sweep_dir": str(sweep_dir.absolute()), "sweep": "true"}, config_yaml="")
    parents = {}
    for name, s in settings.items():
        try:
            parent = _load(_REGISTRY[name][0]).sweep_start(s, run)
        except Exception as e:
            log.warning("tracking: %s could not open the sweep's parent run (%s); jobs are tracked on their own",
                        name, first_line(e, 300))
            continue
        if parent is not None:
            parents[name] = parent
    if parents:
        write_json(sweep_dir / PARENT_FILE, parents)


def sweep_end(config: DictConfig, summary: dict | None, error: BaseException | None = None) -> None:
    """Close the parent runs: the summary (and a search's files) as artifacts, the search's Pareto marks and
    recommended trial as tags of the parent and of the child runs. ``error``: the sweep stopped before its end
    (a bad search space, Ctrl-C); the parent runs close ``FAILED`` (``KILLED`` on Ctrl-C) with the error line
    as their ``error`` tag."""
    sweep_dir = Path(config.hydra.sweep.dir)
    path = sweep_dir / PARENT_FILE
    if not path.is_file():
        return
    parents = json.loads(path.read_text())
    errors: list[str] = []
    settings = bind_settings(config.get("logger"), errors)
    if error is not None:
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        _close_parents(parents, settings, [], {"error": first_line(error, 500) or type(error).__name__}, {}, status)
        return
    files = [p for p in (sweep_dir / n for n in ("summary.md", "summary.json", "summary.png", "search.md",
                                                  "search.json")) if p.is_file()]
    tags: dict[str, str] = {"jobs": str(len((summary or {}).get("jobs", []))),
                            "failed_jobs": str(len((summary or {}).get("failed", [])))}
    job_tags: dict[str, dict[str, str]] = {}
    search_path = sweep_dir / "search.json"
    if search_path.is_file():
        search = json.loads(search_path.read_text())
        tags["search.recommended_trial"] = str(search.get("recommended"))
        tags["search.reproduce"] = str(search.get("reproduce") or search.get("note"))
        for t in search["trials"]:
            if t.get("job"):
                job_tags[t["job"]] = {"search.trial": str(t["number"]), "search.pareto": str(t["pareto"]).lower(),
                                      "search.feasible": str(t["feasible"]).lower(),
                                      "search.recommended": str(t["number"] == search.get("recommended")).lower()}
    if summary is None:  # no job wrote a report (e.g. pipeline=[train]): failed only if a job left its error
        status = "FAILED" if any(sweep_dir.glob("*/error.txt")) else "FINISHED"  # pipeline.sweep.JOB_ERROR
    else:
        status = "FAILED" if summary.get("failed") and not summary.get("jobs") else "FINISHED"
    _close_parents(parents, settings, files, tags, job_tags, status)


def _close_parents(parents: dict[str, dict], settings: dict[str, Any], files: list[Path], tags: dict[str, str],
                   job_tags: dict[str, dict[str, str]], status: str) -> None:
    for name, parent in parents.items():
        if name not in settings:
            continue
        try:
            _load(_REGISTRY[name][0]).sweep_end(settings[name], parent, files, tags, job_tags, status)
        except Exception as e:
            log.warning("tracking: %s could not close the sweep's parent run (%s)", name, first_line(e, 300))


__all__ = ["PARENT_FILE", "RunInfo", "Tracker", "Tracking", "bind_settings", "flatten", "node_metrics",
           "open_run", "report_metrics", "sweep_end", "sweep_start"]
