"""qat.float_layers=[measure]: blocks in execution order, and the fastest timed placement wins."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import env, inference, onnxio, placement, quant
from pipeline.models import build_model
from tests.conftest import ORT_BITS

R8 = {"name": "resnet8", "num_classes": 10, "width": 0.5}
SPEC = quant.QuantSpec("uint8", ORT_BITS, 0.01, ())


def test_leading_blocks_follow_execution_order():
    r20 = build_model({"name": "resnet20", "num_classes": 10})
    assert placement.leading_blocks(quant.prepare_qat(r20, SPEC), r20) == [
        "conv1", *(f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)), "fc"]
    mnv3 = build_model({"name": "mobilenet_v3_small", "num_classes": 10, "small_input": True})
    blocks = placement.leading_blocks(quant.prepare_qat(mnv3, SPEC), mnv3)
    assert blocks[:3] == ["features.0", "features.1", "features.2"] and blocks[-1] == "classifier.3", blocks


def test_base_spec_combines_names_and_auto(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(env, "cpu_info", lambda: {"cpu": "x", "cores": 2, "flags": ["avx2"]})  # no VNNI
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    model = build_model(R8)

    def qat(*float_layers):
        return SimpleNamespace(act_dtype="uint8", weight_bits="auto", observer_ema=0.01,
                               float_layers=list(float_layers))

    spec = placement.base_spec(qat("fc", "auto", "measure"), model)
    assert spec.float_layers == ("fc", "conv1", "layer1.0") and spec.weight_bits == 7  # no VNNI: 7-bit weights
    assert placement.base_spec(qat("measure"), model).float_layers == ()
    assert spec.keeping_fp32(["layer2"]).float_layers == ("fc", "conv1", "layer1.0", "layer2")


def test_the_default_keeps_narrow_convs_fp32_only_where_int8_is_slower(cfg_factory, monkeypatch):
    """qat.float_layers defaults to [auto]; experiment=tiny pins [] so tests see one graph on every CPU."""
    model = build_model(R8)  # width 0.5: an 8-channel stem and first block
    qat = cfg_factory(tiny=False).qat
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    monkeypatch.setattr(env, "cpu_info", lambda: {"cpu": "x", "cores": 2, "flags": ["avx2"]})
    assert placement.base_spec(qat, model).float_layers == ("conv1", "layer1.0")
    assert placement.base_spec(cfg_factory().qat, model).float_layers == ()  # experiment=tiny
    monkeypatch.setattr(env, "cpu_info", lambda: {"cpu": "x", "cores": 2, "flags": ["avx2", "avx512_vnni"]})
    assert placement.base_spec(qat, model).float_layers == ()


def _fake_runtime(monkeypatch, session, time_runs) -> None:
    """The runtime's sessions and timer replaced: ``session(path, threads)``, ``time_runs(sess, x, warmup, runs)``."""
    from types import SimpleNamespace

    from pipeline.inference import base

    rt = SimpleNamespace(session=session and (lambda path, threads=0, **options: session(path, threads)),
                         float_precisions=lambda: ["f32"])
    monkeypatch.setattr(inference, "get", lambda name="onnxruntime": rt)
    monkeypatch.setattr(inference, "time_runs", time_runs)
    monkeypatch.setattr(base, "time_runs", time_runs)


@pytest.mark.parametrize("int8_ms,chosen,tried,real", [
    ([0.8, 0.5, 0.55, 0.55, 0.55, 0.55], 1, 6, True),  # one FP32 block is fastest
    pytest.param([0.8, 0.79, 0.6, 0.65, 0.65, 0.65], 2, 6, True, marks=pytest.mark.zoo),  # two blocks
    ([0.8, 0.79, 0.9, 0.9, 0.85, 0.85], 0, 6, False),  # within the margin of all-INT8: noise must not decide
    ([0.8, 0.6, 0.59, 0.58, 0.7, 0.7], 1, 6, False),  # as fast within the margin: the fewest FP32 blocks
    ([0.5, 0.9, 0.9, 0.5, 0.5, 0.5], 0, 3, False),  # two in a row far slower than the best: no more exported
    ([1.3, 1.2, 1.25, 1.25, 1.3, 1.3], 1, 6, False),  # every placement slower than FP32 (1.0 ms): the advice says so
])
def test_the_fastest_placement_wins(monkeypatch, int8_ms, chosen, tried, real):
    """Every candidate exported (``real``; else the export stubbed, the choice is the same); ONNX Runtime's timer
    replaced by fixed times per file."""
    torch.manual_seed(0)
    model = build_model(R8).eval()
    blocks = placement.leading_blocks(quant.prepare_qat(model, SPEC), model)
    ms = {"fp32.onnx": 1.0, **{f"int8-{k}.onnx": t for k, t in enumerate(int8_ms)}}  # resnet8: 10 blocks
    exported = []

    def fake_session(path, threads=0):
        exported.append(path)
        return path.name

    _fake_runtime(monkeypatch, fake_session, lambda sess, x, w, r: np.full(r, ms.get(sess, 9.0) / 1e3))
    if not real:
        monkeypatch.setattr(placement, "export_int8", lambda gm, images, path: None)
        monkeypatch.setattr(onnxio, "export_onnx", lambda *a, **k: None)
    p = placement.measure(model, SPEC, 32, torch.randn(8, 3, 32, 32), 4, progress=False)
    assert len(blocks) // 2 + 1 == len(int8_ms)  # candidates k = 0 .. half the blocks
    assert len(p.candidates) == tried == len(exported) - 1  # + the FP32 model
    assert p.float_layers == blocks[:chosen]
    assert p.candidates[chosen]["vs_fp32"] == pytest.approx(1.0 / int8_ms[chosen])
    assert p.summary().startswith(f"FP32 up to {blocks[chosen - 1]}:" if chosen else "all INT8:")
    if min(int8_ms[:tried]) < 1.0:
        assert p.advice() is None
    else:
        assert p.advice() == ("no placement is faster than FP32 at batch 4 on this CPU (the fastest: 0.83x FP32): "
                              "deploy the FP32 model at this batch size, or set qat.measure_batch to the batch you "
                              "deploy with")


