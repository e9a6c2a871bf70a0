"""``python -m pipeline``: the Hydra entry point (a thin wrapper around ``run_pipeline``)."""

from __future__ import annotations

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

log = logging.getLogger("pipeline")
CONF_DIR = str(_CONF_DIR)
# pip packages of Hydra's launcher plugins, for the "not installed" message
LAUNCHER_PACKAGES = {"joblib": "hydra-joblib-launcher", "submitit_slurm": "hydra-submitit-launcher",
                     "submitit_local": "hydra-submitit-launcher", "ray": "hydra-ray-launcher",
                     "ray_aws": "hydra-ray-launcher", "rq": "hydra-rq-launcher"}


def unique_dir(base: str) -> str:
    """``${unique_dir:<path>}``: claim a new folder atomically (mkdir) at ``path``, or ``path_2``, ``path_3``, ...
    when another run started in the same second. An unwritable place is a one-line error."""
    path = Path(base)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for i in range(1, 10_000):
            candidate = path if i == 1 else path.with_name(f"{path.name}_{i}")
            try:
                candidate.mkdir()
                return str(candidate)
            except FileExistsError:
                continue
    except OSError as e:
        print(f"error: cannot create the run folder {path} ({e.strerror or e}); choose a writable place with "
              "paths.outputs=/some/writable/dir", file=sys.stderr)
        sys.exit(2)
    raise RuntimeError(f"no free run folder next to {path}")


OmegaConf.register_new_resolver("unique_dir", unique_dir, use_cache=True, replace=True)


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
    if name in available:
        return None
    package = LAUNCHER_PACKAGES.get(name, f"the Hydra plugin that provides hydra/launcher={name}")
    return (f"hydra/launcher={name} is not installed (available: {', '.join(sorted(available))}); "
            f"pip install {package}")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    from pipeline.artifacts import shown
    from pipeline.runner import run_pipeline

    for noisy in ("onnx_ir", "onnxscript", "matplotlib", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 speaks; errors from any rank
    if not main_rank:
        logging.getLogger().setLevel(logging.WARNING)
    try:
        done = run_pipeline(cfg, run_dir)
    except PipelineError as e:
        log.error("%s", e)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra records the failed job; the other jobs and the sweep summary still run
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
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
    if (problem := check_launcher(sys.argv[1:])) is not None:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
