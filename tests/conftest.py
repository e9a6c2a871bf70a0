"""Shared fixtures: compose the real config with Hydra's compose API, shrunk by experiment=tiny."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from pipeline import CONF_DIR
from pipeline.quant import resolve_weight_bits

CONF = str(CONF_DIR)
# the weight bits ORT's INT8 kernels compute exactly on this CPU (7 without VNNI, where u8 x s8 pairs of 8-bit
# weights saturate): tests that compare ORT with PyTorch quantize with these
ORT_BITS = resolve_weight_bits("auto")[0]


def pytest_configure(config: pytest.Config) -> None:
    """Parallel workers share the cores: each gets its share of torch's threads (here, and through OpenMP in the
    processes the tests start), so two workers on two cores do not run four spinning threads (25% slower there).
    Inference sessions keep their thread settings: what they run (ONNX Runtime's run_async) depends on them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def make_cfg(tmp_path: Path, *overrides: str, tiny: bool = True) -> DictConfig:
    """Compose ``conf/config.yaml`` with overrides; outputs go to ``tmp_path``."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        ovr = (["experiment=tiny"] if tiny else []) + [f"paths.outputs={tmp_path}/outputs", *overrides]
        cfg = compose(config_name="config", overrides=ovr)
    with open_dict(cfg):
        cfg.progress = False
    return cfg


@pytest.fixture
def cfg_factory(tmp_path):
    return lambda *o, **kw: make_cfg(tmp_path, *o, **kw)


def tiny_weights(tmp_path: Path) -> str:
    """``model.weights=<file>`` of experiment=tiny's model (random init): ``train.epochs=0`` takes them as the
    baseline without training (the config check refuses train.epochs=0 without weights)."""
    import torch

    from pipeline.models import build_model

    path = tmp_path / "tiny_init.pt"
    if not path.is_file():
        torch.manual_seed(0)
        torch.save(build_model({"name": "resnet8", "num_classes": 10, "width": 0.5}).state_dict(), path)
    return f"model.weights={path}"


@pytest.fixture(autouse=True)
def _quiet_logs():
    for name in ("onnx_ir", "onnxscript", "matplotlib", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)  # a benchmark tool's main() run in-process silences logging for its process


def _carrying(marker: bytes) -> list[int]:
    """Pids of the processes whose environment holds ``marker``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "environ").read_bytes():
                pids.append(int(proc.name))
        except OSError:  # exited, or not ours
            pass
    return pids


@pytest.fixture
def ray_env():
    """The environment of a command that starts a local Ray instance (hydra/launcher=ray): Ray's files under
    a short folder of its own (its socket paths must stay under 108 characters), no RAY_ADDRESS to join
    another cluster, no usage report. Afterwards no process of that instance (GCS, raylet, workers, which
    all inherit RAY_TMPDIR) may be left."""
    pytest.importorskip("ray")
    root = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=root, RAY_USAGE_STATS_ENABLED="0")
    yield env
    marker = f"RAY_TMPDIR={root}\0".encode()
    deadline = time.monotonic() + 20
    while (left := _carrying(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:  # ours (they carry this test's folder): stop them, then fail
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)
    assert not left, f"Ray processes left running: {left}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """End-to-end (slow) tests first, so that parallel workers do not end on one long test while the others
    idle; the order within each group is kept."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
