"""``python -m pipeline``: the Hydra entry point (a thin wrapper around ``run_pipeline``)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline import CONF_DIR as _CONF_DIR
from pipeline.errors import PipelineError
from pipeline.rundir import unique_dir  # noqa: F401 (registered as ${unique_dir:...} on import of pipeline)

log = logging.getLogger("pipeline")
CONF_DIR = str(_CONF_DIR)
# pip packages of Hydra's launcher plugins, for the "not installed" message
LAUNCHER_PACKAGES = {"joblib": "hydra-joblib-launcher", "submitit_slurm": "hydra-submitit-launcher",
                     "submitit_local": "hydra-submitit-launcher", "ray_aws": "hydra-ray-launcher",
                     "rq": "hydra-rq-launcher"}


SWEEP_SUMMARY = "pipeline.sweep.SweepSummary"


def check_launcher(argv: list[str]) -> str | None:
    """A one-line error when ``hydra/launcher=NAME`` names a plugin that is not installed."""
    names = [a.split("=", 1)[1] for a in argv if a.lstrip("+~").startswith("hydra/launcher=")]
    if not names:
        return None
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()  # imports the installed plugins, which register their launcher configs
    available = {Path(n).stem for n in ConfigStore.instance().list("hydra/launcher")}
    available |= {p.stem for p in (Path(CONF_DIR) / "hydra" / "launcher").glob("*.yaml")}
    name = names[-1]
    if name == "ray":  # the project's own launcher (conf/hydra/launcher/ray.yaml); Ray is an extra
        from pipeline.ray_launcher import NEEDS_RAY, ray_installed

        return None if ray_installed() else NEEDS_RAY
    if name in available:
        return None
    package = LAUNCHER_PACKAGES.get(name, f"the Hydra plugin that provides hydra/launcher={name}")
    return (f"hydra/launcher={name} is not installed (available: {', '.join(sorted(available))}); "
            f"pip install {package}")


# ---------------------------------------------------------------- checks before Hydra starts


def _hydra_args(argv: list[str]):
    """Hydra's own command-line flags and overrides (its parser), or None when it would reject them."""
    from hydra._internal.utils import get_args_parser

    try:
        return get_args_parser().parse_args(argv)
    except SystemExit:
        return None


def primary_config_dir(config_path: str) -> Path:
    """Where Hydra reads ``--config-path`` from: as given when absolute, else relative to this package."""
    path = Path(config_path).expanduser()
    return path if path.is_absolute() else (Path(__file__).parent / path).resolve()


def saved_config_problem(path: Path) -> str | None:
    """A config loaded with ``--config-path`` from outside the pipeline's conf/ (a run folder, a bundle) is
    data: it may not configure Hydra, whose callbacks, launchers, sweepers and logging name code that Hydra
    runs. A ``hydra:`` section, a defaults list (which can select Hydra's config groups) or a ``@package``
    header other than the global one is refused, naming it."""
    import yaml

    if not path.is_file():
        return None  # Hydra says so
    text = path.read_text(errors="replace")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None  # Hydra reports the syntax error
    fix = ("a config from a run folder or bundle is data and may not configure Hydra (its callbacks, launchers "
           "and logging run code); delete that section (the model card's command sets hydra.run.dir itself)")
    if isinstance(data, dict) and "hydra" in data:
        inner = data["hydra"]
        named = [f"hydra.{k}" for k in inner][:3] if isinstance(inner, dict) and inner else ["hydra"]
        return f"{path} has a hydra: section ({', '.join(named)}); {fix}"
    if isinstance(data, dict) and "defaults" in data:
        return f"{path} has a defaults list; {fix.replace('that section', 'the defaults list')}"
    for line in text.splitlines():
        if line.startswith("# @package") and line.split()[-1] != "_global_":
            return f"{path} declares '{line[2:].strip()}'; {fix.replace('that section', 'that line')}"
    return None


def composition_error(e: Exception) -> str:
    """Hydra's composition errors (several lines) as one line that names the fix."""
    import difflib

    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    from pipeline.errors import first_line

    cause = e.__cause__
    text = str(e)
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and text.startswith("Could not override '"):
        key = text.split("'")[1]  # "Could not override 'prune.ratoi'."
        missing, leaf = cause.full_key or key, cause.key
        parent = cause.parent_node
        known = [str(k) for k in parent if str(k) != "hydra"] if parent is not None else []
        close = difflib.get_close_matches(str(leaf), known, n=1, cutoff=0.6) if leaf is not None else []
        if close:
            head = missing.rpartition(".")[0]
            fixed = (f"{head}." if head else "") + close[0] + key[len(missing):]
            return f"{key}: no such key; did you mean {fixed}?"
        where = missing.rpartition(".")[0] or "the top level"
        if not known:
            return f"{key}: no such key ({where} has no keys)"
        return f"{key}: no such key ({where} has {', '.join(known)})"
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and e.options:
        group, _, option = e.missing_cfg_file.rpartition("/")
        return f"{group}={option}: no such option; choose one of {', '.join(e.options)}"
    if isinstance(e, OverrideParseException):
        return f"cannot read an override ({first_line(e)}); see python -m pipeline --help"
    return first_line(e, 300)


