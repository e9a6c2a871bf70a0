"""OpenVINO beside ONNX Runtime: the runtime (f32, bf16, INT8 coverage), its report rows, the bundle and
``pipeline.predict`` on it, and the one-line error when the optional package is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import deploy, inference, onnxio, quant
from pipeline.errors import PipelineError
from pipeline.inference import ort_quantize
from pipeline.predict import Predictor, main
from pipeline.report import build_report, int8_markdown
from pipeline.runner import run_pipeline
from stages.validate import runtime_rows
from tests.conftest import ORT_BITS, tiny_weights
from tests.test_deploy import MEAN, STD, _test_jpegs

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("openvino", reason='the openvino extra: pip install -e ".[openvino]" (in .[dev])')


def test_runtime_rows_and_the_reason_for_another_runtime():
    ov = inference.get("openvino")
    bf16 = "bf16" in ov.float_precisions()
    assert runtime_rows("distill", "fp32", "onnxruntime", inference.get()) == [("distill", "fp32", {})]
    names = [n for n, _, _ in runtime_rows("distill", "fp32", "openvino", ov)]
    assert names == ["distill@openvino"] + (["distill@openvino-bf16"] if bf16 else [])
    assert [(n, p) for n, p, _ in runtime_rows("qat-int8", "int8", "openvino", ov)] == [("qat-int8@openvino", "int8")]

    def row(name, model, runtime, precision, thr, acc):
        return {"name": name, "model": model, "runtime": runtime, "precision": precision, "throughput_ips": thr,
                "accuracy": acc, "accuracy_delta_vs_baseline": acc - 50, "speedup_vs_baseline": thr / 100}

    rows = [row("baseline", "baseline", "onnxruntime", "fp32", 100, 50),
            row("baseline@openvino-bf16", "baseline", "openvino", "bf16", 170, 49.8)]
    rows += [row("baseline@openvino", "baseline", "openvino", "fp32", 90, 50),
             {**row("int8@openvino", "int8", "openvino", "int8", 150, 49.5), "fp32_input": "baseline@openvino"}]
    rep = build_report(rows, "baseline", {}, type("G", (), {"max_accuracy_drop": 0.5, "min_speedup": None}))
    assert rep["best"] == "baseline@openvino-bf16"
    assert "running on openvino in bf16 (1.70x the same model in ONNX Runtime, -0.20 points)" in rep["best_reason"]
    # INT8 on OpenVINO against its input in f32 and in bf16: slower than bf16 is called out
    assert [(p["fp32_input"], round(p["ratio"], 2)) for p in rep["int8_vs_fp32_input"]] == [
        ("baseline@openvino", 1.67), ("baseline@openvino-bf16", 0.88)]
    assert "int8@openvino is slower than baseline@openvino-bf16 on this CPU" in int8_markdown(rep)[0]


@pytest.mark.slow
def test_openvino_rows_bundle_and_predict(cfg_factory, tmp_path):
    """A tiny validate with validate.runtimes=[onnxruntime,openvino]: a row per runtime (and bf16 where native),
    all timed; the runtime itself (f32 equals ONNX Runtime, bf16 differs a little, async calls, INT8 coverage);
    a bundle recommending an OpenVINO row records it, and predict runs it there (or where told)."""
    run = tmp_path / "run"
    run_pipeline(cfg_factory("pipeline=[train,qat,export,validate]", "train.epochs=0", tiny_weights(tmp_path),
                             "qat.source=train", "qat.epochs=0", "qat.target=openvino", "export.fp16=[]",
                             "export.ort_static_reference=false", "validate.runtimes=[onnxruntime,openvino]",
                             "validate.serving_batch_sizes=[2]", "validate.concurrency=[]",
                             "validate.deploy_optimized=false", "logger=mlflow"), run)
    rep = json.loads((run / "report.json").read_text())
    rows = {r["name"]: r for r in rep["rows"]}
    ov = inference.get("openvino")
    bf16 = "bf16" in ov.float_precisions()  # AVX512_BF16 / AMX
    assert set(rows) == {"baseline", "baseline@openvino", "qat-int8", "qat-int8@openvino"} | (
        {"baseline@openvino-bf16"} if bf16 else set())
    assert [r["runtime"] for r in rep["rows"]].count("openvino") == len(rows) - 2
    # qat.target=openvino: export checks the INT8 kernels on OpenVINO, where every quantized layer runs in INT8
    exported = json.loads((run / rows["qat-int8"]["onnx"]).with_name("metrics.json").read_text())
    assert exported["target"] == "openvino", exported
    assert exported["target_coverage"]["int8_kernels"] == exported["target_coverage"]["quantized_layers"] == 10
    assert exported["target_parity"]["images"] == exported["parity"]["images"] > 0, exported
    assert rows["qat-int8@openvino"]["int8_kernels"] == "10/10"
    # every row reaches the tracker, a row on another runtime under a name MLflow accepts
    from mlflow.tracking import MlflowClient

    logged = MlflowClient(rep["tracking"]["uri"]).get_run(rep["tracking"]["run_id"]).data.metrics
    assert {"validate/qat-int8/accuracy", "validate/qat-int8:openvino/accuracy"} <= set(logged)
    assert set(rep["serving"]["batch"]) == set(rows)
    rows = {n: r for n, r in rows.items() if not n.startswith("qat")}
    f32 = rows["baseline@openvino"]
    assert f32["precision"] == "fp32" and f32["agreement_vs_onnxruntime"] == 100.0 and f32["throughput_ips"] > 0
    assert f32["accuracy"] == rows["baseline"]["accuracy"]
    assert rep["environment"]["runtimes"]["openvino"]["version"].startswith("20")
    md = (run / "report.md").read_text()
    assert "| baseline@openvino | openvino | fp32 |" in md and "| runtime |" in md

    # the runtime on the run's model: f32 equals ONNX Runtime, bf16 is another precision, async calls finish
    onnx = run / rows["baseline"]["onnx"]
    x = onnxio.normalise(torch.randint(0, 255, (16, 3, 32, 32), dtype=torch.uint8), MEAN, STD)
    ref = inference.predict(inference.get().session(onnx), x)
    sess = ov.session(onnx, threads=1)
    assert sess.precision == "f32" and sess.input_shape[1:] == [3, 32, 32] and sess.output_shape[-1] == 10
    np.testing.assert_allclose(inference.predict(sess, x), ref, atol=1e-4)
    done = threading.Semaphore(0)
    errors: list = []
    for i in range(3):
        sess.run_async(x[i : i + 1], lambda err: (errors.append(err), done.release()))
    assert all(done.acquire(timeout=30) for _ in range(3)) and errors == [None] * 3
    if bf16:
        got = inference.predict(ov.session(onnx, threads=1, options=ov.precision_options("bf16")), x)
        assert np.abs(got - ref).max() > 0 and (got.argmax(1) == ref.argmax(1)).mean() >= 0.8
    # INT8 coverage from the compiled model: a QDQ model's convs and FC run in INT8, the FP32 model's none
    ort_quantize.static_quantize(onnx, tmp_path / "int8.onnx", x, "uint8", 8, tmp_path)
    cov, none = ov.kernel_coverage(tmp_path / "int8.onnx"), ov.kernel_coverage(onnx)
    assert cov["int8_kernels"] == 10 and cov["coverage"] == 1.0, cov
    assert none["int8_kernels"] == 0 and none["float_kernels"] == 10, none

    # the bundle of an OpenVINO row (bf16 where this CPU has it), whichever row this run's timing chose
    chosen = "baseline@openvino-bf16" if bf16 else "baseline@openvino"
    files = {n: run / r["onnx"] for n, r in rows.items()}
    out = deploy.write_bundle(tmp_path / "deploy", {**rep, "best": chosen}, files, [str(i) for i in range(10)],
                              MEAN, STD, 32, "", "", None, None, {"threads": 1})
    assert json.loads((out / "bundle.json").read_text())["models"]["model.onnx"]["runtime"]["name"] == "openvino"
    imgs = _test_jpegs(tmp_path / "imgs", 32)
    pred = Predictor(out)
    assert pred.runtime == "openvino" and pred.session.precision == ("bf16" if bf16 else "f32")
    xb = pred.to_input(np.stack([pred.load(f)[0] for f in imgs]))
    direct = ov.session(files[chosen], options=rows[chosen].get("runtime_options"))
    np.testing.assert_array_equal(pred.logits(xb).argmax(1), inference.predict(direct, xb).argmax(1))
    assert Predictor(out, runtime="onnxruntime").session.runtime == "onnxruntime"
    assert main([str(out), str(imgs[0]), "--runtime", "onnxruntime", "--top-k", "1"]) == 0


def _reads(gm, node) -> object:
    """The node ``node`` reads its first input from, behind identities, dropout and reshapes."""
    a, skip = node.args[0], (torch.nn.Identity, torch.nn.Dropout, torch.nn.Flatten)
    while (a.op == "call_module" and isinstance(gm.get_submodule(a.target), skip)) or \
            (a.op == "call_function" and a.target is torch.flatten):
        a = a.args[0]
    return a


class _Gated(torch.nn.Module):
    """conv -> ReLU -> a squeeze-excitation block with a Hardsigmoid gate (MobileNetV3's) -> global pool."""

    def __init__(self):
        super().__init__()
        from torchvision.ops import SqueezeExcitation

        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.se = SqueezeExcitation(8, 4, scale_activation=torch.nn.Hardsigmoid)

    def forward(self, x):
        return self.se(torch.relu(self.conv(x))).mean((2, 3))


@pytest.mark.parametrize("target", ["onnxruntime", "openvino"])
def test_hardsigmoid_gate_keeps_its_division_by_6_on_every_target(target):
    """Folded into its conv, the gate's /6 lives in the scale of the quantizer after it; OpenVINO leaves that
    output unquantized, so there the Hardsigmoid stays its own op. With float weights and every observer's
    quantizer off, the prepared model computes the float one (the gate's fixed grid aside)."""
    from pipeline.ptq.layers import float_mode

    torch.manual_seed(0)
    model = _Gated().eval()
    gm = quant.prepare_qat(model, quant.QuantSpec("uint8", ORT_BITS, 0.01, (), target=target), 16).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad(), float_mode(gm):
        want, got = model(x), gm(x)
    assert (got - want).abs().max() < 0.01 * want.abs().max(), (got / want).mean()


def test_openvino_target_quantizes_where_convs_and_adds_read():
    """qat.target=openvino: activations (Hardswish), SE gates and their pools stay float and unrewritten, an
    ActQuant sits where each conv and residual add reads, and OpenVINO runs every quantized layer in INT8;
    the ONNX Runtime placement of the same model keeps its INT8 activations."""
    from pipeline.models import build_model

    torch.manual_seed(0)
    model = build_model({"name": "mobilenet_v3_small", "num_classes": 10, "image_size": 32, "small_input": True})
    gms = {t: quant.prepare_qat(model.eval(), quant.QuantSpec("uint8", ORT_BITS, 0.01, (), target=t), 32)
           for t in ("onnxruntime", "openvino")}
    ov_gm, ort_gm = gms["openvino"], gms["onnxruntime"]
    qhs = [m for m in ort_gm.modules() if isinstance(m, quant.QHardSwish)]
    assert qhs and not any(isinstance(m, quant.QHardSwish) for m in ov_gm.modules())
    floats = quant.float_ops(ov_gm)
    assert {k.split(" (")[0] for k in floats} == {"Hardswish", "Hardsigmoid", "AdaptiveAvgPool2d", "mul"}, floats
    assert all("float in OpenVINO" in k for k in floats) and not quant.float_ops(ort_gm)
    assert len(quant.act_quants(ov_gm)) < len(quant.act_quants(ort_gm)) * 0.75
    quantized = (quant.ActQuant, quant.SharedQuant)
    readers = [n for n in ov_gm.graph.nodes if (n.op == "call_module" and isinstance(
        ov_gm.get_submodule(n.target), (quant.QConvBn, quant.QLinear))) or n.name.startswith("add")]
    assert sum(n.name.startswith("add") for n in readers) == 6
    for n in readers:
        src = _reads(ov_gm, n)
        assert src.op == "call_module" and isinstance(ov_gm.get_submodule(src.target), quantized), (n, src)
    x = torch.randn(8, 3, 32, 32)
    quant.calibrate(ov_gm, [(x, None)])
    with torch.no_grad():
        ref = ov_gm.eval()(x).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ov.onnx"
        onnxio.export_onnx(quant.to_deploy(ov_gm), x[:2], path, 18, quant.onnx_translations())
        ov = inference.get("openvino")
        cov = ov.kernel_coverage(path)
        assert cov["int8_kernels"] == len(quant.quantized_layers(ov_gm, calls=True)) and cov["coverage"] == 1.0, cov
        got = inference.predict(ov.session(path), x.numpy())
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max() + 1e-3


def test_missing_openvino_is_one_line_naming_the_extra(cfg_factory, tmp_path, monkeypatch):
    """Without the package (blocked in sys.modules): the config check fails before anything is trained, and
    predict on a bundle recorded for OpenVINO says in one line how to install it or run it on ONNX Runtime."""
    bundle = tmp_path / "deploy"
    bundle.mkdir()
    (bundle / "model.onnx").write_bytes(b"")  # never read: the runtime is missing first
    (bundle / "bundle.json").write_text(json.dumps({"recommended": "model.onnx", "models": {"model.onnx": {
        "runtime": {"name": "openvino", "options": {"INFERENCE_PRECISION_HINT": "bf16"}}}}}))
    (tmp_path / "a.png").write_bytes(b"")
    script = ("import sys; sys.modules['openvino'] = None; from pipeline.predict import main; "
              "sys.exit(main(sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", script, str(bundle), str(tmp_path / "a.png")], cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr[-2000:]
    assert out.stderr.startswith('error: the openvino runtime needs the OpenVINO package: pip install -e ".[openvino]"')
    assert out.stderr.strip().endswith("--runtime onnxruntime"), out.stderr

    monkeypatch.setitem(sys.modules, "openvino", None)
    monkeypatch.setattr(inference, "_INSTANCES", {})  # the runtime objects made before the block
    with pytest.raises(PipelineError, match=r'^config error: validate.runtimes: .*pip install -e "\.\[openvino\]"$'):
        run_pipeline(cfg_factory("validate.runtimes=[onnxruntime,openvino]"), tmp_path / "run")
    assert not (tmp_path / "outputs").exists()  # nothing trained


def test_layer_profile_shows_where_each_openvino_session_spends_its_time(tmp_path):
    """bench_runtimes --profile: OpenVINO's performance counters by layer type for each OpenVINO session (the ONNX
    Runtime one is skipped); a session compiled without the counters says how to turn them on."""
    from pipeline.tools.bench_runtimes import layer_profile

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    x = torch.randn(2, 3, 16, 16)
    path = tmp_path / "m.onnx"
    onnxio.export_onnx(model, x, path, 18)
    ov = inference.get("openvino")
    group = {"m ort": inference.get().session(path, 1), "m ov-f32": ov.session(path, 1)}
    table = layer_profile(group, x.numpy(), rounds=2, threads=1)
    lines = table.splitlines()
    assert lines[0] == "| layer type | m ov-f32 |", table
    conv = next(line for line in lines if line.startswith("| Convolution |"))
    assert float(conv.split("|")[2].split()[0]) > 0, table
    assert lines[-1].startswith("| **sum** |")
    with pytest.raises(PipelineError, match="PERF_COUNT"):
        group["m ov-f32"].layer_times(x.numpy(), runs=1)


def test_bench_runtimes_on_a_folder_without_report_is_one_line(tmp_path, monkeypatch):
    from pipeline.tools import bench_runtimes

    monkeypatch.setattr(sys, "argv", ["bench_runtimes", "--run", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        bench_runtimes.main()
    message = str(e.value.code)
    assert message.startswith(f"error: {tmp_path} has no report.json") and "\n" not in message, message


def test_layer_times_by_type_take_the_median_over_rounds_and_the_busiest_kernel():
    """A layer type that runs in some rounds only (a reorder) counts 0 in the others."""
    from pipeline.tools.bench_runtimes import _by_layer_type

    rounds = [{("Convolution", "amx_I8"): 3.0, ("Convolution", "dw_I8"): 1.0},
              {("Convolution", "amx_I8"): 5.0, ("Convolution", "dw_I8"): 1.0, ("Reorder", "jit_uni"): 0.3},
              {("Convolution", "amx_I8"): 4.0, ("Convolution", "dw_I8"): 2.0}]
    ms, kernel = _by_layer_type({"m ov-f32": rounds})
    assert ms["m ov-f32"] == {"Convolution": 6.0, "Reorder": 0.0}  # rounds of 4, 6 and 6 ms
    assert kernel["m ov-f32"] == {"Convolution": "amx_I8", "Reorder": "jit_uni"}


def test_bench_runtimes_scores_a_run_on_the_data_it_was_made_with(tmp_path):
    """--run: top-1 on the test split of the run's own data (its saved config), not on the embedded images."""
    import dataclasses

    from omegaconf import OmegaConf
    from PIL import Image

    from pipeline.tools import bench_runtimes, data_config

    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("test", 3)):
        for c in ("cat", "dog"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / c / f"{i}.png")
    data = {**dataclasses.asdict(data_config()), "source": "imagefolder",
            "root": str(tmp_path / "data"), "image_size": 8, "num_classes": 2, "retired_key": 1}
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save({"data": data, "paths": {"outputs": str(tmp_path / "o"), "cache": "${.outputs}/cache"}},
                   run / ".hydra/config.yaml")
    x, y = bench_runtimes._images(8, 10**6, "test", bench_runtimes._run_data(run))
    assert x.shape == (6, 3, 8, 8) and sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    assert (tmp_path / "o/cache").is_dir()  # decoded into the run's cache
    assert bench_runtimes._run_data(tmp_path) is None  # no saved config: the embedded images
    assert len(bench_runtimes._images(8, 10**6, "test", bench_runtimes._run_data(tmp_path))[1]) == 1500
