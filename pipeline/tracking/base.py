"""The interface every experiment tracker implements, and what the pipeline logs through it.

A backend (MLflow, TensorBoard) is one module of this package with a ``Tracker`` subclass and the dataclass
of its settings (``conf/logger/<name>.yaml``). It imports its library inside its methods, so the module
imports without it. The pipeline never calls a tracker directly: ``pipeline.tracking.Tracking`` fans every
call out to the configured backends on one background thread and turns a backend's failure into one warning.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class RunInfo:
    """What a run needs to know to start: names, the flattened config, tags, and its parent (a sweep)."""

    experiment: str  # experiment / project name
    run_name: str  # the run folder's name
    run_dir: Path  # the Hydra run folder
    params: dict[str, str]  # the resolved config, flattened (``prune.ratio`` -> ``"0.5"``)
    tags: dict[str, str]  # git commit, CPU, versions
    config_yaml: str  # the resolved config as YAML
    parent: dict | None = None  # what the sweep's parent run wrote to <sweep dir>/tracking.json for this backend


class Tracker(ABC):
    """One backend's run. Every method may raise: the caller warns once and stops using the backend."""

    name: str = ""  # the backend's name in conf/logger/ and report.json

    def __init__(self, settings: Any):
        self.settings = settings

    @abstractmethod
    def start(self, run: RunInfo) -> None:
        """Open the run and record params, tags and the config."""

    @abstractmethod
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Scalars at one step (an epoch; 0 for values without one)."""

    @abstractmethod
    def set_tags(self, tags: dict[str, str]) -> None:
        """Labels of the run (reused artifacts, artifact keys, the recommended model)."""

    @abstractmethod
    def log_file(self, path: Path, folder: str | None = None) -> None:
        """A file or a whole folder as the run's artifact (in ``folder`` of the run's artifacts)."""

    def log_image(self, path: Path, name: str) -> None:
        """A PNG plot; by default stored as a file."""
        self.log_file(path, "report")

    def register(self, bundle: Path, folder: str) -> None:  # noqa: B027 (optional: a no-op where not overridden)
        """Register the deploy bundle's recommended model (logged under ``folder``) where the backend has a
        model registry and the settings name one; others do nothing."""

    @abstractmethod
    def finish(self, status: str, error: str | None = None) -> None:
        """Close the run: ``FINISHED``, ``FAILED`` (with the error line) or ``KILLED``."""

    @abstractmethod
    def info(self) -> dict:
        """``{"backend", "uri", "run_id"}`` for report.json."""

    @abstractmethod
    def open_hint(self) -> str:
        """The command that shows the run (one line)."""

    # ------------------------------------------------------------ sweeps (optional)

    @classmethod
    def sweep_start(cls, settings: Any, run: RunInfo) -> dict | None:
        """A sweep's parent run; what it returns is stored in <sweep dir>/tracking.json and handed to every
        job's ``RunInfo.parent``. None: the backend has no parent runs (TensorBoard: folders nest instead)."""
        return None

    @classmethod
    def sweep_end(cls, settings: Any, parent: dict, files: list[Path], tags: dict[str, str],
                  job_tags: dict[str, dict[str, str]], status: str) -> None:
        """Close the parent run: summary files as artifacts, ``tags`` on the parent and ``job_tags`` (job folder
        name -> tags) on the child runs. Backends without parent runs have nothing to close."""
        return None


def finite(value: Any) -> bool:
    """A number a tracker can plot (bools, NaN and infinities are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