@pytest.mark.parametrize("once_ms, runs", [(1.0, 300), (0.01, 2000), (500.0, 3)])
def test_timed_blocks_last_about_the_same_time(monkeypatch, once_ms, runs):
    """Fast models get hundreds of runs per timed block, slow ones at least 3."""
    _fake_runtime(monkeypatch, None, lambda sess, x, w, r: np.full(r, once_ms / 1e3))
    assert inference.runs_for(None, np.zeros(1), 0.3) == runs


def test_the_speed_probe_quantizes_with_the_measured_placement(monkeypatch, tmp_path):
    """A search trial's speed probe keeps FP32 what the qat stage's [measure] would (the search stubbed)."""
    from omegaconf import OmegaConf

    from pipeline import probe

    seen = {}

    def fake_measure(model, spec, size, images, batch, progress=True):
        seen["batch"] = batch
        return placement.Placement(["conv1"], batch, 1.0, [])

    monkeypatch.setattr(placement, "measure", fake_measure)
    qat = OmegaConf.create({"float_layers": ["measure"], "act_dtype": "uint8", "weight_bits": 8,
                            "observer_ema": 0.01, "measure_batch": 4})
    cov = inference.get().kernel_coverage(probe._export(build_model(R8), 32, tmp_path / "m.onnx", True, qat))
    assert seen["batch"] == 4 and cov["float_kernels"] == 1 and cov["int8_kernels"] > 0, cov


def test_blocks_with_float_ops_are_one_more_candidate(monkeypatch):
    """The modules running ops without an INT8 kernel (a GELU here, as a module and as a function) kept FP32
    together: one candidate besides the prefixes, chosen when it is the fastest, and named as such."""

    class Block(torch.nn.Module):
        def __init__(self, act: bool):
            super().__init__()
            self.conv, self.act = torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.GELU() if act else torch.nn.ReLU()
            self.fn = False

        def forward(self, x):
            y = self.conv(x)
            return (torch.nn.functional.gelu(y) if isinstance(self.act, torch.nn.GELU) and self.fn else self.act(y)) + x

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.blocks = torch.nn.Sequential(*(Block(i in (5, 6)) for i in range(8)))
            self.fc = torch.nn.Linear(16, 10)

        def forward(self, x):
            return self.fc(self.blocks(self.stem(x)).mean((2, 3)))

    torch.manual_seed(0)
    model = Net().eval()
    model.blocks[6].fn = True  # F.gelu in the block's own code
    gm = quant.prepare_qat(model, SPEC, 8)
    every = placement.leading_blocks(gm, model)
    assert placement.float_islands(gm, model) == ["blocks.5", "blocks.6"]
    ms = {"fp32.onnx": 1.0, "int8-0.onnx": 0.9, "int8-1.onnx": 0.6}  # int8-1: the islands; prefixes 0.95
    _fake_runtime(monkeypatch, lambda path, threads=0: path.name,
                  lambda sess, x, w, r: np.full(r, ms.get(sess, 0.95) / 1e3))
    exported = []  # the exports themselves are tested above
    monkeypatch.setattr(placement, "export_int8", lambda gm, images, path: exported.append(gm))
    monkeypatch.setattr(onnxio, "export_onnx", lambda *a, **k: None)
    p = placement.measure(model, SPEC, 8, torch.randn(4, 3, 8, 8), 2, progress=False)
    assert p.float_layers == ["blocks.5", "blocks.6"]
    assert p.candidates[1]["label"] == "FP32 where ops stay float (2 modules)"
    assert len(p.candidates) == len(exported) == 2 + len(every) // 2
    assert quant.quantized_layers(exported[1]) == [n for n in quant.quantized_layers(gm) if n not in
                                                   ("blocks.5.conv", "blocks.6.conv")]  # the islands FP32
    assert p.summary().startswith("FP32 where ops stay float (2 modules): 1.67x FP32, 1.50x all-INT8")
