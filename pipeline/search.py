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
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from pipeline.artifacts import atomic_write_text, write_json
from pipeline.errors import PipelineError

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

        errors: list[str] = []
        s = bind(self.config.get("search"), SearchSettings, "search", errors)
        if s is not None:
            errors += [f"search.objectives: unknown {o!r}; choose from {', '.join(OBJECTIVES)}"
                       for o in s.objectives if o not in OBJECTIVES]
            if not s.objectives:
                errors.append("search.objectives: empty; give e.g. [accuracy, speedup]")
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

    # ------------------------------------------------------------ the loop

    def sweep(self, arguments: list[str]) -> list:
        import optuna
        from hydra.core.utils import JobStatus

        try:
            settings = self._settings()
            dims = [Dimension(k, str(v)) for k, v in self.params.items()]
            parsed = OverridesParser.create().parse_overrides(arguments)
            sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
            if sweeps:
                raise PipelineError(f"{sweeps[0]}: searched keys go into hydra.sweeper.params, not the command line")
            self._check_space(dims, list(arguments))
        except PipelineError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        names = settings.objectives
        directions = [OBJECTIVES[o][1] for o in names]
        optuna.logging.set_verbosity(optuna.logging.WARNING)

        def constraints(t) -> list[float]:
            return t.user_attrs.get("constraints", [1.0])

        sampler = (optuna.samplers.NSGAIISampler(seed=self.seed, constraints_func=constraints)
                   if self.sampler_name == "nsga2" else
                   optuna.samplers.TPESampler(seed=self.seed, constraints_func=constraints,
                                              n_startup_trials=min(10, max(2, self.n_trials // 3))))
        study = optuna.create_study(storage=f"sqlite:///{sweep_dir / 'search.db'}", study_name=self.study_name,
                                    directions=directions, sampler=sampler, load_if_exists=True)
        for t in study.trials:  # a resumed search: trials that were running when it stopped are run again
            if t.state == optuna.trial.TrialState.RUNNING:
                study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        finished = [t for t in study.trials if t.state.is_finished() and t.user_attrs.get("counted")]
        if finished:
            log.info("search: resuming %s with %d of %d trials done", sweep_dir, len(finished), self.n_trials)
        self._probe_cache: dict = {}
        job_idx = len(finished)
        returns = []
        while len([t for t in study.trials if t.user_attrs.get("counted")]) < self.n_trials:
            done = len([t for t in study.trials if t.user_attrs.get("counted")])
            batch = []
            for _ in range(min(self.n_jobs, self.n_trials - done)):
                trial = study.ask()
                overrides = [d.suggest(trial) for d in dims]
                trial.set_user_attr("overrides", overrides)
                if settings.probe and settings.min_speedup is not None:
                    speed = self._probe(list(arguments) + overrides, settings)
                    trial.set_user_attr("probe_speedup", speed)
                    if speed < settings.min_speedup * settings.probe_margin:
                        trial.set_user_attr("constraints", [settings.min_speedup - speed])
                        trial.set_user_attr("counted", True)
                        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                        log.info("search: trial %d %s pruned before training: probe %.2fx < %.2fx", trial.number,
                                 " ".join(overrides), speed, settings.min_speedup)
                        continue
                batch.append((trial, overrides))
            if not batch:
                continue
            rets = self.launcher.launch([list(arguments) + ov for _, ov in batch], initial_job_idx=job_idx)
            job_idx += len(batch)
            returns.append(rets)
            for (trial, overrides), ret in zip(batch, rets, strict=True):
                row = None
                if ret.status == JobStatus.COMPLETED:
                    row = self._row(Path(ret.hydra_cfg.hydra.runtime.output_dir), settings.row)
                trial.set_user_attr("counted", True)  # a trial of a search killed mid-way is not counted
                if row is None:
                    trial.set_user_attr("constraints", [1.0])
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    log.warning("search: trial %d %s failed (no %s row in its report)", trial.number,
                                " ".join(overrides), settings.row)
                    continue
                cons = []
                if settings.max_accuracy_drop is not None:
                    cons.append(-row["accuracy_delta_vs_baseline"] - settings.max_accuracy_drop)
                if settings.min_speedup is not None:
                    cons.append(settings.min_speedup - row["speedup_vs_baseline"])
                trial.set_user_attr("constraints", cons or [0.0])
                trial.set_user_attr("row", {k: row[k] for k in ("name", "accuracy", "accuracy_delta_vs_baseline",
                                                                "throughput_ips", "speedup_vs_baseline",
                                                                "latency_ms_p50")})
                trial.set_user_attr("job", Path(ret.hydra_cfg.hydra.runtime.output_dir).name)
                study.tell(trial, [row[OBJECTIVES[o][0]] for o in names])
        self._write(study, sweep_dir, settings.row, names, directions, list(arguments))
        return returns

    @staticmethod
    def _row(job_dir: Path, name: str) -> dict | None:
        rep = job_dir / "report.json"
        if not rep.is_file():
            return None
        return next((r for r in json.loads(rep.read_text())["rows"] if r["name"] == name), None)

    def _write(self, study, sweep_dir: Path, row: str, names: list[str], directions: list[str],
               base: list[str]) -> dict:
        trials = []
        for t in study.trials:
            if not t.user_attrs.get("counted"):
                continue
            trials.append({"number": t.number, "state": t.state.name, "overrides": t.user_attrs.get("overrides", []),
                           "job": t.user_attrs.get("job"), "probe_speedup": t.user_attrs.get("probe_speedup"),
                           "values": dict(zip(names, t.values, strict=True)) if t.values else None,
                           "row": t.user_attrs.get("row"),
                           "feasible": all(c <= 0 for c in t.user_attrs.get("constraints", [1.0]))})
        run_args = [a for a in base if not a.startswith(("hydra.", "hydra/"))]  # a single run, not the sweep
        done = [(t["number"], [t["values"][n] for n in names]) for t in trials if t["state"] == "COMPLETE"]
        front = pareto(done, directions)
        for t in trials:
            t["pareto"] = t["number"] in front
        best = recommend(trials)
        out = {"objectives": dict(zip(names, directions, strict=True)), "row": row, "trials": trials,
               "pareto": sorted(front), "recommended": best["number"] if best else None,
               "reproduce": ("python -m pipeline " + " ".join([*run_args, *best["overrides"]])) if best else None,
               "note": None if best else "no trial meets the constraints (search.max_accuracy_drop, "
                                         "search.min_speedup); relax them or widen the search space"}
        write_json(sweep_dir / SEARCH_JSON, out)
        if best is None:
            log.warning("search: %s", out["note"])
        else:
            log.info("search: recommended trial %d (%s): %s", best["number"], " ".join(best["overrides"]),
                     out["reproduce"])
        atomic_write_text(sweep_dir / "search.md", search_markdown(out))
        return out


def search_markdown(out: dict) -> str:
    names = list(out["objectives"])
    lines = ["# Search", "", f"Objectives: {', '.join(f'{n} ({d})' for n, d in out['objectives'].items())}.", "",
             "| trial | state | overrides | " + " | ".join(names) + " | feasible | Pareto |",
             "|---|---|---|" + "---|" * len(names) + "---|---|"]
    for t in out["trials"]:
        vals = [f"{t['values'][n]:.3f}" if t["values"] else "–" for n in names]
        state = t["state"].lower() + (f" (probe {t['probe_speedup']:.2f}x)" if t["state"] == "PRUNED" else "")
        mark = "**yes**" if t["pareto"] else ""
        rec = " ⟵ recommended" if t["number"] == out["recommended"] else ""
        lines.append(f"| {t['number']}{rec} | {state} | `{' '.join(t['overrides'])}` | " + " | ".join(vals) +
                     f" | {'yes' if t['feasible'] else 'no'} | {mark} |")
    lines += ["", f"Recommended: `{out['reproduce']}`" if out["reproduce"] else f"Note: {out['note']}.", ""]
    return "\n".join(lines)
