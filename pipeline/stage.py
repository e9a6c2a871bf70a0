"""The stage contract: one registered, typed ``Stage`` per module in ``stages/``, read by the runner.

A stage module ends with ``STAGE = Stage(name=..., config=Config, run=run, ...)``; ``stages/__init__.py``
collects them (a new stage is its module, its YAML ``conf/stages/<name>.yaml`` and one line in the
defaults of ``conf/config.yaml``). Stages see the graph only through ``GraphView`` (the bound
settings and the configured sequence), never the runner, and import nothing from other stages.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.artifacts import CKPT_EXTRA, MANIFEST, METRICS, load_checkpoint, read_json
from pipeline.data import DataConfig, Splits, load_splits
from pipeline.models import ModelConfig, load_model
from pipeline.results import ModelResult, Result
from pipeline.runtime import Runtime


def base(node: str) -> str:
    """The stage of a graph node: ``export/qat`` -> ``export``."""
    return node.split("/", 1)[0]


@dataclass(frozen=True)
class GraphView:
    """What a stage may know about the rest of the run: bound settings and the configured sequence."""

    pipeline: tuple[str, ...]  # the configured sequence of stages
    requested: str  # root `stage`: "all" or one stage name
    settings: Mapping[str, Any]  # stage name -> its bound Config
    data: DataConfig
    model: ModelConfig
    stages: Mapping[str, Stage] = field(repr=False)

    def model_stages(self) -> list[str]:
        """Stages of the configured sequence whose artifact is a PyTorch model (exported to ONNX)."""
        return [s for s in self.pipeline if self.stages[s].produces_model]

    def all_model_stages(self) -> list[str]:
        """Every registered stage that produces a model, in or out of the sequence."""
        return [s for s, st in self.stages.items() if st.produces_model]

    def will_run(self, stage: str) -> bool:
        return stage in self.pipeline or self.requested == stage

    def expand(self, stage: str) -> list[str]:
        """The graph nodes of a stage: itself, or what its ``nodes`` lists (``export/<stage>``, ...)."""
        st = self.stages[stage]
        return st.nodes(self) if st.nodes is not None else [stage]

    def inputs_of(self, node: str) -> dict[str, str]:
        """Role -> upstream node of any node (e.g. which model feeds ``qat``)."""
        if self.settings.get(base(node)) is None:
            raise UnboundSettings(base(node))
        return self.stages[base(node)].inputs(self, node)


class UnboundSettings(Exception):
    """A stage's config section did not bind (its errors are reported already)."""


def no_inputs(view: GraphView, node: str) -> dict[str, str]:
    return {}


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline, as the runner sees it."""

    name: str  # its key in the config (``cfg.<name>``) and its artifact folder
    config: type  # dataclass bound to ``cfg.<name>`` before anything runs (no defaults: the YAML has them)
    run: Callable[[StageContext], dict | Result]  # does the work, writes `outputs` into ctx.out_dir, returns
    # its result (metrics.json)
    outputs: tuple[str, ...]  # files it writes (checked by the runner; metrics.json is written by the runner)
    inputs: Callable[[GraphView, str], dict[str, str]] = no_inputs  # role -> upstream node
    produces_model: bool = False  # its model.pt is exported to ONNX and can feed later stages
    cached: bool = True  # False: writes into the run folder, never reused (validate)
    main_only: bool = False  # under torchrun only rank 0 runs it (ONNX Runtime work)
    trains: bool = False  # results depend on device / amp / channels_last / world size (part of the key)
    check: Callable[[GraphView], list[str]] | None = None  # checks that need the model; only if the stage runs
    nodes: Callable[[GraphView], list[str]] | None = None  # a stage that is several nodes (export/<stage>)
    key_extra: Callable[[GraphView, str], dict | None] | None = None  # more the node depends on (ctx.extra)
    gate: Callable[[Any, str, dict], list[str]] | None = None  # (settings, node, metrics) -> failures, applied
    # to new and reused artifacts alike (gates are not part of the key)
    version: int = 1  # bump when the stage's code changes its artifacts
    result: type[Result] = ModelResult  # the typed result it publishes (downstream: ``artifact.result``)
    kind: Callable[[GraphView, str], str] | None = None  # a stage of several nodes: what each node is (ctx.kind)


@dataclass
class Artifact:
    """A finished stage output folder."""

    node: str
    key: str
    path: Path
    trusted_target: str | None = None  # the configured model.target: the only class a checkpoint may name
    result_type: type[Result] = ModelResult  # what its stage publishes

    @property
    def result(self) -> Result:
        """The stage's published result, typed (``metrics.json`` read as its ``Stage.result``)."""
        return self.result_type.from_metrics(self.metrics)

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
        source = str(self.path / "model.pt")
        if ckpt[CKPT_EXTRA].get("quant"):
            from pipeline import quant

            return quant.load_quantized(ckpt, source, self.trusted_target), "int8"
        return load_model(ckpt, source, self.trusted_target), "fp32"


@dataclass
class StageContext:
    """Everything a stage needs, built by the runner."""

    node: str  # e.g. "prune" or "export/distill"
    settings: Any  # this stage's bound Config dataclass
    data_cfg: DataConfig
    model_cfg: dict  # the configured model (plain dict, as checkpoints store it)
    rt: Runtime
    inputs: dict[str, Artifact]
    out_dir: Path  # staging folder; renamed into place when run() returns
    work_dir: Path  # survives interruptions (resume checkpoints)
    run_dir: Path  # the Hydra run folder (reports)
    cache_dir: Path  # decoded data sets
    extra: dict = field(default_factory=dict)  # what the stage's key_extra returned for this node
    config_yaml: str = ""  # the run's composed config (resolved), for what a stage ships (deploy bundle)
    kind: str | None = None  # what this node is, for stages of several nodes (``Stage.kind``)
    # where the run is tracked, for the report: {"backend", "uri", "run_id"} (None: no tracker; waits for the
    # tracker to have started the run)
    tracking: Callable[[], dict | list[dict] | None] = field(default=lambda: None, repr=False)
    _splits: Splits | None = field(default=None, repr=False)

    def splits(self) -> Splits:
        if self._splits is None:
            self._splits = load_splits(self.data_cfg, self.rt.seed, self.cache_dir, self.rt.progress)
        return self._splits

    @property
    def trusted_target(self) -> str | None:
        return self.model_cfg.get("target")
