"""Every YAML composes and validates; bad config values fail early with one line naming the key."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from pipeline.errors import PipelineError
from pipeline.runner import Runner
from tests.conftest import CONF

REQUIRED = {  # options that need a value the user must give
    ("data", "cifar10"): ["data.root=/nonexistent"],
    ("data", "imagefolder"): ["data.root=/nonexistent"],
    ("data", "photos"): ["data.root=/nonexistent"],
    ("model", "custom"): ["model.target=torchvision.models.resnet18"],
    ("experiment", "cifar10_full"): ["data.root=/nonexistent"],
    ("experiment", "cifar10_speed"): ["data.root=/nonexistent"],
    ("experiment", "cifar10_converged"): ["data.root=/nonexistent"],
}


def _options():
    for path in sorted(Path(CONF).rglob("*.yaml")):
        group = path.parent.relative_to(CONF).as_posix()
        if group in ("data", "model", "experiment"):
            yield group, path.stem


@pytest.mark.parametrize("group,option", list(_options()))
def test_every_group_option_composes_and_validates(cfg_factory, tmp_path, group, option):
    cfg = cfg_factory(f"{group}={option}", *REQUIRED.get((group, option), []), tiny=False)
    Runner(cfg, tmp_path)  # binds every section; raises on any problem


def test_stage_files_are_all_in_the_defaults(cfg_factory):
    cfg = cfg_factory(tiny=False)
    for path in Path(CONF, "stages").glob("*.yaml"):
        assert path.stem in cfg, f"conf/stages/{path.name} is not used in conf/config.yaml"


def test_wrong_type_is_one_line_naming_the_key(cfg_factory, tmp_path):
    cfg = cfg_factory("train.epochs=three")
    with pytest.raises(PipelineError, match=r"train\.epochs: got 'three', expected int") as e:
        Runner(cfg, tmp_path)
    assert "\n" not in str(e.value)


def test_model_kwargs_reach_the_builder_or_say_why_not(cfg_factory, tmp_path):
    """'model.kwargs={...}' replaces the null default (a {} default made Hydra refuse every new key)."""
    from omegaconf import OmegaConf

    from pipeline.models import build_model

    cfg = cfg_factory("model=mobilenet_v2", "model.kwargs={dropout: 0.3}")
    assert build_model(OmegaConf.to_container(cfg.model, resolve=True)).classifier[0].p == 0.3
    with pytest.raises(PipelineError, match=r"^model.kwargs=\{'dropot': 0.3\}: torchvision's mobilenet_v2 rejected "
                                            r"them \(.*dropot.*\); check model.kwargs$"):
        build_model(OmegaConf.to_container(cfg_factory("model=mobilenet_v2", "model.kwargs={dropot: 0.3}").model,
                                           resolve=True))
    with pytest.raises(PipelineError, match=r"^config error: model.kwargs: \{'depth': 4\}: the CIFAR ResNets take no "
                                            r"constructor arguments; use model.width, or drop model.kwargs$"):
        Runner(cfg_factory("model.kwargs={depth: 4}"), tmp_path)


def test_unknown_key_added_with_plus_is_rejected(cfg_factory, tmp_path):
    cfg = cfg_factory("+train.lrr=0.1")
    with pytest.raises(PipelineError, match=r"train\.lrr: unknown key"):
        Runner(cfg, tmp_path)


def test_unknown_key_without_plus_is_rejected_by_hydra(cfg_factory):
    with pytest.raises(ConfigCompositionException, match="train.lrr"):
        cfg_factory("train.lrr=0.1")


def test_unknown_group_option(cfg_factory):
    with pytest.raises(MissingConfigException, match="resnet999"):
        cfg_factory("model=resnet999")


def test_several_problems_are_reported_together(cfg_factory, tmp_path):
    cfg = cfg_factory("train.lr=-1", "stage=nope", "model.name=resnet999")
    with pytest.raises(PipelineError) as e:
        Runner(cfg, tmp_path)
    msg = str(e.value)
    assert "train.lr" in msg and "stage" in msg and "resnet999" in msg


def test_mandatory_value_left_unset(cfg_factory, tmp_path):
    with pytest.raises(PipelineError, match=r"data\.root: data\.source=imagefolder needs data\.root=/path"):
        Runner(cfg_factory("data=imagefolder"), tmp_path)
    with pytest.raises(PipelineError, match=r"model\.name: set exactly one of model\.name .* or model\.target"):
        Runner(cfg_factory("model=custom"), tmp_path)


def test_top_level_keys_are_named_without_a_dot(cfg_factory, tmp_path):
    with pytest.raises(PipelineError, match=r"config error: seed: got 'x', expected int; fix it with seed=<value>"):
        Runner(cfg_factory("seed=x"), tmp_path)


def test_missing_data_root_is_a_config_error(cfg_factory, tmp_path):
    cfg = cfg_factory("data=imagefolder", "data.root=null")
    with pytest.raises(PipelineError, match="data.root"):
        Runner(cfg, tmp_path)


def test_launcher_plugin_that_is_not_installed_is_one_line():
    from pipeline.__main__ import check_launcher

    msg = check_launcher(["-m", "hydra/launcher=rq", "prune.ratio=0.3,0.5"])
    assert msg is not None and "\n" not in msg
    assert "pip install hydra-rq-launcher" in msg and "basic" in msg and "submitit_local" in msg
    assert check_launcher(["-m", "hydra/launcher=basic"]) is None
    assert check_launcher(["-m", "hydra/launcher=submitit_local"]) is None  # the slurm extra, installed with dev
    assert check_launcher(["prune.ratio=0.3"]) is None


def test_ray_launcher_without_ray_is_one_line_naming_the_extra(monkeypatch):
    from pipeline.__main__ import check_launcher
    from pipeline.ray_launcher import import_ray

    assert check_launcher(["-m", "hydra/launcher=ray", "prune.ratio=0.3,0.5"]) is None  # the ray extra, in dev
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    expected = 'hydra/launcher=ray needs Ray: pip install -e ".[ray]"'
    assert check_launcher(["-m", "hydra/launcher=ray", "prune.ratio=0.3,0.5"]) == expected
    with pytest.raises(PipelineError) as e:
        import_ray()
    assert str(e.value) == expected


@pytest.mark.parametrize("override,message", [
    ("data.val_fraction=1.5", "data.val_fraction: 1.5 must be in [0, 1)"),
    ("data.std=[0.1,0,0.2]", "data.std: [0.1, 0.0, 0.2] must all be > 0"),
    ("train.clip_grad_norm=0", "train.clip_grad_norm: 0.0 must be > 0 or null"),
    ("prune.ratio=1.5", "prune.ratio: 1.5 must be in [0, 1) (the fraction removed)"),
    ("qat.observer_ema=0", "qat.observer_ema: 0.0 must be in (0, 1]"),
    ("export.opset=17", "export.opset: 17 is too old for the QDQ translations (opset 18); use 18 or newer"),
    ("validate.rounds=0", "validate.rounds: must be >= 1"),
    ("validate.concurrency=[2,0]", "validate.concurrency: [2, 0]; every value must be >= 1"),
    ("train.lr=nan", "train.lr: nan is not a finite number; use a value > 0"),
    ("distill.temperature=inf", "distill.temperature: inf is not a finite number; use a value > 0"),
])
def test_declared_bounds_are_one_line_naming_the_key(cfg_factory, tmp_path, override, message):
    with pytest.raises(PipelineError) as e:
        Runner(cfg_factory(override), tmp_path)
    assert str(e.value) == f"config error: {message}"


def test_bounds_skip_null_and_hold_inside_the_range():
    import dataclasses

    from pipeline.config import check_bounds, setting

    @dataclasses.dataclass
    class Knobs:
        low: float = setting(ge=0, lt=1)
        sizes: list[int] = setting(ge=1, each=True)
        mode: str = setting(choices=("a", "b"))
        limit: float | None = setting(gt=0)

    assert check_bounds(Knobs(0.0, [1, 8], "a", None)) == []
    assert check_bounds(Knobs(1.0, [0], "c", -1.0)) == ["low: 1.0 must be in [0, 1)", "sizes: [0] must be >= 1",
                                                       "mode: c must be one of a, b", "limit: -1.0 must be > 0"]
