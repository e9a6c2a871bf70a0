"""Multi-fidelity search: a trial's fine-tuning epochs as Optuna intermediate values, and the study storage.

The search (``pipeline.search``) gives each trial's job ``search.trial=<number>``, the number of its trial in
the fidelity study (below). In that job a reporter watches the fine-tuning stages (``search.fidelity_stages``):
after every epoch it reports the validation accuracy at step = the trial's fine-tuning epochs so far (a stage
reused from the artifact cache replays its recorded history at no cost, so steps mean the same in every
trial) and asks the pruner whether to go on. A trial the pruner stops ends its job early (``TrialPruned``); the
epochs it trained and the step it stopped at are kept on the trial, and its last epoch's checkpoint stays in the
artifact's work folder, so the same config run in full later resumes from it.

Optuna's pruners take single-objective studies, so the intermediate values live in a companion study
``<study>:fidelity`` (one trial per search trial, maximising validation accuracy) in the same storage. Speed
needs no pruner: the probe rejects too-slow architectures before any fine-tuning.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from pipeline.errors import PipelineError
from pipeline.training import OBSERVERS, EpochObserver

log = logging.getLogger(__name__)

FIDELITY_SUFFIX = ":fidelity"
DRIVERS = {"postgresql": "psycopg2-binary", "mysql": "PyMySQL"}  # what a database URL needs installed


class TrialPruned(Exception):  # noqa: N818 (Optuna's name for the same event)
    """The pruner stopped this trial after ``step`` fine-tuning epochs."""

    def __init__(self, step: int, value: float):
        super().__init__(f"search: trial stopped by the pruner after fine-tuning epoch {step} "
                         f"(validation accuracy {value:.2f}%)")
        self.step, self.value = step, value


def storage_url(storage: str | None, sweep_dir: Path) -> str:
    """``search.storage``: a database URL, or null for the SQLite file ``<sweep>/search.db``."""
    return storage or f"sqlite:///{Path(sweep_dir).absolute() / 'search.db'}"


def open_storage(url: str):
    """Optuna's RDB storage for ``url``; a missing database driver is a one-line error naming its package."""
    import optuna

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):  # jobs of one machine write to the file at once: wait for the lock
        kwargs = {"connect_args": {"timeout": 120}}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except ImportError:  # Optuna's message for a missing database driver
        dialect, _, driver = url.split(":", 1)[0].partition("+")
        package = {"pymysql": "PyMySQL", "psycopg": "psycopg"}.get(driver) or DRIVERS.get(dialect, driver or dialect)
        raise PipelineError(f"search.storage: the driver for {dialect} URLs is not installed; "
                            f"pip install {package}") from None
    except Exception as e:  # unreachable server, bad URL, wrong password ...
        from pipeline.errors import first_line

        raise PipelineError(f"search.storage: cannot open {safe_url(url)} ({type(e).__name__}: "
                            f"{first_line(e, 200)})") from None


def safe_url(url: str) -> str:
    """A database URL without its password (for messages and reports)."""
    head, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    cred, _, host = rest.rpartition("@")
    return f"{head}{sep}{cred.split(':', 1)[0]}:***@{host}" if ":" in cred else url


def fine_tune_epochs(cfg: DictConfig, stages: list[str]) -> tuple[int, int]:
    """(steps, cost) of one trial in full: the epochs that report validation accuracy (the pruner's
    resource), and every fine-tuning epoch it may train (iterative pruning steps, distillation's no-KD
    comparison): the budget a trial reserves."""
    steps = cost = 0
    for s in stages:
        sec = cfg.get(s)
        if sec is None or "epochs" not in sec:
            continue
        steps += int(sec.epochs)
        cost += int(sec.epochs)
        if s == "prune" and int(sec.get("steps", 1)) > 1:
            cost += int(sec.steps) * int(sec.get("step_epochs", 0))
        if s == "distill" and sec.get("compare_no_kd"):
            cost += int(sec.epochs)
    return steps, cost


def make_pruner(kind: str, min_epochs: int, reduction_factor: int, max_steps: int):
    """``search.pruner``: none | successive_halving | hyperband (Optuna's, on the fine-tuning epochs)."""
    import optuna

    if kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=min_epochs, reduction_factor=reduction_factor)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_epochs, max_resource=max(max_steps, min_epochs),
                                              reduction_factor=reduction_factor)
    return optuna.pruners.NopPruner()


class TrialReporter(EpochObserver):
    """Reports a trial's fine-tuning epochs to its fidelity trial and stops the job when the pruner says so."""

    def __init__(self, trial, stages: list[str], steps: int):
        self.trial, self.stages, self.steps = trial, set(stages), steps
        self.step = 0  # fine-tuning epochs with a validation accuracy, trained or replayed
        self.trained = 0  # epochs this job trained (the budget it spent)

    def epoch(self, section: str, epoch: int, val_acc: float, main: bool) -> None:
        if section not in self.stages:
            return
        self.trained += 1
        self.trial.set_user_attr("epochs_trained", self.trained)
        if main:
            self._report(val_acc)

    def reused(self, stage: str, history: list[dict]) -> None:
        if stage in self.stages:
            for row in history:
                self._report(float(row.get("val_acc", math.nan)))

    def _report(self, val_acc: float) -> None:
        self.step += 1
        if math.isnan(val_acc):  # no validation split: nothing to compare, the trial runs in full
            return
        self.trial.report(val_acc, self.step)
        if self.step < self.steps and self.trial.should_prune():  # after the last epoch only exports remain
            self.trial.set_user_attr("stopped_at_epoch", self.step)
            raise TrialPruned(self.step, val_acc)


@contextlib.contextmanager
def reporting(cfg: DictConfig, sweep_dir: Path) -> Iterator[TrialReporter | None]:
    """In a search trial's job (``search.trial`` set): report its fine-tuning epochs for the run's duration."""
    search = cfg.get("search")
    number = search.get("trial") if search is not None else None
    if number is None:
        yield None
        return
    import optuna

    stages = list(search.fidelity_stages)
    steps, _ = fine_tune_epochs(cfg, stages)
    pruner = make_pruner(search.pruner, int(search.min_epochs), int(search.reduction_factor), steps)
    storage = open_storage(storage_url(search.get("storage"), sweep_dir))
    name = str(cfg.hydra.sweeper.study_name) if "hydra" in cfg else "search"
    study = optuna.load_study(study_name=name + FIDELITY_SUFFIX, storage=storage, pruner=pruner)
    try:  # the trial's storage id, which a Trial is made from
        trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name),
                                                                   int(number))
    except KeyError:
        raise PipelineError(f"search.trial={number}: the study {study.study_name!r} has no such trial; leave "
                            "search.trial null (the search sets it in each trial's job)") from None
    reporter = TrialReporter(optuna.trial.Trial(study, trial_id), stages, steps)
    OBSERVERS.append(reporter)
    try:
        yield reporter
    finally:
        OBSERVERS.remove(reporter)
