"""What a stage is: a module in ``stages/`` with the same small surface (a Protocol, not a base class).

Each stage module defines::

    NAME: str                       # its key in the config and the artifact folder name
    Config: type                    # dataclass bound to cfg.<NAME> before anything runs
    OUTPUTS: tuple[str, ...]        # files it writes into its artifact folder
    def inputs(runner, node) -> dict[str, str]  # role -> upstream node ("train", "export/prune", ...)
    def run(ctx: StageContext) -> dict  # does the work, writes OUTPUTS into ctx.out_dir, returns metrics

and optionally ``PRODUCES_MODEL`` (its ``model.pt`` is exported), ``CACHED = False`` (writes into the
run folder, e.g. validate), ``MAIN_ONLY`` (rank 0 only under torchrun), ``check_config(runner)``
(checks that need the model, run before anything trains), ``nodes(runner)`` (a stage that is
several graph nodes, e.g. ``export/<stage>``) and ``key_extra(runner, node)`` (more that its
artifact key depends on).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig
from torch import nn

from pipeline.artifacts import CKPT_EXTRA, MANIFEST, METRICS, load_checkpoint, read_json
from pipeline.data import DataConfig, Splits, load_splits
from pipeline.models import load_model
from pipeline.runtime import Runtime


@dataclass
class Artifact:
    """A finished stage output folder."""

    node: str
    key: str
    path: Path

    @property
    def metrics(self) -> dict:
        return read_json(self.path / METRICS)

    @property
    def manifest(self) -> dict:
        return read_json(self.path / MANIFEST)

    def checkpoint(self) -> dict:
        return load_checkpoint(self.path / "model.pt")

    def model(self) -> tuple[nn.Module, str]:
        """Rebuild the PyTorch model of this artifact; returns it with its precision."""
        ckpt = self.checkpoint()
        if ckpt[CKPT_EXTRA].get("quant"):
            from pipeline import quant

            return quant.load_quantized(ckpt, str(self.path)), "int8"
        return load_model(ckpt, str(self.path / "model.pt")), "fp32"


@dataclass
class StageContext:
    """Everything a stage needs, built by the runner."""

    node: str  # e.g. "prune" or "export/distill"
    cfg: DictConfig  # the full composed config
    settings: Any  # this stage's bound Config dataclass
    data_cfg: DataConfig
    model_cfg: dict
    rt: Runtime
    inputs: dict[str, Artifact]
    out_dir: Path  # staging folder; renamed into place when run() returns
    work_dir: Path  # survives interruptions (resume checkpoints)
    run_dir: Path  # the Hydra run folder (reports)
    _splits: Splits | None = field(default=None, repr=False)

    def splits(self) -> Splits:
        if self._splits is None:
            self._splits = load_splits(self.data_cfg, self.rt.seed, Path(self.cfg.paths.cache), self.rt.progress)
        return self._splits


class Stage(Protocol):
    NAME: str
    Config: type
    OUTPUTS: tuple[str, ...]

    def inputs(self, runner: Any, node: str) -> dict[str, str]: ...

    def run(self, ctx: StageContext) -> dict: ...
