"""A Hydra launcher on Ray (``hydra/launcher=ray``): each sweep or search job is a Ray task.

    python -m pipeline -m prune.ratio=0.3,0.5,0.7 hydra/launcher=ray
    python -m pipeline -m search=prune_qat hydra/launcher=ray hydra.sweeper.n_jobs=4 hydra.launcher.address=auto

Each job runs in a Ray worker process of its own (a worker runs one job and exits, as a Submitit job
does), holding ``num_cpus`` / ``num_gpus`` of the cluster's resources; Ray runs as many jobs at once as
fit. ``address: null`` starts a local Ray instance for the sweep (stopped when the sweep ends), ``auto``
joins the cluster started on this machine with ``ray start``, ``ray://host:port`` one reached through Ray
Client. The jobs share the artifact store and its locks as any sweep does, so on a cluster
``paths.outputs`` and the sweep folder must lie on a file system every node mounts.

Hydra only loads launchers from its ``hydra_plugins`` package, so ``hydra_plugins/pipeline_ray`` holds a
shim that subclasses ``RayJobLauncher`` as ``RayLauncher``. Ray is imported when a sweep launches, so the
package imports without it (``pip install -e ".[ray]"``).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline.errors import PipelineError, first_line

log = logging.getLogger(__name__)

NEEDS_RAY = 'hydra/launcher=ray needs Ray: pip install -e ".[ray]"'


def ray_installed() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("ray") is not None
    except (ImportError, ValueError):  # ValueError: a module whose __spec__ is None (blocked in sys.modules)
        return False


def import_ray():
    """The ``ray`` module, or a one-line error naming the extra."""
    try:
        import ray
    except ImportError:
        raise PipelineError(NEEDS_RAY) from None
    return ray


def execute_job(idx: int, overrides: Sequence[str], shared: dict[str, Any]) -> JobReturn:
    """One job in a Ray worker process: Hydra's state as the launching process had it, then ``run_job``."""
    Singleton.set_state(shared["singleton_state"])
    setup_globals()
    hydra_context, config = shared["hydra_context"], shared["config"]
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
        sweep_config.hydra.job.num = idx
    cwd = os.getcwd()
    os.chdir(shared["cwd"])  # relative paths mean what they meant where the sweep was started
    try:
        return run_job(hydra_context=hydra_context, task_function=shared["task_function"], config=sweep_config,
                       job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    finally:
        os.chdir(cwd)


class RayJobLauncher(Launcher):
    """``hydra/launcher=ray`` (``conf/hydra/launcher/ray.yaml``)."""

    def __init__(self, address: str | None = None, num_cpus: float = 1, num_gpus: float = 0, max_retries: int = 0,
                 log_to_driver: bool = True, init: dict | None = None) -> None:
        self.address, self.num_cpus, self.num_gpus = address, num_cpus, num_gpus
        self.max_retries, self.log_to_driver = max_retries, log_to_driver
        self.init = OmegaConf.to_container(init, resolve=True) if OmegaConf.is_config(init) else dict(init or {})
        self.config: DictConfig | None = None
        self.hydra_context = None
        self.task_function = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def _connect(self):
        """``ray.init`` once per process (a search launches a batch at a time); Ray shuts down at exit."""
        ray = import_ray()
        if self.num_cpus < 0 or self.num_gpus < 0 or self.max_retries < 0:
            raise PipelineError("hydra.launcher: num_cpus, num_gpus and max_retries must be >= 0")
        if not ray.is_initialized():
            address = self.address or "local"  # null: a new local instance, even where a cluster runs
            kwargs = {"include_dashboard": False, "log_to_driver": self.log_to_driver, **self.init}
            try:
                info = ray.init(address=address, **kwargs)
            except (ConnectionError, ValueError, TypeError) as e:
                raise PipelineError(f"hydra.launcher.address={self.address}: Ray could not start or connect "
                                    f"({first_line(e)})") from None
            where = "a local Ray instance" if address == "local" else f"the Ray cluster at {address}"
            log.info("Ray: %s (%s)", where, getattr(info, "address_info", {}).get("address", address))
        return ray

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        try:
            ray = self._connect()
        except PipelineError as e:
            from pipeline import tracking

            tracking.sweep_end(self.config, None, error=e)  # the parent run the sweep callback opened: FAILED
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep and self.config.hydra.sweep.mode is not None:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        log.info("Ray is launching %d jobs (%s CPU, %s GPU each), sweep output dir: %s", len(job_overrides),
                 self.num_cpus, self.num_gpus, sweep_dir)
        shared = ray.put({"hydra_context": self.hydra_context, "config": self.config, "cwd": os.getcwd(),
                          "task_function": self.task_function, "singleton_state": Singleton.get_state()})
        remote = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_calls=1,  # a process per job
                            max_retries=self.max_retries)(execute_job)
        refs = []
        for n, overrides in enumerate(job_overrides):
            idx = initial_job_idx + n
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            refs.append(remote.remote(idx, list(overrides), shared))
        runs = []
        for n, (ref, overrides) in enumerate(zip(refs, job_overrides, strict=True)):
            try:
                runs.append(ray.get(ref))
            except ray.exceptions.RayError as e:  # the worker died (crash, out of memory, a lost node)
                error = RuntimeError(f"job #{initial_job_idx + n}: its Ray worker failed: {first_line(e, 300)}")
                runs.append(JobReturn(overrides=list(overrides), status=JobStatus.FAILED, _return_value=error))
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return runs
