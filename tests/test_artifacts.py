"""Checkpoints load safely and fail clearly; writes are atomic; unwritable outputs are caught."""

from __future__ import annotations

import pytest
import torch

from pipeline.artifacts import atomic_write_bytes, check_writable, load_checkpoint, save_checkpoint, staging_dir
from pipeline.errors import PipelineError
from pipeline.models import apply_shapes, build_model, load_model, module_shapes

R20 = {"name": "resnet20", "num_classes": 10, "width": 1.0}


def test_checkpoint_roundtrip_with_weights_only(tmp_path):
    m = build_model(R20)
    save_checkpoint(tmp_path / "m.pt", m.state_dict(), R20)
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    m2 = load_model(ckpt, "m.pt", None)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(m.eval()(x), m2.eval()(x))


def test_truncated_and_corrupt_checkpoints(tmp_path):
    m = build_model(R20)
    save_checkpoint(tmp_path / "m.pt", m.state_dict(), R20)
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "c.pt").write_bytes(b"garbage" * 10)
    for name in ("t.pt", "c.pt"):
        with pytest.raises(PipelineError, match="corrupt"):
            load_checkpoint(tmp_path / name)
    with pytest.raises(PipelineError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_from_other_architecture(tmp_path):
    m = build_model(R20)
    ckpt = {"model_cfg": {**R20, "name": "resnet32"}, "shapes": {}, "state_dict": m.state_dict(), "extra": {}}
    with pytest.raises(PipelineError, match="does not fit model resnet32"):
        load_model(ckpt, "ckpt", None)


def test_pruned_shapes_rebuild(tmp_path):
    m = build_model(R20)
    shapes = module_shapes(m)
    shapes["conv1"]["out"] = 8
    shapes["bn1"]["out"] = 8
    shapes["layer1.0.conv1"]["in"] = 8
    apply_shapes(m, shapes)
    assert m.conv1.weight.shape[0] == 8 and m.bn1.running_mean.shape == (8,)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_bytes(tmp_path / "f.bin", object())  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError), staging_dir(tmp_path / "art") as d:
        (d / "half.pt").write_bytes(b"x")
        raise RuntimeError("crash mid-stage")
    assert list(tmp_path.iterdir()) == []


def test_output_folder_not_writable(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(PipelineError, match="not writable.*paths.outputs"):
        check_writable(tmp_path / "file" / "sub")


def test_checkpoints_keep_the_module_versions_a_model_needs_to_load(tmp_path):
    """torchvision's MNASNet reads its version from the state dict's metadata in ``_load_from_state_dict``;
    checkpoints, the best epoch's copy and weights files without metadata (.safetensors) all load."""
    from safetensors.torch import save_file

    from pipeline.models import ModelConfig
    from pipeline.weights import load_weights

    cfg = {"name": "mnasnet0_5", "num_classes": 10, "image_size": 32, "width": 1.0, "small_input": True,
           "target": None, "kwargs": None, "family": "auto", "weights": None, "download": False}
    m = build_model(cfg).eval()
    save_checkpoint(tmp_path / "m.pt", m.state_dict(), cfg)
    ckpt = load_checkpoint(tmp_path / "m.pt")
    assert ckpt["state_dict"]._metadata[""] == {"version": 2}
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(load_model(ckpt, "m.pt", None).eval()(x), m(x))
    save_file(dict(m.state_dict()), str(tmp_path / "m.safetensors"))
    fresh = build_model(cfg)
    mc = ModelConfig(**{**cfg, "weights": str(tmp_path / "m.safetensors")})
    load_weights(fresh, mc, None)
    assert torch.equal(fresh.eval()(x), m(x))
