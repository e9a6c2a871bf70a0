"""Post-training quantization: each step against the property it promises, and a tiny run through the stages."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from pipeline import ptq, quant
from pipeline.ptq.adaround import adaround, round_layer
from pipeline.ptq.bias_correction import correct_biases, float_means, mean_error
from pipeline.ptq.equalize import equalize
from pipeline.ptq.layers import (
    activation,
    affordable,
    capture_inputs,
    channel_mean,
    float_mode,
    layers,
    preact,
    set_folded_bias,
    walk,
    weight_and_bias,
)
from pipeline.quant.spec import _weight_qparams
from pipeline.runner import run_pipeline
from tests.conftest import tiny_weights


def _spec(bits: int = 8) -> quant.QuantSpec:
    return quant.QuantSpec("uint8", bits, 0.01, ())


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking batch norms: uneven scales, shifts and statistics (equalization has something to move)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
            m.weight.data.copy_(torch.rand(n, generator=g) ** 3 * 4 + 0.01)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def _small_net() -> nn.Module:
    def cbr(i, o, k=3, groups=1, act=nn.ReLU):
        return [nn.Conv2d(i, o, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(o), act()]

    torch.manual_seed(0)
    return _randomise_bn(nn.Sequential(
        *cbr(3, 16), *cbr(16, 32, 1), *cbr(32, 32, 3, groups=32), nn.Conv2d(32, 24, 1), nn.Conv2d(24, 16, 3),
        *cbr(16, 16, act=nn.Hardswish), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)))


def _prepared(model: nn.Module, bits: int = 8) -> torch.fx.GraphModule:
    return quant.prepare_qat(copy.deepcopy(model), _spec(bits), 32).eval()


def _ranges(gm: torch.fx.GraphModule) -> torch.Tensor:
    """Per output channel weight range of every quantized conv, spread as max/min ratio per layer."""
    return torch.stack([(r := weight_and_bias(m)[0].detach().abs().reshape(len(weight_and_bias(m)[0]), -1)
                         .amax(1)).max() / r.min().clamp(min=1e-12) for _, m in layers(gm)[:-1]])


def test_equalization_keeps_the_float_function_and_evens_weight_ranges():
    gm = _prepared(_small_net())
    x = torch.randn(16, 3, 32, 32)
    with float_mode(gm):
        ref = gm(x)
    spread = _ranges(gm)
    rep = equalize(gm, absorb=False)
    with float_mode(gm):
        out = gm(x)
    # conv->ReLU->1x1, 1x1->ReLU->depthwise, depthwise->ReLU->1x1, 1x1->3x3, 3x3->3x3 (no activation between);
    # the last conv's Hardswish is no ReLU: skipped and counted
    assert rep.pairs == 5
    assert rep.skipped == {"followed by QHardSwish, not a conv": 1}
    assert (out - ref).abs().max().item() < 1e-4
    assert _ranges(gm)[:5].log().mean() < spread[:5].log().mean() - 0.5  # per-channel ranges much closer


def test_equalization_keeps_mobilenet_v2_and_runs_its_relu6_as_relu():
    import torchvision

    torch.manual_seed(0)
    model = _randomise_bn(torchvision.models.mobilenet_v2(num_classes=10))
    gm = _prepared(model)
    ref_gm = copy.deepcopy(gm)
    rep = equalize(gm, absorb=False)
    for name in rep.relu6_as_relu:  # the reference: what equalization makes of a pair's ReLU6 (as AIMET does)
        ref_gm.get_submodule(name).act = nn.ReLU()
    x = torch.randn(4, 3, 32, 32)
    with float_mode(ref_gm):
        ref = ref_gm(x)
    with float_mode(gm):
        out = gm(x)
    assert rep.pairs >= 30 and len(rep.relu6_as_relu) >= 30
    assert (out - ref).abs().max().item() < 1e-4
    spec = quant.QuantSpec("uint8", 8, 0.01, (), relu6_as_relu=tuple(rep.relu6_as_relu))
    rebuilt = quant.prepare_qat(copy.deepcopy(model), spec, 32).eval()  # how a checkpoint is rebuilt
    rebuilt.load_state_dict(gm.state_dict())
    with float_mode(rebuilt):
        assert (rebuilt(x) - out).abs().max().item() < 1e-5


def test_walk_gives_each_layer_the_inputs_of_a_forward_pass_with_the_changes_before_it():
    import torchvision

    torch.manual_seed(0)
    gm = _prepared(_randomise_bn(torchvision.models.resnet18(num_classes=10)))  # residuals: values live long
    images = [torch.randn(4, 3, 32, 32), torch.randn(2, 3, 32, 32)]
    ptq.set_ranges(gm, images, "minmax")
    ref = copy.deepcopy(gm)
    visited = []

    def visit(name, m, xs, rxs):
        got = list(capture_inputs(gm, m, images))  # a forward pass of gm as changed so far
        assert all(torch.equal(a, b) for a, b in zip(xs, got, strict=True)), name
        got_ref = list(capture_inputs(ref, ref.get_submodule(name), images))  # ref, in float during the walk
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(rxs, got_ref, strict=True)), name
        set_folded_bias(m, torch.full((len(weight_and_bias(m)[0]),), 0.1))  # a change the layers after it see
        visited.append(name)

    walk(gm, images, visit, ref=ref)
    assert visited == [name for name, _ in layers(gm)]
    stopped = []
    walk(gm, images, lambda name, *_: stopped.append(name) or len(stopped) == 3)  # True ends the walk
    assert len(stopped) == 3
    assert affordable(gm, images, share=1e-12) == images[:1]  # at least one batch
    assert affordable(gm, images, share=0.5) == images


def test_bias_correction_zeroes_the_mean_error_on_its_calibration_images():
    gm = _prepared(_small_net(), bits=4)  # 4-bit weights: a clear bias to correct
    images = [torch.randn(16, 3, 32, 32), torch.randn(8, 3, 32, 32)]
    ptq.set_ranges(gm, images, "minmax")
    ref = copy.deepcopy(gm)  # the float model the quantized one is matched to
    means = float_means(ref, images, [name for name, _ in layers(ref)])
    with float_mode(ref), torch.no_grad():  # the same means from each layer's captured inputs
        for name, m in layers(ref):
            direct = sum(channel_mean(preact(m, x, quantized=False)) * len(x) for x in capture_inputs(ref, m, images))
            torch.testing.assert_close(means[name], direct / 24, rtol=1e-4, atol=1e-5)
    before = [mean_error(gm, name, images, ref).abs().max().item() for name, _ in layers(gm)]
    correct_biases(gm, images)
    after = [mean_error(gm, name, images, ref).abs().max().item() for name, _ in layers(gm)]
    # zero up to the rounding of the INT32 bias (step: input scale x weight scale), before and after the correction
    step = [float((_weight_qparams(weight_and_bias(m)[0], m.bits)[0] * m.in_quant.scale).max())
            if m.in_quant is not None else 0.0 for _, m in layers(gm)]
    assert max(before) > 0.05
    assert all(a <= s + 1e-4 for a, s in zip(after, step, strict=True)), (after, step)
    assert max(after) < max(before) / 20


def test_adaround_lowers_the_layer_reconstruction_error_and_writes_its_weights():
    gm = _prepared(_small_net(), bits=4)
    ptq.set_ranges(gm, [torch.randn(32, 3, 32, 32)], "minmax")
    _, m = layers(gm)[1]  # the 1x1 conv 16 -> 32 with its BN and ReLU
    torch.manual_seed(1)
    x = torch.relu(torch.randn(64, 16, 8, 8))
    with torch.no_grad():
        target = activation(m, preact(m, x, quantized=False))
    res = round_layer(m, x, target, iters=300, seconds=60)
    assert res.mse_adaround < 0.9 * res.mse_nearest, res
    m.in_quant = None  # compare the weights alone (no bias quantization)
    with torch.no_grad():
        got = float((activation(m, preact(m, x)) - target).pow(2).mean())
    assert got == pytest.approx(res.mse_adaround, rel=1e-3)  # the quantized layer uses the rounded weights


def test_adaround_stays_within_its_time_budget_and_leaves_the_rest_at_nearest_rounding():
    gm = _prepared(_small_net(), bits=4)
    images = [torch.randn(16, 3, 32, 32)]
    ptq.set_ranges(gm, images, "minmax")
    before = {n: weight_and_bias(m)[0].detach().clone() for n, m in layers(gm)}
    assert adaround(gm, images, seconds=0.0, iters=50) == []  # budget spent before the first layer: nothing rounded
    assert all(torch.equal(weight_and_bias(m)[0], before[n]) for n, m in layers(gm))
    done = adaround(gm, images, seconds=600.0, iters=5)
    assert [r.name for r in done] == [n for n, _ in layers(gm)]


def test_percentile_and_mse_ranges_clip_outliers_that_minmax_keeps():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, 4))
    x = torch.randn(16, 3, 32, 32)
    x[0, 0, 0, 0] = 200.0  # one outlier
    his = {}
    for method in ("minmax", "percentile", "mse"):
        gm = _prepared(model)
        ptq.set_ranges(gm, [x], method, percentile=99.9)
        his[method] = float(next(a for a in quant.act_quants(gm)).max_val)
    assert his["percentile"] < his["minmax"] / 3 and his["mse"] < his["minmax"]


SMALL = ["train.epochs=0", "ptq.calib_images=64", "ptq.batch_size=32", "ptq.adaround_seconds=2",
         "ptq.adaround_iters=20", "ptq.adaround_images=32", "ptq.range=mse"]


@pytest.mark.slow
def test_tiny_ptq_run_starts_qat_and_is_a_row_beside_qat_and_ort_static(cfg_factory, tmp_path):
    done = run_pipeline(cfg_factory("pipeline=[train,ptq,qat,export,validate]", "qat.source=train", "qat.epochs=0",
                                    "qat.init=ptq", tiny_weights(tmp_path), *SMALL), tmp_path / "run")
    m = json.loads(next((tmp_path / "outputs" / "artifacts" / "ptq").glob("*/metrics.json")).read_text())
    assert [s["step"] for s in m["steps"]] == ["equalize", "ranges", "adaround", "bias_correction"]
    assert m["steps"][0]["pairs"] > 0 and m["steps"][0]["skipped"]
    assert done["qat"].metrics["test_acc_ptq"] == pytest.approx(m["test_acc"])  # QAT starts from the PTQ model
    rows = {r["name"]: r for r in json.loads((tmp_path / "run" / "report.json").read_text())["rows"]}
    assert {"baseline", "ptq-int8", "qat-int8", "ort-static-int8"} <= set(rows)
    ptq_row = rows["ptq-int8"]
    assert ptq_row["fp32_input"] == "baseline" and ptq_row["quantize_s"] > 0
    assert ptq_row["int8_kernels"].split("/")[0] == ptq_row["int8_kernels"].split("/")[1]  # every layer INT8


def _image_folder(folder, n: int) -> list:
    """``n`` images of the embedded test split as JPEG (their shipped bytes) and PNG files in nested folders,
    beside a file that is no image."""
    import io

    import numpy as np
    from PIL import Image

    from pipeline.data import EMBEDDED

    with np.load(EMBEDDED) as z:
        blob, offsets = z["test_jpeg"].tobytes(), z["test_offsets"]
    files = []
    for i in range(n):
        jpeg = blob[offsets[i] : offsets[i + 1]]
        path = folder / f"set{i % 2}" / ("deep" if i % 3 == 0 else "") / f"img{i}.{'jpg' if i % 2 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".jpg":
            path.write_bytes(jpeg)
        else:
            Image.open(io.BytesIO(jpeg)).save(path)
        files.append(path)
    (folder / "notes.txt").write_text("not an image")
    return files


def test_ptq_calibrates_on_an_unlabeled_folder_and_refuses_a_bad_one(cfg_factory, tmp_path):
    import dataclasses
    from types import SimpleNamespace

    from pipeline.data import read_images
    from pipeline.errors import PipelineError
    from pipeline.runner import Runner
    from stages.ptq import _calibration_images

    folder = tmp_path / "calib"
    files = sorted(_image_folder(folder, 5))
    fast = ["pipeline=[train,ptq]", "train.epochs=0", tiny_weights(tmp_path), "ptq.steps=[]", "ptq.range=minmax"]
    run_pipeline(cfg_factory(*fast, f"ptq.calib_folder={folder}", "ptq.calib_images=64", "ptq.evaluate=final"),
                 tmp_path / "run")
    (done,) = (tmp_path / "outputs" / "artifacts" / "ptq").glob("*/metrics.json")
    m = json.loads(done.read_text())
    assert m["calibration_images"] == 5  # every image of the folder, fewer than 64
    # ptq.evaluate=final: the quantized model's accuracy alone, none per step
    assert m["test_acc"] > 0 and m["test_acc_calibration"] is None and m["test_acc_fp32_input"] is None
    assert [s["step"] for s in m["steps"]] == ["ranges"] and "test_acc" not in m["steps"][0]

    def runner(*o: str) -> Runner:
        return Runner(cfg_factory(*fast, *o), tmp_path / "k")

    # more images than calib_images: a seeded choice of that many, normalised as evaluation reads an image folder
    r = runner(f"ptq.calib_folder={folder}")
    ctx = SimpleNamespace(settings=dataclasses.replace(r.settings["ptq"], calib_images=3, batch_size=2),
                          data_cfg=r.data_cfg, rt=SimpleNamespace(seed=0, device="cpu", channels_last=False))
    got = torch.cat(_calibration_images(ctx))
    assert torch.equal(got, torch.cat(_calibration_images(ctx)))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in (r.data_cfg.mean, r.data_cfg.std))
    every = (read_images(files, r.data_cfg).float() - mean) / std
    hits = [int(((every - g).abs().amax((1, 2, 3)) < 1e-4).nonzero()) for g in got]
    assert len(got) == 3 and len(set(hits)) == 3

    before = r.key("ptq")
    _image_folder(folder / "more", 1)  # the folder's files are part of the key
    assert runner(f"ptq.calib_folder={folder}").key("ptq") != before
    assert runner().key("ptq") != before

    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "a.txt").write_text("x")
    for bad, says in ((tmp_path / "missing", "does not exist"), (tmp_path / "empty", "holds no image files"),
                      (folder / "notes.txt", "is a file")):
        with pytest.raises(PipelineError, match=f"ptq.calib_folder=.*{says}") as e:
            run_pipeline(cfg_factory(*fast, f"ptq.calib_folder={bad}"), tmp_path / "bad")
        assert "\n" not in str(e.value)


def test_fallback_keeps_the_block_whose_quantization_costs_most_in_fp32_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)  # a net whose predictions differ between images (pooled ones predict one class)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    gm = quant.prepare_qat(copy.deepcopy(model), _spec(), 8).eval()
    images = [torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    ptq.set_ranges(gm, images, "minmax")
    name, victim = layers(gm)[1]
    victim.in_quant.set_range(0.0, 2000.0)  # a grid far too coarse for this layer's input: it sees almost zeros
    before = [(m.quantize_weight, m.in_quant.enabled if m.in_quant is not None else None) for _, m in layers(gm)]
    with torch.no_grad():
        out = gm(images[0])

    blocks = [n for n, _ in layers(gm)]  # a Sequential's blocks: its layers
    assert ptq.fallback._members(gm, name) == ([victim], [victim.in_quant])  # the grid only it reads
    fb = ptq.fallback.choose(gm, images, blocks, max_blocks=3, target=100.0)
    assert fb.ranking[0][0] == name and fb.blocks[0] == name
    assert fb.agreement_probe > fb.agreement_before and len(fb.blocks) <= 3
    assert [b for b, _ in fb.path] == fb.blocks and fb.path[-1][1] == fb.agreement_probe
    assert [(m.quantize_weight, m.in_quant.enabled if m.in_quant is not None else None)
            for _, m in layers(gm)] == before
    with torch.no_grad():
        assert torch.equal(gm(images[0]), out)
    assert ptq.fallback.agreement(gm, images) == pytest.approx(fb.agreement_before)

    assert ptq.fallback.choose(gm, images, blocks, max_blocks=0, target=100.0).blocks == []
    assert ptq.fallback.choose(gm, images, blocks, max_blocks=3, target=fb.agreement_before).blocks == []  # met

    # the rebuilt model keeps it FP32: one quantized layer fewer
    kept = quant.prepare_qat(copy.deepcopy(model), _spec().keeping_fp32(fb.blocks[:1]), 8)
    assert [n for n, _ in layers(kept)] == [n for n, _ in layers(gm) if n != name]


def test_fallback_chooses_each_next_block_beside_the_ones_already_float():
    """Greedy: the second block is the one that lowers the error most with the first already float."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for i in range(4) for m in (nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1), nn.ReLU())],
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    gm = quant.prepare_qat(copy.deepcopy(model), _spec(), 8).eval()
    images = [torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    ptq.set_ranges(gm, images, "minmax")
    named = layers(gm)
    named[1][1].in_quant.set_range(0.0, 2000.0)  # ruined: sees almost zeros
    named[3][1].in_quant.set_range(0.0, 10.0)  # damaged, which hardly shows while the one before is ruined
    blocks = [n for n, _ in named]
    fb = ptq.fallback.choose(gm, images, blocks, max_blocks=2, target=100.0)
    assert fb.blocks == [blocks[1], blocks[3]]
    assert fb.ranking[1][0] != blocks[3]  # alone it ranks lower: a ranking taken once would have missed it
    with torch.no_grad(), float_mode(gm):
        ref = torch.cat([gm(x) for x in images])
    kls = {}
    with torch.no_grad(), ptq.fallback._as_float(ptq.fallback._members(gm, blocks[1])):  # brute force
        for b in blocks[:1] + blocks[2:]:
            with ptq.fallback._as_float(ptq.fallback._members(gm, b)):
                kls[b] = ptq.fallback._compare(ref, torch.cat([gm(x) for x in images]))[0]
    assert min(kls, key=kls.get) == fb.blocks[1]


def test_ptq_fallback_run_keeps_the_chosen_blocks_fp32_in_its_checkpoint_and_exports(cfg_factory, tmp_path):
    from pipeline.artifacts import load_checkpoint
    from pipeline.models import inside

    # a trained model (a random one predicts one class everywhere) and ranges that clip hard: a disagreement
    small = [o for o in SMALL if not o.startswith(("train.epochs", "ptq.range"))]
    run_pipeline(cfg_factory("pipeline=[train,ptq,export]", "export.ort_static_reference=false", "train.epochs=1",
                             *small, "ptq.steps=[]", "ptq.range=percentile", "ptq.percentile=60",
                             "ptq.evaluate=final", "ptq.fallback_blocks=2", "ptq.fallback_agreement=100"),
                 tmp_path / "run")  # the export's PyTorch/ONNX Runtime agreement gate passes
    (folder,) = (tmp_path / "outputs" / "artifacts" / "ptq").glob("*/")
    m = json.loads((folder / "metrics.json").read_text())
    fb = m["steps"][-1]
    assert fb["step"] == "fallback" and fb["agreement_before"] < 100 and 1 <= len(fb["blocks"]) <= 2
    assert fb["agreement_after"] >= fb["agreement_before"] and fb["ranking"][0][0] == fb["blocks"][0]
    assert [s["step"] for s in fb["steps_again"]] == ["ranges"]
    ckpt = load_checkpoint(folder / "model.pt")
    assert set(fb["blocks"]) <= set(ckpt["extra"]["quant"]["float_layers"])
    gm = quant.load_quantized(ckpt, "ptq", None)
    assert fb["blocks"] and not [n for n in quant.quantized_layers(gm) if inside(n, fb["blocks"])]
    assert m["quantized_layers"] == len(quant.quantized_layers(gm))


def _qat_init_seeds(tmp_path, monkeypatch, *args: str) -> tuple[list[list[str]], dict]:
    """``pipeline.tools.qat_init_seeds`` in this process, each pipeline job replaced by building its ``Runner``
    (the config checks of every stage, no training) and returning made-up metrics."""
    import sys

    from pipeline.runner import Runner
    from pipeline.tools import qat_init_seeds
    from tests.conftest import make_cfg

    jobs: list[list[str]] = []

    def fake_run(overrides: list[str], run_dir, stage: str) -> dict:
        jobs.append(overrides)
        Runner(make_cfg(tmp_path, *overrides, tiny=False), tmp_path / "run")
        seed = int(next(o for o in overrides if o.startswith("seed=")).split("=")[1]) if stage == "qat" else 0
        from_ptq = "qat.init=ptq" in overrides
        return {"test_acc": 50.0 + seed + (1.0 if from_ptq else 0.0), "ptq_test_acc": 49.0 + seed if from_ptq else None,
                "model_pt": tiny_weights(tmp_path).split("=", 1)[1], "seconds": 1.0}

    monkeypatch.setattr(qat_init_seeds, "_run", fake_run)
    monkeypatch.setattr(sys, "argv", ["qat_init_seeds", "--out", str(tmp_path / "o"), *args])
    qat_init_seeds.main()
    return jobs, json.loads((tmp_path / "o" / "qat_init_seeds.json").read_text())


def test_qat_init_seeds_runs_both_starts_per_seed_from_one_trained_model(tmp_path, monkeypatch, capsys):
    """pipeline.tools.qat_init_seeds: trains once, then per seed QAT from the PTQ model (its epochs) and from
    calibration (its epochs), every job from the trained weights; each job's config passes the pipeline's checks."""
    jobs, summary = _qat_init_seeds(tmp_path, monkeypatch, "--seeds", "0,1", "--ptq-epochs", "1",
                                    "--calibration-epochs", "3", "--", "experiment=tiny")
    assert "stage=train" in jobs[0] and not any(o.startswith("model.weights=") for o in jobs[0])
    weights = tiny_weights(tmp_path)
    for job in jobs[1:]:
        assert weights in job and "train.epochs=0" in job and "qat.source=train" in job
    arms = {(next(o for o in j if o.startswith("seed=")), next(o for o in j if o.startswith("qat.epochs="))): j
            for j in jobs[1:]}
    assert set(arms) == {("seed=0", "qat.epochs=1"), ("seed=1", "qat.epochs=1"), ("seed=0", "qat.epochs=3"),
                         ("seed=1", "qat.epochs=3")}
    assert {"qat.init=ptq", "pipeline=[train,ptq,qat]"} <= set(arms[("seed=0", "qat.epochs=1")])
    assert "qat.init=calibration" in arms[("seed=1", "qat.epochs=3")]
    assert [r["from_ptq"] - r["from_calibration"] for r in summary["rows"]] == [1.0, 1.0]
    assert summary["difference_mean"] == 1.0 and summary["ptq_alone_mean"] == 49.5
    assert "over 2 seeds" in capsys.readouterr().out


def test_qat_init_seeds_takes_given_weights_and_refuses_one_seed(tmp_path, monkeypatch):
    jobs, _ = _qat_init_seeds(tmp_path, monkeypatch, "--seeds", "0,1", "--", "experiment=tiny",
                              tiny_weights(tmp_path))
    assert len(jobs) == 4 and all("train.epochs=0" in j for j in jobs)  # no training job
    with pytest.raises(SystemExit, match="at least two seeds"):
        _qat_init_seeds(tmp_path, monkeypatch, "--seeds", "0", "--", "experiment=tiny")


@pytest.mark.heavy  # the default run checks every job's config in-process (the tests above)
def test_qat_init_seeds_end_to_end(tmp_path):
    """The tool's real jobs on the tiny config: two seeds x (QAT from PTQ, from calibration), two at a time."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "o"
    args = [sys.executable, "-m", "pipeline.tools.qat_init_seeds", "--seeds", "0,1", "--jobs", "2", "--out", str(out),
            "--", "experiment=tiny", tiny_weights(tmp_path), "data.train_subset=256", "ptq.adaround_seconds=2",
            f"paths.outputs={tmp_path}/outputs"]
    res = subprocess.run(args, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out / "qat_init_seeds.json").read_text())
    assert [r["seed"] for r in summary["rows"]] == [0, 1] and "over 2 seeds" in res.stdout
    arts = {(s, a): json.loads((out / f"seed{s}-{a}" / "artifacts.json").read_text())
            for s in (0, 1) for a in ("ptq", "calibration")}
    assert len({a["train"]["key"] for a in arts.values()}) == 2  # per seed (its split), from the same weights
    metrics = {k: json.loads((Path(a["qat"]["path"]) / "metrics.json").read_text()) for k, a in arts.items()}
    assert summary["rows"][1]["from_calibration"] == metrics[(1, "calibration")]["test_acc"]
    # QAT from the PTQ model starts from that model's accuracy
    assert metrics[(0, "ptq")]["test_acc_ptq"] == pytest.approx(summary["rows"][0]["ptq_alone"])
