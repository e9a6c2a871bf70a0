"""Multi-objective search over pipeline settings: a Hydra sweeper on Optuna (``hydra/sweeper=pareto``).

    python -m pipeline -m search=prune_qat hydra.sweeper.n_trials=12

Each trial is one pipeline job (shared upstream artifacts are reused and locked as in any sweep). Its
objectives are read from the job's report (the row ``search.row``); constraints (``search.max_accuracy_drop``,
``search.min_speedup``) are given to the sampler, and a trial whose pruned architecture is already too
slow is pruned before any fine-tuning by a quick ONNX Runtime probe of that architecture (untrained
weights: speed does not depend on them). The Optuna study lives in ``<sweep>/search.db``: running the
same command with ``hydra.sweep.dir=<that sweep>`` resumes it. ``search.json`` in the sweep folder lists
every trial, the Pareto-optimal ones and the one recommended under the constraints, with the command
that reproduces it; the sweep summary marks them.

Hydra only loads sweepers from its ``hydra_plugins`` package, so ``hydra_plugins/pipeline_search`` holds
a shim that subclasses ``SearchSweeper`` as ``ParetoSweeper``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from pipeline import tracking
from pipeline.artifacts import atomic_write_text, write_json
from pipeline.config import setting
from pipeline.errors import PipelineError
from pipeline.fidelity import FIDELITY_SUFFIX, fine_tune_epochs, open_storage, safe_url, storage_url
from pipeline.search_report import compare_grid, grid_points, plot_search, search_markdown, sweep_points

log = logging.getLogger(__name__)

OBJECTIVES = {  # name -> (report row key, direction)
    "accuracy": ("accuracy", "maximize"),
    "speedup": ("speedup_vs_baseline", "maximize"),  # throughput / the baseline's, timed in the same run
    "throughput": ("throughput_ips", "maximize"),
    "latency": ("latency_ms_p50", "minimize"),
}
SEARCH_JSON = "search.json"


@dataclass
class SearchSettings:
    """``search.*`` of a search preset (``conf/search/*.yaml``)."""

    row: str  # report row judged, e.g. qat-int8
    objectives: list[str]
    max_accuracy_drop: float | None  # constraint: top-1 points below the baseline
    min_speedup: float | None  # constraint: throughput / baseline throughput
    probe: bool  # prune trials whose architecture is too slow before fine-tuning
    probe_margin: float  # the probe may be this much below min_speedup (timing noise) before a trial is pruned
    budget_epochs: int | None = setting(ge=1)  # fine-tuning epochs all trials together may train (None: no limit)
    fidelity_stages: list[str]  # stages whose epochs are the budget and the pruner's steps
    pruner: Literal["none", "successive_halving", "hyperband"]
    min_epochs: int = setting(ge=1)  # the pruner's first rung: epochs every trial gets
    reduction_factor: int = setting(ge=2)  # keep the best 1/reduction_factor of the trials at each rung
    warm_start: list[Any]  # first trials: points {key: value} or earlier sweep folders
    compare: list[str]  # grid sweep folders drawn beside the trials (search.png, search.md)
    storage: str | None  # study storage: null (<sweep>/search.db) or a database URL
    trial: int | None  # set by the sweeper in each trial's job (its fidelity trial's number); null otherwise


def _fmt(v: Any) -> str:
    """An override value as Hydra's parser reads it back."""
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    if v is None:
        return "null"
    return str(v).lower() if isinstance(v, bool) else str(v)


class Dimension:
    """One searched key: a Hydra sweep expression (``choice``, ``range``, ``interval``, ``tag(log, interval)``)."""

    def __init__(self, key: str, expr: str):
        self.key = key
        try:
            value = OverridesParser.create().parse_override(f"{key}={expr}").value()
        except Exception as e:
            raise PipelineError(f"search space: {key}={expr} is not a Hydra sweep ({e}); use choice(a,b), "
                                "range(1,5) or interval(0.1,0.9)") from None
        self.log = False
        if isinstance(value, ChoiceSweep):
            self.kind, self.choices = "choice", [_fmt(v) for v in value.list]
        elif isinstance(value, RangeSweep):
            values, v = [], value.start
            while (v < value.stop) if value.step > 0 else (v > value.stop):
                values.append(v)
                v += value.step
            self.kind, self.choices = "choice", [_fmt(x) for x in values]
        elif isinstance(value, IntervalSweep):
            self.kind, self.low, self.high = "interval", value.start, value.end
            self.log = "log" in (value.tags or set())
            self.int = isinstance(value.start, int) and isinstance(value.end, int)
        else:
            raise PipelineError(f"search space: {key}={expr} is a single value; give choice(...), range(...) or "
                                "interval(...)")

    def param(self, value: Any, where: str) -> Any:
        """A warm-start value as the parameter Optuna stores for this key; outside the space: a one-line error."""
        if self.kind == "choice":
            v = _fmt(value)
            if v not in self.choices:
                raise PipelineError(f"search.warm_start: {where} sets {self.key}={v}, not one of the searched "
                                    f"choices ({', '.join(self.choices)})")
            return v
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise PipelineError(f"search.warm_start: {where} sets {self.key}={value!r}, not a number") from None
        if not float(self.low) <= v <= float(self.high):
            raise PipelineError(f"search.warm_start: {where} sets {self.key}={v}, outside the searched interval "
                                f"[{self.low}, {self.high}]")
        return int(v) if self.int else v

    def suggest(self, trial) -> str:
        if self.kind == "choice":
            return f"{self.key}={trial.suggest_categorical(self.key, self.choices)}"
        if self.int:
            return f"{self.key}={trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)}"
        if self.log:
            return f"{self.key}={trial.suggest_float(self.key, float(self.low), float(self.high), log=True):.4g}"
        step = 10.0 ** math.floor(math.log10((float(self.high) - float(self.low)) / 100))  # readable values
        value = trial.suggest_float(self.key, float(self.low), float(self.high), step=step)
        return f"{self.key}={round(value, max(0, -math.floor(math.log10(step))))}"


def pareto(points: list[tuple[int, list[float]]], directions: list[str]) -> set[int]:
    """Ids of the points no other point dominates (at least as good in all objectives, better in one)."""
    sign = [1 if d == "maximize" else -1 for d in directions]
    def better_eq(a, b):
        return all(s * x >= s * y for s, x, y in zip(sign, a, b, strict=True))

    return {i for i, v in points
            if not any(better_eq(w, v) and w != v for j, w in points if j != i)}


def _constrain(trial, values: list[float]) -> None:
    """A trial is feasible when every value is <= 0: kept for search.json and given to the sampler (set once per
    trial, as Optuna's ``Trial.set_constraint`` requires)."""
    trial.set_user_attr("constraints", values)
    if hasattr(trial, "set_constraint"):  # Optuna >= 5
        for i, v in enumerate(values):
            trial.set_constraint(str(i), v)


def recommend(trials: list[dict]) -> dict | None:
    """Among complete trials that meet the constraints: the most accurate, then the fastest."""
    ok = [t for t in trials if t["state"] == "COMPLETE" and t["feasible"]]
    if not ok:
        return None
    return max(ok, key=lambda t: (t["row"]["accuracy"], t["row"]["speedup_vs_baseline"]))


class SearchSweeper(Sweeper):
    """``hydra/sweeper=pareto`` (``conf/hydra/sweeper/pareto.yaml``)."""

    def __init__(self, n_trials: int, n_jobs: int, seed: int, sampler: str, params: dict | None,
                 study_name: str = "search"):
        self.n_trials, self.n_jobs, self.seed, self.sampler_name = n_trials, n_jobs, seed, sampler
        self.params, self.study_name = dict(params or {}), study_name

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                               task_function=task_function, config=config)

    # ------------------------------------------------------------ checks

    def _settings(self) -> SearchSettings:
        from pipeline.config import bind, raise_if_errors
        from pipeline.runner import stage_registry

        errors: list[str] = []
        s = bind(self.config.get("search"), SearchSettings, "search", errors)
        if s is not None:
            errors += [f"search.objectives: unknown {o!r}; choose from {', '.join(OBJECTIVES)}"
                       for o in s.objectives if o not in OBJECTIVES]
            if not s.objectives:
                errors.append("search.objectives: empty; give e.g. [accuracy, speedup]")
            trainers = [n for n, st in stage_registry().items() if st.trains]
            errors += [f"search.fidelity_stages: {f!r} is not a training stage; choose from {', '.join(trainers)}"
                       for f in s.fidelity_stages if f not in trainers]
            if s.trial is not None:
                errors.append("search.trial: set by the search for each trial's job; leave it null")
        if self.n_trials < 1 or self.n_jobs < 1:
            errors.append("hydra.sweeper.n_trials and n_jobs must be >= 1")
        if not self.params:
            errors.append("hydra.sweeper.params: the search space is empty; add e.g. "  # a shell word Hydra takes
                          "\"++hydra.sweeper.params={prune.ratio:'interval(0.2,0.7)'}\"")
        for key in self.params:
            if OmegaConf.select(self.config, key, default="__missing__") == "__missing__":
                section = key.rsplit(".", 1)[0]
                known = self.config.get(section)
                hint = f"; {section} has {', '.join(sorted(known))}" if isinstance(known, DictConfig) else ""
                errors.append(f"hydra.sweeper.params: {key!r} is not a config key{hint}")
        raise_if_errors(errors)
        return s

    def _check_space(self, dims: list[Dimension], base: list[str]) -> None:
        """Every choice (and both ends of every interval) must make a valid config for this model."""
        from pipeline.runner import Runner

        errors = []
        with tempfile.TemporaryDirectory() as tmp:
            for d in dims:
                values = d.choices if d.kind == "choice" else [_fmt(d.low), _fmt(d.high)]
                for v in values:
                    cfg = self.hydra_context.config_loader.load_sweep_config(self.config, [*base, f"{d.key}={v}"])
                    try:
                        Runner(cfg, Path(tmp))
                    except PipelineError as e:
                        why = str(e).splitlines()[-1].strip().removeprefix("config error: ")
                        errors.append(f"search space: {d.key}={v} is not valid here ({why})")
        if errors:
            raise PipelineError(errors[0] if len(errors) == 1 else "\n  ".join(["search space errors:", *errors]))

    # ------------------------------------------------------------ the probe

    def _probe(self, overrides: list[str], settings: SearchSettings) -> float:
        """Throughput of the trial's architecture (pruned as its config says, untrained) over the unpruned
        baseline's, timed interleaved with ONNX Runtime in its deployed form (INT8 for ``*-int8`` rows)."""
        from pipeline.probe import probe_speedup

        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        return probe_speedup(cfg, int8=settings.row.endswith("-int8"), cache=self._probe_cache)

    # ------------------------------------------------------------ warm start

    def _warm_points(self, settings: SearchSettings, dims: list[Dimension]) -> list[dict]:
        """``search.warm_start`` as Optuna parameters: points ``{key: value}``, and the points of earlier
        sweeps (a search's complete trials, a grid's jobs that wrote a report)."""
        by_key = {d.key: d for d in dims}
        points = []
        for n, item in enumerate(settings.warm_start):
            if isinstance(item, dict):
                points.append((f"point {n}", item))
            elif isinstance(item, str):
                points += [(f"{item} {job}", p) for job, p in sweep_points(Path(item))]
            else:
                raise PipelineError(f"search.warm_start: item {n} is {item!r}; give {{key: value}} points or "
                                    "sweep folders")
        out = []
        for where, point in points:
            unknown = [k for k in point if k not in by_key]
            if unknown:
                raise PipelineError(f"search.warm_start: {where} sets {unknown[0]}, which is not searched "
                                    f"(searched: {', '.join(by_key)})")
            out.append({k: by_key[k].param(v, where) for k, v in point.items()})
        return out

    # ------------------------------------------------------------ the loop

    def _studies(self, settings: SearchSettings, sweep_dir: Path, directions: list[str]):
        """The search's study and its single-objective companion holding intermediate values (pipeline.fidelity)."""
        import optuna

        def constraints(t) -> list[float]:
            return t.user_attrs.get("constraints", [1.0])

        # Optuna 5 samplers read the constraints each trial sets (_constrain); Optuna 4 asks constraints_func
        given = {} if hasattr(optuna.trial.Trial, "set_constraint") else {"constraints_func": constraints}
        sampler = (optuna.samplers.NSGAIISampler(seed=self.seed, **given)
                   if self.sampler_name == "nsga2" else
                   optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=min(10, max(2, self.n_trials // 3)),
                                              **given))
        storage = open_storage(storage_url(settings.storage, sweep_dir))
        study = optuna.create_study(storage=storage, study_name=self.study_name, directions=directions,
                                    sampler=sampler, load_if_exists=True)
        fid = optuna.create_study(storage=storage, study_name=self.study_name + FIDELITY_SUFFIX,
                                  direction="maximize", load_if_exists=True)
        for st in (study, fid):  # a resumed search: trials that were running when it stopped are run again
            for t in st.trials:
                if t.state == optuna.trial.TrialState.RUNNING:
                    st.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        return study, fid

    def sweep(self, arguments: list[str]) -> list:
        import optuna

        try:
            settings = self._settings()
            dims = [Dimension(k, str(v)) for k, v in self.params.items()]
            parsed = OverridesParser.create().parse_overrides(arguments)
            sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
            if sweeps:
                raise PipelineError(f"{sweeps[0]}: searched keys go into hydra.sweeper.params, not the command line")
            self._check_space(dims, list(arguments))
            warm = self._warm_points(settings, dims)
            sweep_dir = Path(self.config.hydra.sweep.dir)
            sweep_dir.mkdir(parents=True, exist_ok=True)
            names = settings.objectives
            directions = [OBJECTIVES[o][1] for o in names]
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            study, fid = self._studies(settings, sweep_dir, directions)
        except PipelineError as e:
            tracking.sweep_end(self.config, None, error=e)  # the parent run the sweep callback opened: FAILED
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        try:
            OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
            for params in warm:  # first trials; their artifacts are reused when a grid already built them
                study.enqueue_trial(params, skip_if_exists=True)
            finished = [t for t in study.trials if t.state.is_finished() and t.user_attrs.get("counted")]
            if finished:
                log.info("search: resuming %s with %d of %d trials done", sweep_dir, len(finished), self.n_trials)
            self._probe_cache: dict = {}
            self._job_idx = len(finished)
            returns: list = []
            while self._counted(study) < self.n_trials:
                batch, stop = self._next_batch(study, fid, dims, settings, list(arguments))
                if batch:
                    returns.append(self._run_batch(batch, study, fid, settings, list(arguments)))
                if stop:
                    break
            self._write(study, sweep_dir, settings, names, directions, list(arguments))
        except SystemExit:  # a launcher's one-line error (hydra/launcher=ray): it closed the parent run
            raise
        except BaseException as e:  # Ctrl-C or a crash mid-search: the sweep callback's end does not run
            tracking.sweep_end(self.config, None, error=e)
            raise
        return returns

    @staticmethod
    def _counted(study) -> int:
        return len([t for t in study.trials if t.user_attrs.get("counted")])

    @staticmethod
    def _spent(study) -> int:
        return sum(t.user_attrs.get("epochs_trained", 0) for t in study.trials if t.user_attrs.get("counted"))

    def _next_batch(self, study, fid, dims: list[Dimension], settings: SearchSettings,
                    base: list[str]) -> tuple[list, bool]:
        """Up to ``n_jobs`` trials to launch (too-slow ones pruned by the probe on the way); ``stop`` when the
        next trial's full fine-tuning no longer fits what is left of ``search.budget_epochs``."""
        import optuna

        batch, reserved = [], 0
        left = None if settings.budget_epochs is None else settings.budget_epochs - self._spent(study)
        for _ in range(min(self.n_jobs, self.n_trials - self._counted(study))):
            trial = study.ask()
            overrides = [d.suggest(trial) for d in dims]
            trial.set_user_attr("overrides", overrides)
            if settings.probe and settings.min_speedup is not None:
                speed = self._probe(base + overrides, settings)
                trial.set_user_attr("probe_speedup", speed)
                if speed < settings.min_speedup * settings.probe_margin:
                    _constrain(trial, [settings.min_speedup - speed])
                    trial.set_user_attr("counted", True)
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                    log.info("search: trial %d %s pruned before training: probe %.2fx < %.2fx", trial.number,
                             " ".join(overrides), speed, settings.min_speedup)
                    continue
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, base + overrides)
            steps, cost = fine_tune_epochs(cfg, settings.fidelity_stages)
            if left is not None and reserved + cost > left:
                trial.set_user_attr("over_budget", True)  # not counted: a resumed search with more budget runs it
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                log.info("search: budget spent (%d of %d fine-tuning epochs; the next trial needs %d)",
                         settings.budget_epochs - left + reserved, settings.budget_epochs, cost)
                return batch, True
            reserved += cost
            ftrial = fid.ask()
            trial.set_user_attr("epochs_full", cost)
            batch.append((trial, ftrial, overrides))
        return batch, False

    def _run_batch(self, batch: list, study, fid, settings: SearchSettings, base: list[str]) -> list:
        import optuna
        from hydra.core.utils import JobStatus

        jobs = [base + ov + [f"++search.trial={ft.number}"] for _, ft, ov in batch]  # its fidelity trial's number
        rets = self.launcher.launch(jobs, initial_job_idx=self._job_idx)
        self._job_idx += len(batch)
        reported = {t.number: t for t in fid.get_trials(deepcopy=False)}  # what the jobs reported (read again)
        for (trial, ftrial, overrides), ret in zip(batch, rets, strict=True):
            done = reported[ftrial.number]
            trial.set_user_attr("epochs_trained", done.user_attrs.get("epochs_trained", 0))
            trial.set_user_attr("intermediate", {str(k): v for k, v in sorted(done.intermediate_values.items())})
            trial.set_user_attr("counted", True)  # a trial of a search killed mid-way is not counted
            if ret.status == JobStatus.COMPLETED:
                trial.set_user_attr("job", Path(ret.hydra_cfg.hydra.runtime.output_dir).name)
            stopped = done.user_attrs.get("stopped_at_epoch")
            if stopped is not None:
                trial.set_user_attr("stopped_at_epoch", stopped)
                _constrain(trial, [1.0])
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                fid.tell(ftrial, state=optuna.trial.TrialState.PRUNED)
                log.info("search: trial %d %s stopped by the pruner after fine-tuning epoch %d", trial.number,
                         " ".join(overrides), stopped)
                continue
            row = None
            if ret.status == JobStatus.COMPLETED:
                row = self._row(Path(ret.hydra_cfg.hydra.runtime.output_dir), settings.row)
            if row is None:
                _constrain(trial, [1.0])
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                fid.tell(ftrial, state=optuna.trial.TrialState.FAIL)
                log.warning("search: trial %d %s failed (no %s row in its report)", trial.number,
                            " ".join(overrides), settings.row)
                continue
            cons = []
            if settings.max_accuracy_drop is not None:
                cons.append(-row["accuracy_delta_vs_baseline"] - settings.max_accuracy_drop)
            if settings.min_speedup is not None:
                cons.append(settings.min_speedup - row["speedup_vs_baseline"])
            _constrain(trial, cons or [0.0])
            trial.set_user_attr("row", {k: row[k] for k in ("name", "accuracy", "accuracy_delta_vs_baseline",
                                                            "throughput_ips", "speedup_vs_baseline",
                                                            "latency_ms_p50")})
            study.tell(trial, [row[OBJECTIVES[o][0]] for o in settings.objectives])
            last = list(done.intermediate_values.values())
            fid.tell(ftrial, last[-1] if last else row["accuracy"])
        return rets

    @staticmethod
    def _row(job_dir: Path, name: str) -> dict | None:
        rep = job_dir / "report.json"
        if not rep.is_file():
            return None
        return next((r for r in json.loads(rep.read_text())["rows"] if r["name"] == name), None)

    def _write(self, study, sweep_dir: Path, settings: SearchSettings, names: list[str], directions: list[str],
               base: list[str]) -> dict:
        trials = []
        for t in study.trials:
            if not t.user_attrs.get("counted"):
                continue
            a = t.user_attrs
            trials.append({"number": t.number, "state": t.state.name, "overrides": a.get("overrides", []),
                           "job": a.get("job"), "probe_speedup": a.get("probe_speedup"),
                           "values": dict(zip(names, t.values, strict=True)) if t.values else None,
                           "row": a.get("row"), "feasible": all(c <= 0 for c in a.get("constraints", [1.0])),
                           "epochs_trained": a.get("epochs_trained", 0), "epochs_full": a.get("epochs_full"),
                           "stopped_at_epoch": a.get("stopped_at_epoch"), "intermediate": a.get("intermediate", {})})
        run_args = [a for a in base if not a.startswith(("hydra.", "hydra/"))]  # a single run, not the sweep
        done = [(t["number"], [t["values"][n] for n in names]) for t in trials if t["state"] == "COMPLETE"]
        front = pareto(done, directions)
        for t in trials:
            t["pareto"] = t["number"] in front
        best = recommend(trials)
        spent = sum(t["epochs_trained"] for t in trials)
        grids = [grid_points(Path(g), settings.row, settings.fidelity_stages) for g in settings.compare]
        out = {"objectives": dict(zip(names, directions, strict=True)), "row": settings.row, "trials": trials,
               "budget": {"epochs": settings.budget_epochs, "spent": spent, "stages": settings.fidelity_stages,
                          "pruner": settings.pruner},
               "storage": safe_url(storage_url(settings.storage, sweep_dir)),
               "pareto": sorted(front), "recommended": best["number"] if best else None,
               "reproduce": ("python -m pipeline " + " ".join([*run_args, *best["overrides"]])) if best else None,
               "note": None if best else "no trial meets the constraints (search.max_accuracy_drop, "
                                         "search.min_speedup); relax them or widen the search space",
               "compare": [compare_grid(g, best, settings) for g in grids]}
        write_json(sweep_dir / SEARCH_JSON, out)
        log.info("search: %d fine-tuning epochs spent%s", spent,
                 f" of {settings.budget_epochs}" if settings.budget_epochs else "")
        if best is None:
            log.warning("search: %s", out["note"])
        else:
            log.info("search: recommended trial %d (%s): %s", best["number"], " ".join(best["overrides"]),
                     out["reproduce"])
        plot_search(out, grids, sweep_dir / "search.png")
        atomic_write_text(sweep_dir / "search.md", search_markdown(out))
        return out
