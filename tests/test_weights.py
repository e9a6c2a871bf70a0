"""Starting weights (model.weights): torchvision names from the local hub cache, state_dict files,
pipeline checkpoints, transfer learning to another class count, and keys by content."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.artifacts import save_checkpoint
from pipeline.errors import PipelineError
from pipeline.models import ModelConfig, build_model
from pipeline.runner import Runner, run_pipeline
from pipeline.weights import cache_path, load_weights, torchvision_weights

R8 = {"name": "resnet8", "num_classes": 10, "width": 0.5}


def _mc(**kw) -> ModelConfig:
    base = dict(name="resnet8", num_classes=10, image_size=32, width=0.5, small_input=True, target=None, kwargs={},
                family="auto",
                weights=None, download=False)
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_state_dict_files_load_exactly(tmp_path, suffix):
    torch.manual_seed(3)
    src = build_model(R8)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    elif suffix == ".pth":
        torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)  # DDP wrapper
    else:
        torch.save(src.state_dict(), path)
    torch.manual_seed(4)
    model = build_model(R8)
    info = load_weights(model, _mc(weights=str(path)), None)
    assert info["replaced_classifier"] == []
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_pipeline_checkpoint_with_pruned_shapes_as_weights(tmp_path):
    from pipeline.models import module_shapes
    from pipeline.pruning import drop_blocks

    torch.manual_seed(1)
    src = drop_blocks(build_model({**R8, "name": "resnet20"}), ["layer1.1"])
    save_checkpoint(tmp_path / "model.pt", src.state_dict(), {**R8, "name": "resnet20"}, shapes=module_shapes(src))
    model = build_model({**R8, "name": "resnet20"})
    info = load_weights(model, _mc(name="resnet20", weights=str(tmp_path / "model.pt")), None)
    assert info["pruned"] and isinstance(model.layer1[1], torch.nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), src.eval()(x))


def test_other_class_count_replaces_only_the_classifier(tmp_path):
    src = build_model({**R8, "num_classes": 100})
    torch.save(src.state_dict(), tmp_path / "w.pt")
    model = build_model(R8)
    fc_before = model.fc.weight.clone()
    info = load_weights(model, _mc(weights=str(tmp_path / "w.pt")), None)
    assert sorted(info["replaced_classifier"]) == ["fc.bias", "fc.weight"]
    assert torch.equal(model.fc.weight, fc_before) and torch.equal(model.conv1.weight, src.conv1.weight)


def test_weights_that_do_not_fit_are_one_line(tmp_path):
    torch.save(build_model({**R8, "width": 1.0}).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(PipelineError, match=r"does not fit resnet8: 0 missing, 0 unexpected, \d+ of another") as e:
        load_weights(build_model(R8), _mc(weights=str(tmp_path / "wide.pt")), None)
    assert "\n" not in str(e.value)
    with pytest.raises(PipelineError, match="no such file"):
        load_weights(build_model(R8), _mc(weights=str(tmp_path / "nope.pt")), None)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="cannot be read as weights"):
        load_weights(build_model(R8), _mc(weights=str(tmp_path / "junk.pt")), None)


def test_torchvision_names_come_from_the_local_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    mc = _mc(name="resnet18", weights="IMAGENET1K_V1", small_input=False, num_classes=10)
    with pytest.raises(PipelineError, match=r"not in the local cache .*hub/checkpoints/resnet18-.*set model.download"):
        load_weights(build_model(mc.__dict__), mc, None)
    w = torchvision_weights("resnet18", "DEFAULT")
    path = cache_path(w)
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(build_model({"name": "resnet18", "num_classes": 1000, "small_input": False}).state_dict(), path)
    model = build_model(mc.__dict__)
    info = load_weights(model, mc, None)  # ImageNet head (1000) -> 10 classes
    assert sorted(info["replaced_classifier"]) == ["fc.bias", "fc.weight"]
    small = _mc(name="resnet18", weights="IMAGENET1K_V1", small_input=True, num_classes=10)
    with pytest.raises(PipelineError, match="set model.small_input=false"):
        load_weights(build_model(small.__dict__), small, None)
    with pytest.raises(PipelineError, match="not a weights name of resnet18; choose one of DEFAULT, IMAGENET1K_V1"):
        torchvision_weights("resnet18", "IMAGENET9K")


def test_key_follows_the_weights_content_not_the_path(cfg_factory, tmp_path):
    torch.save(build_model(R8).state_dict(), tmp_path / "a.pt")
    (tmp_path / "b.pt").write_bytes((tmp_path / "a.pt").read_bytes())
    ka = Runner(cfg_factory(f"model.weights={tmp_path}/a.pt"), tmp_path).key("train")
    assert Runner(cfg_factory(f"model.weights={tmp_path}/b.pt"), tmp_path).key("train") == ka  # same bytes
    torch.manual_seed(9)
    torch.save(build_model(R8).state_dict(), tmp_path / "b.pt")
    assert Runner(cfg_factory(f"model.weights={tmp_path}/b.pt"), tmp_path).key("train") != ka
    assert Runner(cfg_factory(), tmp_path).key("train") != ka
    with pytest.raises(PipelineError, match="model.weights=.*nope.pt: no such file"):
        Runner(cfg_factory(f"model.weights={tmp_path}/nope.pt"), tmp_path)


@pytest.mark.slow
def test_compress_my_model_reproduces_its_baseline(cfg_factory, tmp_path):
    """Train once, save a plain state_dict, then give it with train.epochs=0: the same baseline accuracy."""
    first = run_pipeline(cfg_factory("pipeline=[train,export,validate]"), tmp_path / "r1")
    state = first["train"].checkpoint()["state_dict"]
    torch.save(state, tmp_path / "mine.pth")
    run_pipeline(cfg_factory("pipeline=[train,export,validate]", f"model.weights={tmp_path}/mine.pth",
                             "train.epochs=0"), tmp_path / "r2")
    rows = [json.loads((tmp_path / r / "report.json").read_text())["rows"][0] for r in ("r1", "r2")]
    assert rows[0]["name"] == rows[1]["name"] == "baseline" and rows[0]["accuracy"] == rows[1]["accuracy"]
