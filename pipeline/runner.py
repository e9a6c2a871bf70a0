"""The stage graph: resolve what a command needs, reuse what exists, build the rest.

A node is a stage name (``train``) or, for export, ``export/<model stage>``. Its key hashes the
config sections that matter to it together with its inputs' keys, so changing a knob re-runs that
stage and everything downstream, while multirun jobs with the same upstream share its artifact.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from omegaconf import DictConfig, OmegaConf

from pipeline.artifacts import (
    CONFIG,
    MANIFEST,
    METRICS,
    atomic_write_text,
    check_writable,
    file_lock,
    file_sha256,
    stable_hash,
    staging_dir,
    write_json,
)
from pipeline.config import bind, raise_if_errors
from pipeline.data import DataConfig
from pipeline.errors import PipelineError
from pipeline.models import ModelConfig
from pipeline.runtime import make_runtime
from pipeline.stage import Artifact, StageContext
from pipeline.training import FitConfig

log = logging.getLogger(__name__)


@dataclass
class RootConfig:
    """Top-level keys of ``conf/config.yaml``."""

    stage: str  # "all" (every stage in `pipeline`) or one stage name
    pipeline: list[str]  # the default sequence, in order
    run_upstream: bool  # build missing upstream artifacts (else stop with the command to run)
    force: Literal["none", "stage", "all"]  # re-run even when an artifact with the same key exists
    seed: int
    device: Literal["auto", "cpu", "cuda"]
    amp: Literal["auto", "off", "bf16", "fp16"]  # CUDA only
    channels_last: Literal["auto", "on", "off"]  # auto: on for CPU and CUDA conv nets
    deterministic: bool
    progress: bool  # tqdm bars
    sync_bn: bool  # under torchrun: batch-norm statistics over the global batch, not each rank's share


def stage_registry() -> dict:
    import stages

    return stages.REGISTRY


def base(node: str) -> str:
    return node.split("/", 1)[0]


def versions() -> dict[str, str]:
    """Versions of Python and the packages that shape results (for manifests and reports)."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "onnx", "onnxruntime", "onnxscript", "hydra-core", "torch-pruning"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip() or None
    except Exception:
        return None