def check_command(argv: list[str]) -> str | None:
    """What Hydra would report in several lines or only after starting, as one line (None: nothing):
    a saved config that configures Hydra, a misspelled key, an unknown option, and under ``-m`` every point
    of the sweep's config (so a bad point fails before the first job runs)."""
    args = _hydra_args(argv)
    if args is None or args.help or args.hydra_help or args.shell_completion or args.info or \
            args.experimental_rerun or (args.config_path or "").startswith("pkg://"):
        return None
    conf, name = Path(CONF_DIR), args.config_name or "config"
    if args.config_path is not None:
        conf = primary_config_dir(args.config_path)
        primary = conf / (name if name.endswith(".yaml") else f"{name}.yaml")
        if conf.resolve() != Path(CONF_DIR).resolve() and (problem := saved_config_problem(primary)):
            return problem
    if args.config_dir is not None or not conf.is_dir():
        return None  # other search paths: Hydra composes and reports
    return _check_overrides(conf, name, args.overrides, args.multirun)


def _check_overrides(conf: Path, name: str, overrides: list[str], multirun: bool) -> str | None:
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        return composition_error(e)
    sweeps = [o for o in parsed if o.is_sweep_override()]
    if sweeps and not multirun:
        return None  # Hydra says to add -m
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        try:
            base = [o.input_line for o in parsed if not o.is_sweep_override()]
            cfg = compose(name, overrides=base, return_hydra_config=multirun)
        except HydraException as e:
            return composition_error(e)
        if not multirun or not str(OmegaConf.select(cfg, "hydra.sweeper._target_", default="")).endswith(
                "BasicSweeper"):
            return None  # a search sweeper checks its own space (pipeline.search)
        return _check_sweep(cfg, name, overrides)


def _check_sweep(cfg: DictConfig, name: str, overrides: list[str]) -> str | None:
    """Compose and validate every job of a grid sweep, as the basic sweeper will launch them."""
    import tempfile

    from hydra import compose
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from pipeline.runner import Runner

    space = cfg.hydra.sweeper.get("params")
    params = [f"{k}={v}" for k, v in OmegaConf.to_container(space).items()] if space else []
    try:
        jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params + overrides), None)[0]
    except Exception:  # e.g. glob(), which needs Hydra's config loader: the sweep itself reports problems
        return None
    swept = {o.key_or_group for o in OverridesParser.create().parse_overrides(params + overrides)
             if o.is_sweep_override()}
    found: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, job in enumerate(jobs):
            point = " ".join(o for o in job if o.lstrip("+~").split("=", 1)[0] in swept)
            try:
                Runner(compose(name, overrides=list(job)), Path(tmp))
                continue
            except HydraException as e:
                msg = composition_error(e)
            except PipelineError as e:
                msg = str(e)
            found.setdefault(msg, []).append(f"{i} ({point})" if point else str(i))
    if not found:
        return None
    lines = [msg if len(where) == len(jobs) else f"sweep job {', '.join(where)}: {msg}"
             for msg, where in found.items()]
    return "\n".join(lines)  # one line per problem, before any job runs


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    from pipeline.artifacts import atomic_write_text, shown
    from pipeline.errors import first_line
    from pipeline.fidelity import TrialPruned, reporting
    from pipeline.runner import run_pipeline
    from pipeline.sweep import JOB_ERROR

    for noisy in ("onnx_ir", "onnxscript", "matplotlib", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 speaks; errors from any rank
    if not main_rank:
        logging.getLogger().setLevel(logging.WARNING)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        with reporting(cfg, Path(HydraConfig.get().sweep.dir)) if multirun else contextlib.nullcontext():
            done = run_pipeline(cfg, run_dir)
    except TrialPruned as e:  # the search's pruner stopped this trial: not a failure (search.md lists it)
        log.info("%s", e)
        return
    except PipelineError as e:
        log.error("%s", e)
        if multirun:  # the other jobs still run; the sweep summary lists this one and the sweep exits with 2
            atomic_write_text(run_dir / JOB_ERROR, f"{first_line(e, 500)}\n")
            return
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        if not multirun:
            raise
        log.exception("the job failed")  # the traceback goes to the job's log
        atomic_write_text(run_dir / JOB_ERROR, f"{type(e).__name__}: {first_line(e, 300)} (traceback in the "
                                               f"job's log, {run_dir})\n")
        return
    report = run_dir / "report.md"
    if not main_rank:
        return
    if report.is_file():
        print(f"report: {report}")
        bundle = run_dir / "deploy"
        if (bundle / "bundle.json").is_file():
            print(f"classify: python -m pipeline.predict {shown(bundle)} <image or folder>")
    else:
        for node, art in done.items():
            print(f"{node}: {art.path}")


if __name__ == "__main__":
    if (problem := check_launcher(sys.argv[1:]) or check_command(sys.argv[1:])) is not None:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    if {"-m", "--multirun"} & set(sys.argv[1:]):  # the summary (and the exit code of failed jobs), whatever config
        sys.argv.append(f"++hydra.callbacks.sweep_summary._target_={SWEEP_SUMMARY}")
    main()
