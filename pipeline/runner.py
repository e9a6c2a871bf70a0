"""The stage graph: validate the config, resolve what a command needs, reuse what exists, build the rest.

A node is a stage name (``train``) or, for export, ``export/<model stage>``. Its key hashes the bound
settings that change its artifact (gates and node switches are left out, see ``not_in_key``), the
data config and a fingerprint of the data files, the model config, the seed, its inputs' keys and,
for training stages, the runtime that shapes the result (device, AMP, memory format, world size).
Changing a knob re-runs that stage and everything downstream; sweep jobs with the same upstream
share its artifact. Reused artifacts are checked against the hashes in their manifest first.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf

from pipeline.artifacts import (
    CONFIG,
    MANIFEST,
    METRICS,
    atomic_write_text,
    check_writable,
    file_lock,
    file_sha256,
    shown,
    stable_hash,
    staging_dir,
    verify_artifact,
    write_json,
)
from pipeline.config import SEED_MAX, bind, key_settings, raise_if_errors, setting, unknown_key
from pipeline.data import DataConfig, check_size, fingerprint
from pipeline.env import git_commit, versions
from pipeline.errors import PipelineError
from pipeline.models import ModelConfig
from pipeline.results import Result
from pipeline.runtime import make_runtime, runtime_key
from pipeline.stage import Artifact, GraphView, Stage, StageContext, UnboundSettings, base
from pipeline.tracking import bind_settings, open_run
from pipeline.training import OBSERVERS, FitConfig
from pipeline.weights import fingerprint as weights_fingerprint

log = logging.getLogger(__name__)

ROOT_KEYS = ("stage", "pipeline", "run_upstream", "force", "seed", "device", "amp", "channels_last",
             "deterministic", "progress", "sync_bn")
SECTIONS = ("data", "model", "paths", "search", "hydra", "logger")  # top-level sections besides the stages


@dataclass
class RootConfig:
    """Top-level keys of ``conf/config.yaml``."""

    stage: str  # "all" (every stage in `pipeline`) or one stage name
    pipeline: list[str]  # the default sequence, in order
    run_upstream: bool  # build missing upstream artifacts (else stop with the command to run)
    force: Literal["none", "stage", "all"]  # re-run even when an artifact with the same key exists
    seed: int = setting(ge=0, le=SEED_MAX)
    device: Literal["auto", "cpu", "cuda"]
    amp: Literal["auto", "off", "bf16", "fp16"]  # auto: bf16/fp16 on CUDA, off on CPU
    channels_last: Literal["auto", "on", "off"]  # auto: on for CPU and CUDA conv nets
    deterministic: bool
    progress: bool  # tqdm bars
    sync_bn: bool  # under torchrun: batch-norm statistics over the global batch, not each rank's share


def stage_registry() -> dict[str, Stage]:
    import stages

    return stages.REGISTRY


class Runner:
    """Validates the whole config up front, then builds nodes in dependency order."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.registry = stage_registry()
        errors: list[str] = []
        self.root = bind({k: cfg.get(k) for k in ROOT_KEYS}, RootConfig, "", errors)
        known = [k for k in (*ROOT_KEYS, *SECTIONS, *self.registry) if k in cfg or k in ROOT_KEYS]
        errors.extend(unknown_key(k, known) for k in cfg if k not in known)  # +sed=3 (meant seed) is no no-op
        self.data_cfg = bind(cfg.get("data"), DataConfig, "data", errors)
        self.model_cfg = bind(cfg.get("model"), ModelConfig, "model", errors)
        self.loggers = bind_settings(cfg.get("logger"), errors)  # a missing tracker package: before anything runs
        stage_errors: dict[str, list[str]] = {name: [] for name in self.registry}
        self.settings = {name: bind(cfg.get(name), st.config, name, stage_errors[name])
                         for name, st in self.registry.items()}
        if self.root is not None:
            names = ", ".join(["all", *self.registry])
            if self.root.stage != "all" and self.root.stage not in self.registry:
                errors.append(f"stage: {self.root.stage!r} is not a stage; choose one of {names}")
            for s in self.root.pipeline:
                if s not in self.registry:
                    errors.append(f"pipeline: {s!r} is not a stage; choose from {names}")
            if not self.root.pipeline and self.root.stage == "all":
                errors.append("pipeline: empty, so stage=all has nothing to run; list stages, e.g. "
                              "pipeline=[train,export,validate], or choose one with stage=<name>")
        if errors or self.root is None or self.data_cfg is None or self.model_cfg is None:
            chosen = set(self.root.pipeline if self.root else []) | {self.root.stage if self.root else ""}
            raise_if_errors(errors + [e for s in self.registry if s in chosen for e in stage_errors[s]])
        self.view = GraphView(tuple(self.root.pipeline), self.root.stage, self.settings, self.data_cfg,
                              self.model_cfg, self.registry)
        self.needed = self._needed_stages(stage_errors, errors)  # stages that will run: only these are checked
        world = int(os.environ.get("WORLD_SIZE", "1"))
        for name in self.needed:
            st = self.settings[name]
            if isinstance(st, FitConfig) and st.batch_size % world:
                errors.append(f"{name}.batch_size: {st.batch_size} is not divisible by the world size {world}; "
                              f"use a multiple of {world}")
        if self.data_cfg.source != "imagefolder":  # data held in memory fits, before checks build the model
            try:  # (an image folder is counted when it runs: check_size in run())
                check_size(self.data_cfg, None)
            except PipelineError as e:
                raise_if_errors([*errors, str(e)])
        for name in self.needed:  # a stage that writes into the run folder never replaces an earlier run's files
            st = self.registry[name]
            if not st.cached and (old := next((f for f in st.outputs if (self.run_dir / f).exists()), None)):
                errors.append(f"the run folder {shown(self.run_dir)} already holds {old} of an earlier run; give a "
                              "new one with hydra.run.dir=<new folder> (or leave hydra.run.dir out: every run "
                              "gets its own folder)")
        for name in self.needed:  # checks that build the model, for stages whose settings bound
            if self.settings[name] is not None and (check := self.registry[name].check) is not None:
                errors.extend(check(self.view))
        raise_if_errors(errors)
        self._keys: dict[str, str] = {}
        self._fingerprint: str | None = None
        self._weights: str | None = None
        self._weights_done = False
        self.artifacts_root = Path(cfg.paths.artifacts)
        self.cache_dir = Path(cfg.paths.cache)

    # ------------------------------------------------------------ graph

    def _needed_stages(self, stage_errors: dict[str, list[str]], errors: list[str]) -> list[str]:
        """Walk from the requested stages through their inputs; report bind errors of stages on the way."""
        seen_stages: set[str] = set()
        seen_nodes: set[str] = set()

        def stage_ok(s: str) -> bool:
            if s not in seen_stages:
                seen_stages.add(s)
                errors.extend(stage_errors[s])
            return self.settings[s] is not None

        def visit(node: str) -> None:
            if node in seen_nodes:
                return
            seen_nodes.add(node)
            if not stage_ok(base(node)):
                return
            try:
                ups = self.view.inputs_of(node)
            except PipelineError as e:
                errors.append(str(e))
                return
            except UnboundSettings as e:  # an upstream section did not bind: its own errors say why (once)
                stage_ok(str(e))
                return
            for up in ups.values():
                if base(up) not in self.registry:
                    if self.registry[base(node)].check is None:
                        errors.append(f"{node}: its input {up!r} is not a stage")
                    continue
                visit(up)

        chosen = self.root.pipeline if self.root.stage == "all" else [self.root.stage]
        for s in chosen:
            if stage_ok(s):
                try:
                    nodes = self.view.expand(s)
                except PipelineError as e:
                    errors.append(str(e))
                    continue
                for n in nodes:
                    visit(n)
        return [s for s in self.registry if s in seen_stages]

    def model_stages(self) -> list[str]:
        return self.view.model_stages()

    def expand(self, stage: str) -> list[str]:
        return self.view.expand(stage)

    def targets(self) -> list[str]:
        chosen = self.root.pipeline if self.root.stage == "all" else [self.root.stage]
        return [n for s in chosen for n in self.expand(s)]

    def inputs(self, node: str) -> dict[str, str]:
        return self.view.inputs_of(node)

    @functools.cached_property
    def config_yaml(self) -> str:
        """The composed config, resolved: written beside every artifact and given to stages (the bundle)."""
        return OmegaConf.to_yaml(self.cfg, resolve=True)

    def data_fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.data_cfg, self.cache_dir)
        return self._fingerprint

    def _weights_id(self) -> str | None:
        """``model.weights`` by content (a file's sha256, a torchvision URL), never by path."""
        if not self._weights_done:
            self._weights, self._weights_done = weights_fingerprint(self.model_cfg), True
        return self._weights

    def key(self, node: str, _stack: tuple[str, ...] = ()) -> str:
        if node in _stack:
            raise PipelineError(f"the stage graph has a cycle: {' -> '.join([*_stack, node])}; check the "
                                "stages' source settings (qat.source, distill.student)")
        if node not in self._keys:
            st = self.registry[base(node)]
            payload: dict[str, Any] = {
                "node": node, "version": st.version,
                "settings": key_settings(self.settings[base(node)]),
                "data": key_settings(self.data_cfg), "data_files": self.data_fingerprint(),
                "model": {**key_settings(self.model_cfg), "weights": self._weights_id()}, "seed": self.root.seed,
                "inputs": {role: self.key(n, (*_stack, node)) for role, n in self.inputs(node).items()},
                "extra": st.key_extra(self.view, node) if st.key_extra is not None else None,
            }
            if st.trains:
                payload["runtime"] = runtime_key(self.root.device, self.root.amp, self._channels_last(),
                                                 self.root.deterministic,
                                                 int(os.environ.get("WORLD_SIZE", "1")), self.root.sync_bn)
            self._keys[node] = stable_hash(payload)
        return self._keys[node]

    def artifact_dir(self, node: str) -> Path:
        return self.artifacts_root / node / self.key(node)

    # ------------------------------------------------------------ running

    def run(self) -> dict[str, Artifact]:
        check_size(self.data_cfg, self.cache_dir)  # the decoded data fits its limit, the disk and memory
        check_writable(self.artifacts_root)
        check_writable(self.run_dir)
        self.rt = make_runtime(self.root.device, self.root.seed, self.root.amp,
                               self._channels_last(), self.root.progress, self.root.deterministic,
                               self.root.sync_bn)
        # under torchrun only rank 0 tracks; tracking never stops the run (a failing store is warned about once)
        self.tracking = open_run(self.loggers if self.rt.is_main else {}, self.cfg, self.run_dir, self.config_yaml)
        self._reused: set[str] = set()
        done: dict[str, Artifact] = {}
        try:
            targets = self.targets()
            for node in targets:
                self._ensure(node, set(targets), done)
            if self.rt.is_main:
                write_json(self.run_dir / "artifacts.json",
                           {n: {"key": a.key, "path": str(a.path)} for n, a in done.items()})
                self.tracking.run_files(self.run_dir, lambda t: getattr(t.settings, "log_bundle", True))
        except BaseException as e:
            self.tracking.close(e)  # the tracked run is marked FAILED with the error line
            raise
        self.tracking.close()
        return done

    def _channels_last(self) -> bool:
        return self.root.channels_last != "off"

    def _artifact(self, node: str, path: Path) -> Artifact:
        return Artifact(node, self.key(node), path, self.model_cfg.target, self.registry[base(node)].result)

    def _reusable(self, node: str, final: Path, quiet: bool = False) -> bool:
        """An artifact exists for this key and its files match the manifest's hashes (rank 0 decides; says why
        an artifact folder that is there is not used, unless ``quiet``: the second look under the lock)."""
        ok = False
        if self.rt.is_main and (final / MANIFEST).is_file():
            problem = verify_artifact(final)
            if problem is None:
                ok = True
            elif not quiet:
                log.warning("%s: the artifact in %s is damaged (%s); building it again", node, final, problem)
        elif self.rt.is_main and final.is_dir() and not quiet:
            log.warning("%s: the artifact in %s has no %s (deleted?); building it again", node, final, MANIFEST)
        return self.rt.agree(ok)

    def _ensure(self, node: str, requested: set[str], done: dict[str, Artifact]) -> Artifact:
        if node in done:
            return done[node]
        self.key(node)  # raises on a cycle before anything is built
        st = self.registry[base(node)]
        inputs = {role: self._ensure(n, requested, done) for role, n in self.inputs(node).items()}
        final = self.artifact_dir(node) if st.cached else self.run_dir
        force = self.root.force == "all" or (self.root.force == "stage" and node in requested)
        if st.cached and not force and self._reusable(node, final):
            log.info("%s: reusing %s (same config)", node, final)
            self._reused.add(node)
            done[node] = self._tracked(node, st, self._gated(node, st, self._artifact(node, final)))
            self._tell_reused(st, done[node])
            return done[node]
        if node not in requested:
            if not self.root.run_upstream:
                raise PipelineError(
                    f"{node} has no artifact for this config; run `python -m pipeline stage={base(node)}` "
                    "first, or set run_upstream=true"
                )
            log.info("%s: no artifact for this config; running it first (upstream of %s)",
                     node, ", ".join(sorted(requested)))
        done[node] = self._tracked(node, st, self._gated(node, st, self._build(node, st, inputs, final, force)))
        return done[node]

    @staticmethod
    def _tell_reused(st: Stage, art: Artifact) -> Artifact:
        """Epoch observers (a search trial's reporter) see a reused training stage's history as if it ran."""
        if st.trains and OBSERVERS:
            history = art.metrics.get("history") or []
            for obs in OBSERVERS:
                obs.reused(st.name, history)
        return art

    def _tracked(self, node: str, st: Stage, art: Artifact) -> Artifact:
        """Hand a finished node to the trackers: its key, whether it was reused, its stored metrics."""
        if self.tracking and st.cached:
            self.tracking.node_done(node, art.key, art.metrics, node in self._reused)
        return art

    def _gated(self, node: str, st: Stage, art: Artifact) -> Artifact:
        if st.gate is not None and st.cached:
            failures = st.gate(self.settings[st.name], node, art.result)
            if failures:
                raise PipelineError(f"{failures[0]} (artifact kept in {art.path})")
        return art

    def _build(self, node: str, st: Stage, inputs: dict[str, Artifact], final: Path, force: bool) -> Artifact:
        """Build under the artifact's lock. Under torchrun rank 0 holds the lock and writes; the other
        ranks train along in the same work folder (for resuming) and write nothing."""
        key, main = self.key(node), self.rt.is_main
        if st.cached:
            lock, work_dir = final.parent / f"{key}.lock", final.parent / f"{key}.work"
        else:
            lock, work_dir = self.run_dir / f".{st.name}.lock", self.run_dir / f".{st.name}.work"
        with file_lock(lock) if main else contextlib.nullcontext():
            # a parallel job may have built it while this one waited for the lock
            if st.cached and not force and self._reusable(node, final, quiet=True):
                log.info("%s: reusing %s (built by another job)", node, final)
                self._reused.add(node)
                return self._tell_reused(st, self._artifact(node, final))
            if main:
                if st.cached:  # staging folders of killed runs of this key (nobody else holds the lock)
                    for stale in final.parent.glob(f".{final.name}.*.partial"):
                        shutil.rmtree(stale, ignore_errors=True)
                log.info("%s: running -> %s", node, final)
                start = _dt.datetime.now(_dt.timezone.utc)
                with staging_dir(final) if st.cached else contextlib.nullcontext(final) as out:
                    metrics = self._run_stage(node, st, inputs, out, work_dir)
                    missing = [f for f in st.outputs if not (out / f).is_file()]
                    if missing:
                        raise RuntimeError(f"stage {st.name} declares outputs {missing} but did not write them")
                    if st.cached:
                        self._write_meta(node, key, inputs, out, metrics, start)
            elif not st.main_only:
                with tempfile.TemporaryDirectory() as tmp:
                    self._run_stage(node, st, inputs, Path(tmp), work_dir)
            self.rt.barrier()
            if main:
                shutil.rmtree(work_dir, ignore_errors=True)
        return self._artifact(node, final)

    def _run_stage(self, node: str, st: Stage, inputs: dict[str, Artifact], out: Path, work_dir: Path) -> dict:
        if self.rt.is_main:
            work_dir.mkdir(parents=True, exist_ok=True)
        extra = st.key_extra(self.view, node) if st.key_extra is not None else None
        ctx = StageContext(node=node, settings=self.settings[st.name], data_cfg=self.data_cfg,
                           model_cfg=OmegaConf.to_container(self.cfg.model, resolve=True), rt=self.rt,
                           inputs=inputs, out_dir=out, work_dir=work_dir, run_dir=self.run_dir,
                           cache_dir=self.cache_dir, extra=extra or {},
                           config_yaml=self.config_yaml, tracking=self.tracking.info,
                           kind=st.kind(self.view, node) if st.kind is not None else None)
        metrics = st.run(ctx)
        return metrics.to_metrics() if isinstance(metrics, Result) else metrics

    def _write_meta(self, node: str, key: str, inputs: dict[str, Artifact], out: Path, metrics: dict,
                    start: _dt.datetime) -> None:
        write_json(out / METRICS, metrics)
        atomic_write_text(out / CONFIG, self.config_yaml)
        files = sorted(p for p in out.iterdir() if p.is_file() and p.name != MANIFEST
                       and not p.name.startswith("."))
        write_json(out / MANIFEST, {
            "node": node, "stage": base(node), "key": key,
            "created": start.isoformat(timespec="seconds"),
            "seconds": round((_dt.datetime.now(_dt.timezone.utc) - start).total_seconds(), 1),
            "inputs": {r: {"node": a.node, "key": a.key, "path": str(a.path)} for r, a in inputs.items()},
            "data_files": self.data_fingerprint(),
            "outputs": {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size} for p in files},
            "versions": versions(), "git_commit": git_commit(),
        })


def run_pipeline(cfg: DictConfig, run_dir: Path) -> dict[str, Artifact]:
    """Validate ``cfg`` and build every target node; return the artifacts used."""
    return Runner(cfg, run_dir).run()