class Runner:
    """Validates the whole config up front, then builds nodes in dependency order."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.registry = stage_registry()
        errors: list[str] = []
        self.root = bind({k: cfg.get(k) for k in ("stage", "pipeline", "run_upstream", "force", "seed",
                                                  "device", "amp", "channels_last", "deterministic",
                                                  "progress", "sync_bn")}, RootConfig, "", errors)
        self.data_cfg = bind(cfg.get("data"), DataConfig, "data", errors)
        self.model_cfg = bind(cfg.get("model"), ModelConfig, "model", errors)
        self.settings = {name: bind(cfg.get(name), mod.Config, name, errors)
                         for name, mod in self.registry.items()}
        if self.root is not None:
            names = ", ".join(["all", *self.registry])
            if self.root.stage != "all" and self.root.stage not in self.registry:
                errors.append(f"stage: {self.root.stage!r} is not a stage; choose one of {names}")
            for s in self.root.pipeline:
                if s not in self.registry:
                    errors.append(f"pipeline: {s!r} is not a stage; choose from {names}")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        for name, st in self.settings.items():
            if isinstance(st, FitConfig) and st.batch_size % world:
                errors.append(f"{name}.batch_size: {st.batch_size} is not divisible by the world size {world}; "
                              f"use a multiple of {world}")
        if not errors:  # checks that build the model need a valid config first
            for mod in self.registry.values():
                if (check := getattr(mod, "check_config", None)) is not None:
                    errors.extend(check(self))
        raise_if_errors(errors)
        self._keys: dict[str, str] = {}
        self.artifacts_root = Path(cfg.paths.artifacts)

    # ------------------------------------------------------------ graph

    def model_stages(self) -> list[str]:
        """Stages in the configured sequence that produce a PyTorch model."""
        return [s for s in self.root.pipeline if getattr(self.registry[s], "PRODUCES_MODEL", False)]

    def expand(self, stage: str) -> list[str]:
        """The graph nodes of a stage: itself, or what its ``nodes(runner)`` lists (export/<stage>, ...)."""
        nodes = getattr(self.registry[stage], "nodes", None)
        return nodes(self) if nodes is not None else [stage]

    def targets(self) -> list[str]:
        chosen = self.root.pipeline if self.root.stage == "all" else [self.root.stage]
        return [n for s in chosen for n in self.expand(s)]

    def inputs(self, node: str) -> dict[str, str]:
        return self.registry[base(node)].inputs(self, node)

    def key(self, node: str) -> str:
        if node not in self._keys:
            mod = self.registry[base(node)]
            c = self.cfg
            self._keys[node] = stable_hash({
                "node": node, "version": getattr(mod, "VERSION", 1),
                "section": OmegaConf.to_container(c[base(node)], resolve=True),
                "data": OmegaConf.to_container(c.data, resolve=True),
                "model": OmegaConf.to_container(c.model, resolve=True),
                "seed": c.seed,
                "inputs": {role: self.key(n) for role, n in self.inputs(node).items()},
                "extra": mod.key_extra(self, node) if hasattr(mod, "key_extra") else None,
            })
        return self._keys[node]

    def artifact_dir(self, node: str) -> Path:
        return self.artifacts_root / node / self.key(node)

    # ------------------------------------------------------------ running

    def run(self) -> dict[str, Artifact]:
        check_writable(self.artifacts_root)
        check_writable(self.run_dir)
        self.rt = make_runtime(self.root.device, self.root.seed, self.root.amp,
                               self._channels_last(), self.root.progress, self.root.deterministic,
                               self.root.sync_bn)
        done: dict[str, Artifact] = {}
        targets = self.targets()
        for node in targets:
            self._ensure(node, set(targets), done)
        if self.rt.is_main:
            write_json(self.run_dir / "artifacts.json",
                       {n: {"key": a.key, "path": str(a.path)} for n, a in done.items()})
        return done

    def _channels_last(self) -> bool:
        return self.root.channels_last != "off"

    def _ensure(self, node: str, requested: set[str], done: dict[str, Artifact]) -> Artifact:
        if node in done:
            return done[node]
        mod = self.registry[base(node)]
        inputs = {role: self._ensure(n, requested, done) for role, n in self.inputs(node).items()}
        cached = getattr(mod, "CACHED", True)
        final = self.artifact_dir(node) if cached else self.run_dir
        force = self.root.force == "all" or (self.root.force == "stage" and node in requested)
        exists = self.rt.agree(cached and (final / MANIFEST).is_file())  # rank 0 decides under torchrun
        if exists and not force:
            log.info("%s: reusing %s (same config)", node, final)
            done[node] = Artifact(node, self.key(node), final)
            return done[node]
        if node not in requested:
            if not self.root.run_upstream:
                raise PipelineError(
                    f"{node} has no artifact for this config; run `python -m pipeline stage={base(node)}` "
                    "first, or set run_upstream=true"
                )
            log.info("%s: no artifact for this config; running it first (upstream of %s)",
                     node, ", ".join(sorted(requested)))
        done[node] = self._build(node, mod, inputs, final, cached, force)
        return done[node]

    def _build(self, node, mod, inputs, final: Path, cached: bool, force: bool) -> Artifact:
        """Build under the artifact's lock. Under torchrun rank 0 holds the lock and writes; the other
        ranks train along in the same work folder (for resuming) and write nothing."""
        key, main = self.key(node), self.rt.is_main
        lock = final.parent / f"{key}.lock" if cached else self.run_dir / ".validate.lock"
        work_dir = final.parent / f"{key}.work" if cached else self.run_dir / ".work"
        with file_lock(lock) if main else contextlib.nullcontext():
            # a parallel job may have built it while this one waited for the lock
            if self.rt.agree(cached and not force and (final / MANIFEST).is_file()):
                log.info("%s: reusing %s (built by another job)", node, final)
                return Artifact(node, key, final)
            if main:
                log.info("%s: running -> %s", node, final)
                start = _dt.datetime.now(_dt.timezone.utc)
                with staging_dir(final) if cached else contextlib.nullcontext(final) as out:
                    metrics = self._run_stage(node, mod, inputs, out, work_dir)
                    self._write_meta(node, key, inputs, out, metrics, start)
            elif not getattr(mod, "MAIN_ONLY", False):
                with tempfile.TemporaryDirectory() as tmp:
                    self._run_stage(node, mod, inputs, Path(tmp), work_dir)
            self.rt.barrier()
            if main:
                shutil.rmtree(work_dir, ignore_errors=True)
        return Artifact(node, key, final)

    def _run_stage(self, node, mod, inputs, out: Path, work_dir: Path) -> dict:
        if self.rt.is_main:
            work_dir.mkdir(parents=True, exist_ok=True)
        ctx = StageContext(node=node, cfg=self.cfg, settings=self.settings[base(node)],
                           data_cfg=self.data_cfg, model_cfg=OmegaConf.to_container(self.cfg.model, resolve=True),
                           rt=self.rt, inputs=inputs, out_dir=out, work_dir=work_dir, run_dir=self.run_dir)
        return mod.run(ctx)

    def _write_meta(self, node, key, inputs, out: Path, metrics: dict, start) -> None:
        write_json(out / METRICS, metrics)
        atomic_write_text(out / CONFIG, OmegaConf.to_yaml(self.cfg, resolve=True))
        files = sorted(p for p in out.iterdir() if p.is_file() and p.name != MANIFEST
                       and not p.name.startswith("."))
        write_json(out / MANIFEST, {
            "node": node, "stage": base(node), "key": key,
            "created": start.isoformat(timespec="seconds"),
            "seconds": round((_dt.datetime.now(_dt.timezone.utc) - start).total_seconds(), 1),
            "inputs": {r: {"node": a.node, "key": a.key, "path": str(a.path)} for r, a in inputs.items()},
            "outputs": {p.name: file_sha256(p) for p in files if p.suffix in (".pt", ".onnx")},
            "versions": versions(), "git_commit": _git_commit(),
        })


def run_pipeline(cfg: DictConfig, run_dir: Path) -> dict[str, Artifact]:
    """Validate ``cfg`` and build every target node; return the artifacts used."""
    return Runner(cfg, run_dir).run()
