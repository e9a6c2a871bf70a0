"""Artifacts you can trust: checkpoints never choose code, changed data is never reused, damaged
artifacts are rebuilt, run folders are unique, resumed training equals uninterrupted training, and
bad input is one line naming the key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.artifacts import read_json, save_checkpoint, verify_artifact
from pipeline.data import DataConfig, Splits, fingerprint, load_splits
from pipeline.errors import PipelineError
from pipeline.models import build_model, load_model
from pipeline.runner import Runner, run_pipeline
from pipeline.runtime import make_runtime
from pipeline.training import FitConfig, fit
from tests.conftest import tiny_weights

ROOT = Path(__file__).resolve().parent.parent
R8 = {"name": "resnet8", "num_classes": 10, "width": 0.5}


# ---------------------------------------------------------------- 1. a checkpoint never chooses code


def _evil_module(tmp_path: Path, monkeypatch) -> Path:
    marker = tmp_path / "imported"
    (tmp_path / "evil_mod.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "import torch\nclass Net(torch.nn.Module):\n"
        "    def __init__(self, num_classes=10):\n        super().__init__()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return marker


@pytest.mark.parametrize("target,kwargs", [("evil_mod.Net", {}),
                                           ("torch.hub.load", {"repo_or_dir": ".", "model": "x", "source": "local"})])
def test_checkpoint_naming_another_class_is_refused_before_import(tmp_path, monkeypatch, target, kwargs):
    marker = _evil_module(tmp_path, monkeypatch)
    ckpt = {"model_cfg": {**R8, "name": None, "target": target, "kwargs": kwargs}, "shapes": {},
            "state_dict": {}, "extra": {}}
    with pytest.raises(PipelineError, match=f"names the model class '{target}'.*never chooses code"):
        load_model(ckpt, "teacher.pt", None)
    with pytest.raises(PipelineError, match="never chooses code"):
        load_model(ckpt, "teacher.pt", "my_pkg.MyNet")  # a configured target allows only itself
    assert not marker.exists() and "evil_mod" not in sys.modules


def test_checkpoint_given_as_teacher_cannot_run_code(cfg_factory, tmp_path, monkeypatch):
    marker = _evil_module(tmp_path, monkeypatch)
    save_checkpoint(tmp_path / "t.pt", {}, {**R8, "name": None, "target": "evil_mod.Net", "kwargs": {}})
    with pytest.raises(PipelineError, match=r"distill\.teacher: .*names the model class 'evil_mod.Net'"):
        Runner(cfg_factory(f"distill.teacher={tmp_path}/t.pt"), tmp_path)
    assert not marker.exists()


def test_configured_target_is_trusted(tmp_path):
    cfg = {**R8, "name": None, "target": "torchvision.models.resnet18", "kwargs": {}}
    model = build_model(cfg)
    ckpt = {"model_cfg": cfg, "shapes": {}, "state_dict": model.state_dict(), "extra": {}}
    assert isinstance(load_model(ckpt, "m.pt", "torchvision.models.resnet18"), torch.nn.Module)


# ---------------------------------------------------------------- 2. changed data is never reused


def _image_folder(root: Path, per_class: int = 4) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


def _folder_cfg(root: Path) -> DataConfig:
    return DataConfig("imagefolder", str(root), False, 8, 2, 0.0, [0.5] * 3, [0.25] * 3, False, 0, None, "squash",
                      0.875, "pad", [0.08, 1.0], 0, 1, 100.0, "stat")


def test_data_fingerprint_sees_added_and_moved_files(tmp_path):
    _image_folder(tmp_path / "d")
    cfg = _folder_cfg(tmp_path / "d")
    first = fingerprint(cfg)
    assert fingerprint(cfg) == first
    os.replace(tmp_path / "d/train/cat/0.png", tmp_path / "d/train/dog/9.png")  # same bytes, other class
    moved = fingerprint(cfg)
    assert moved != first
    splits = load_splits(cfg, 0, tmp_path / "cache")
    assert int((splits.train_y == 1).sum()) == 5  # the decoded cache follows the move: 5 dogs now
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "d/train/cat/new.png")
    assert fingerprint(cfg) not in (first, moved)


def test_artifact_keys_follow_the_data_files(cfg_factory, tmp_path):
    _image_folder(tmp_path / "d")
    over = ("data=imagefolder", f"data.root={tmp_path}/d", "data.num_classes=2", "data.image_size=8")
    key = Runner(cfg_factory(*over), tmp_path).key("train")
    (tmp_path / "d/train/cat/0.png").write_bytes((tmp_path / "d/train/cat/1.png").read_bytes())
    assert Runner(cfg_factory(*over), tmp_path).key("train") != key


# ---------------------------------------------------------------- 3./4. damaged artifacts are rebuilt


@pytest.mark.slow
def test_damaged_artifacts_are_detected_and_rebuilt(cfg_factory, tmp_path, caplog):
    cfg = cfg_factory("pipeline=[train,export]")
    done = run_pipeline(cfg, tmp_path / "r1")
    train, onnx = done["train"].path, done["export/train"].path / "model.onnx"
    assert verify_artifact(train) is None and verify_artifact(onnx.parent) is None
    data = bytearray(onnx.read_bytes())
    data[100:4196] = bytes(4096)  # 4 KB zeroed, same size
    onnx.write_bytes(bytes(data))
    pt = train / "model.pt"
    pt.write_bytes(pt.read_bytes()[:1000])  # truncated
    (done["export/train"].path / "metrics.json").write_text("{\"trunc")
    assert "model.pt has another size" in verify_artifact(train)
    caplog.set_level("WARNING")
    done2 = run_pipeline(cfg_factory("pipeline=[train,export]"), tmp_path / "r2")
    assert "damaged" in caplog.text and verify_artifact(done2["train"].path) is None
    assert done2["export/train"].metrics["parity"]["top1_agreement"] >= 90
    assert not list(train.parent.glob(".*.partial"))


def test_stale_partial_folders_of_a_killed_run_are_removed(cfg_factory, tmp_path):
    r = Runner(cfg_factory("stage=train", "train.epochs=0", tiny_weights(tmp_path)), tmp_path)
    final = r.artifact_dir("train")
    stale = final.parent / f".{final.name}.x1y2.partial"
    stale.mkdir(parents=True)
    (stale / "model.pt").write_bytes(b"half")
    r.run()
    assert not stale.exists() and (final / "manifest.json").is_file()


def test_damaged_json_is_one_line(tmp_path):
    (tmp_path / "metrics.json").write_text("{\"test_acc\": 5")
    with pytest.raises(PipelineError, match=r"metrics.json is damaged .*delete it and run the same command"):
        read_json(tmp_path / "metrics.json")


# ---------------------------------------------------------------- 5. resume equals an uninterrupted run


def _noisy_setup():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(192) % 2
    x = torch.randint(0, 255, (192, 3, 8, 8), generator=g, dtype=torch.uint8)
    splits = Splits(x, y, x[:32], y[:32], x[:32], y[:32], ["a", "b"])
    dc = DataConfig("embedded", None, False, 8, 2, 0.0, [0.5] * 3, [0.25] * 3, True, 2, None, "squash", 0.875, "pad",
                    [0.08, 1.0], 0, 1, 100.0, "stat")  # augmented
    cfg = FitConfig(epochs=4, batch_size=32, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4,
                    schedule="cosine", warmup_epochs=1.0, label_smoothing=0.1, select="last",
                    clip_grad_norm=None)
    return splits, dc, cfg


def _dropout_net() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Dropout(0.5),
                               torch.nn.Linear(8, 2))


def test_resumed_training_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    splits, dc, cfg = _noisy_setup()
    rt = make_runtime("cpu", 0, "off", False, False, False)
    ref = _dropout_net()
    fit(ref, splits, dc, cfg, rt, tmp_path / "a")

    def crash(epoch, _m):
        if epoch == 2:
            raise KeyboardInterrupt

    rt = make_runtime("cpu", 0, "off", False, False, False)
    with pytest.raises(KeyboardInterrupt):
        fit(_dropout_net(), splits, dc, cfg, rt, tmp_path / "b", on_epoch_start=crash)
    torch.manual_seed(123)  # a new process: every random state elsewhere
    np.random.seed(123)
    resumed = _dropout_net()
    res = fit(resumed, splits, dc, cfg, rt, tmp_path / "b")
    assert res.resumed_at_epoch == 2 and res.resume_info() == {"resumed_at_epoch": 2}
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


# ---------------------------------------------------------------- 6./7. bad input: one line naming the key


@pytest.mark.parametrize("override,match", [
    ("train.momentum=-1", r"train\.momentum: -1\.0 must be >= 0"),
    ("train.weight_decay=-1", r"train\.weight_decay: -1\.0 must be >= 0"),
    ("train.warmup_epochs=-1", r"train\.warmup_epochs: -1\.0 must be >= 0"),
    ("data.train_subset=-5", r"data\.train_subset: -5 must be a positive number"),
    ("pipeline=[]", r"pipeline: empty, so stage=all has nothing to run"),
    ("data.std=[0.2,0,0.2]", r"data\.std: .* must all be > 0"),
    ("data.num_classes=1", r"data\.num_classes: 1; a classifier needs at least 2"),
    ("qat.observer_ema=0", r"qat\.observer_ema: 0\.0 must be in \(0, 1\]"),
    ("export.min_top1_agreement=120", r"export\.min_top1_agreement: 120\.0 must be a percentage"),
    ("distill.student=validate", r"distill\.student: unknown model 'validate'"),
    ("prune.steps=0", r"prune\.steps: 0 must be >= 1"),
    ("amp=fp16", None),  # only an error on CPU when it runs (see test below)
])
def test_bad_values_are_one_line_errors(cfg_factory, tmp_path, override, match):
    if match is None:
        Runner(cfg_factory(override), tmp_path)
        return
    with pytest.raises(PipelineError, match=match) as e:
        Runner(cfg_factory(override), tmp_path)
    assert "\n" not in str(e.value)


def test_fp16_autocast_on_cpu_is_refused(cfg_factory, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(PipelineError, match="amp=fp16 needs a CUDA GPU; on CPU use amp=bf16 or amp=off"):
        run_pipeline(cfg_factory("amp=fp16", "stage=train"), tmp_path / "run")


def test_qat_source_that_is_not_a_model_stage(cfg_factory, tmp_path):
    with pytest.raises(PipelineError, match=r"qat\.source: 'validate' is not a model stage"):
        Runner(cfg_factory("qat.source=validate"), tmp_path)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_unwritable_outputs_are_one_line_before_hydra_starts(tmp_path):
    (tmp_path / "file").write_text("x")
    out = _cli("experiment=tiny", f"paths.outputs={tmp_path}/file/out", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "error: cannot create the run folder" in out.stderr and "paths.outputs=" in out.stderr


def test_run_folders_are_claimed_atomically(tmp_path):
    from pipeline.__main__ import unique_dir

    base = str(tmp_path / "runs" / "2026-01-01_00-00-00")
    first, second = unique_dir(base), unique_dir(base)
    assert first == base and second == base + "_2" and Path(second).is_dir()


def test_sweep_job_folders_are_one_level_and_short_enough(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pipeline import CONF_DIR
    from pipeline.rundir import MAX_NAME, job_dirname

    long = ",".join(f"key{i}=value{i}" for i in range(60))
    assert job_dirname("prune.ratio=0.3,search.compare=[/runs/grid]") == "prune.ratio=0.3,search.compare=[_runs_grid]"
    assert len(job_dirname(long).encode()) <= MAX_NAME and job_dirname(long) != job_dirname(long + "1")
    with initialize_config_dir(str(CONF_DIR), version_base=None):  # the subdir pattern of conf/config.yaml
        cfg = compose("config", ["search=prune_qat", "search.compare=[/runs/grid]"], return_hydra_config=True)
        OmegaConf.set_readonly(cfg.hydra, False)
        cfg.hydra.job.override_dirname = "search.compare=[/runs/grid]"
        cfg.hydra.job.num = 3
        assert OmegaConf.select(cfg, "hydra.sweep.subdir") == "3_search.compare=[_runs_grid]"


@pytest.mark.slow
def test_concurrent_runs_keep_every_report_and_build_each_artifact_once(tmp_path):
    """Two runs started together (same second, same outputs): two run folders, one baseline."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    cmds = [[sys.executable, "-m", "pipeline", "experiment=tiny", "pipeline=[train,export,validate]",
             f"paths.outputs={tmp_path}/o", *extra] for extra in ([], ["export.parity_images=32"])]
    procs = [subprocess.Popen(c, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    reports = sorted((tmp_path / "o/runs").glob("*/report.json"))
    assert len(reports) == 2, outs
    logs = "".join(p.read_text() for p in (tmp_path / "o/runs").glob("*/*.log"))
    assert logs.count("] - train: running") == 1 and logs.count("] - train: reusing") == 1, logs
    assert len(list((tmp_path / "o/artifacts/train").glob("*/manifest.json"))) == 1
    assert len(list((tmp_path / "o/artifacts/export/train").glob("*/manifest.json"))) == 2
    assert {json.loads(r.read_text())["rows"][0]["name"] for r in reports} == {"baseline"}


def test_teacher_file_is_keyed_by_content(cfg_factory, tmp_path):
    save_checkpoint(tmp_path / "t.pt", build_model(R8).state_dict(), R8)
    key = Runner(cfg_factory(f"distill.teacher={tmp_path}/t.pt"), tmp_path).key("distill")
    torch.manual_seed(5)
    save_checkpoint(tmp_path / "t.pt", build_model(R8).state_dict(), R8)  # same path, other weights
    assert Runner(cfg_factory(f"distill.teacher={tmp_path}/t.pt"), tmp_path).key("distill") != key
