"""OpenVINO beside ONNX Runtime: the runtime (f32, bf16, INT8 coverage), its report rows, the bundle and
``pipeline.predict`` on it, and the one-line error when the optional package is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import deploy, inference, onnxio
from pipeline.errors import PipelineError
from pipeline.inference import ort_quantize
from pipeline.predict import Predictor, main
from pipeline.report import build_report, int8_markdown
from pipeline.runner import run_pipeline
from stages.validate import runtime_rows
from tests.conftest import tiny_weights
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
    run_pipeline(cfg_factory("pipeline=[train,export,validate]", "train.epochs=0", tiny_weights(tmp_path),
                             "validate.runtimes=[onnxruntime,openvino]", "validate.serving_batch_sizes=[2]",
                             "validate.concurrency=[]", "validate.deploy_optimized=false"), run)
    rep = json.loads((run / "report.json").read_text())
    rows = {r["name"]: r for r in rep["rows"]}
    ov = inference.get("openvino")
    bf16 = "bf16" in ov.float_precisions()  # AVX512_BF16 / AMX
    assert set(rows) == {"baseline", "baseline@openvino"} | ({"baseline@openvino-bf16"} if bf16 else set())
    assert [r["runtime"] for r in rep["rows"]].count("openvino") == len(rows) - 1
    f32 = rows["baseline@openvino"]
    assert f32["precision"] == "fp32" and f32["agreement_vs_onnxruntime"] == 100.0 and f32["throughput_ips"] > 0
    assert f32["accuracy"] == rows["baseline"]["accuracy"] and set(rep["serving"]["batch"]) == set(rows)
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
