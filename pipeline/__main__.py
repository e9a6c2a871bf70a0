"""``python -m pipeline``: the Hydra entry point (a thin wrapper around ``run_pipeline``)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    from pipeline.runner import run_pipeline

    for noisy in ("onnx_ir", "onnxscript", "matplotlib", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        done = run_pipeline(cfg, run_dir)
    except PipelineError as e:
        log.error("%s", e)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra records the failed job; the other jobs and the sweep summary still run
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    report = run_dir / "report.md"
    if report.is_file():
        print(f"report: {report}")
    else:
        for node, art in done.items():
            print(f"{node}: {art.path}")


if __name__ == "__main__":
    main()
