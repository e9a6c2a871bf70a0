"""The deployment bundle and `python -m pipeline.predict`: self-describing ONNX, the same predictions as
validate, embedded preprocessing, and bad input as one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import deploy, inference, onnxio
from pipeline.data import EMBEDDED, load_splits
from pipeline.models import build_model
from pipeline.predict import Predictor, main
from pipeline.runner import run_pipeline
from tests.conftest import tiny_weights

MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "model.onnx"
    model = build_model({"name": "resnet8", "num_classes": 10, "width": 0.5}).eval()
    onnxio.export_onnx(model, torch.randn(2, 3, 32, 32), path, 18)
    return path


def _test_jpegs(folder: Path, n: int = 20) -> list[Path]:
    """The first n embedded test images as the JPEG files they were shipped as."""
    folder.mkdir(parents=True, exist_ok=True)
    with np.load(EMBEDDED) as z:
        raw, off = z["test_jpeg"].tobytes(), z["test_offsets"]
    files = []
    for i in range(n):
        files.append(folder / f"{i:04d}.jpg")
        files[-1].write_bytes(raw[off[i] : off[i + 1]])
    return files


def test_embedded_preprocessing_equals_python_preprocessing(fp32_onnx, tmp_path):
    deploy.embed_preprocessing(fp32_onnx, tmp_path / "u8.onnx", MEAN, STD)
    pixels = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    x = onnxio.normalise(torch.from_numpy(pixels).permute(0, 3, 1, 2), MEAN, STD)
    ref = inference.predict(inference.get().session(fp32_onnx), x)
    got = inference.predict(inference.get().session(tmp_path / "u8.onnx"), pixels)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_predict_equals_validate_on_test_images(fp32_onnx, tmp_path):
    """Files -> PIL -> the model's metadata preprocessing gives exactly validate's inputs and top-1."""
    classes = [f"c{i}" for i in range(10)]
    deploy.write_metadata(fp32_onnx, tmp_path / "m.onnx", {deploy.META_CLASSES: classes, deploy.META_MEAN: MEAN,
                                                            deploy.META_STD: STD, deploy.META_SIZE: "32"})
    files = _test_jpegs(tmp_path / "imgs")
    pred = Predictor(tmp_path / "m.onnx")
    x = pred.to_input(np.stack([pred.load(f)[0] for f in files]))
    from pipeline.tools import data_config

    s = load_splits(data_config(), 0)
    ref_x = onnxio.normalise(s.test_x[: len(files)], MEAN, STD)
    np.testing.assert_array_equal(x, ref_x)  # bit for bit the tensor validate feeds ORT
    ref = inference.predict(inference.get().session(fp32_onnx), ref_x).argmax(1)
    top1 = [top[0][0] for top in pred.classify(x, k=3)]
    assert top1 == [classes[i] for i in ref]
    assert json.loads(deploy.read_metadata(tmp_path / "m.onnx")[deploy.META_CLASSES]) == classes


def test_predict_bad_input_is_one_line(fp32_onnx, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (tmp_path / "notes.txt").write_text("x")
    img = _test_jpegs(tmp_path / "imgs", 1)[0]
    cases = [
        ([str(tmp_path / "empty"), str(img)], "holds no model"),
        ([str(fp32_onnx), str(img)], "has no 'classes' in its metadata .*give --labels"),
        ([str(fp32_onnx), str(tmp_path / "broken.jpg"), "--labels", ",".join("abcdefghij"), "--mean", "0.5,0.5,0.5",
          "--std", "0.2,0.2,0.2"], "cannot read image .*broken.jpg"),
        ([str(fp32_onnx), str(tmp_path / "notes.txt"), "--labels", ",".join("abcdefghij"), "--mean", "0.5,0.5,0.5",
          "--std", "0.2,0.2,0.2"], "is not an image file"),
        ([str(fp32_onnx), str(img), "--labels", "a,b", "--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2"],
         "predicts 10 classes but 2 labels"),
    ]
    import re

    for argv, match in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and re.search(match, err), err


def test_predict_resizes_other_sizes_with_a_note(fp32_onnx, tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (90, 50), (10, 200, 30)).save(tmp_path / "wide.png")
    (tmp_path / "readme.txt").write_text("not an image")
    rc = main([str(fp32_onnx), str(tmp_path), "--labels", ",".join("abcdefghij"), "--mean", "0.5,0.5,0.5",
               "--std", "0.25,0.25,0.25", "--csv", str(tmp_path / "out.csv"), "--top-k", "2"])
    out = capsys.readouterr()
    assert rc == 0 and "resized from 90x50 to 32x32" in out.err and "skipped 1 files that are not images" in out.err
    rows = (tmp_path / "out.csv").read_text().splitlines()
    assert rows[0] == "file,class1,prob1,class2,prob2" and rows[1].startswith(str(tmp_path / "wide.png"))
    # several files at once (a shell glob): an unreadable one is skipped, not fatal
    Image.new("RGB", (32, 32)).save(tmp_path / "b.png")
    (tmp_path / "broken.jpg").write_bytes(b"no jpeg")
    rc = main([str(fp32_onnx), *(str(tmp_path / n) for n in ("wide.png", "broken.jpg", "b.png")), "--labels",
               ",".join("abcdefghij"), "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25"])
    out = capsys.readouterr()
    assert rc == 0 and [line.split(":")[0] for line in out.out.splitlines()] == [
        str(tmp_path / "wide.png"), str(tmp_path / "b.png")]
    assert "1 image could not be read and was skipped" in out.err


@pytest.mark.slow
def test_run_writes_a_bundle_that_predicts_like_validate(cfg_factory, tmp_path, capsys):
    run = tmp_path / "run"
    run_pipeline(cfg_factory("pipeline=[train,prune,export,validate]", "export.embed_preprocessing=true"), run)
    rep = json.loads((run / "report.json").read_text())
    bundle = json.loads((run / "deploy/bundle.json").read_text())
    meta = deploy.read_metadata(run / "deploy/model.onnx")
    assert rep["deploy"]["model"] == rep["best"] == bundle["models"]["model.onnx"]["row"]
    assert json.loads(meta[deploy.META_ROW])["name"] == rep["best"] and meta[deploy.META_LAYOUT] == deploy.LAYOUT_UINT8
    assert json.loads(meta[deploy.META_CLASSES])[0] == "airplane" and meta[deploy.META_SIZE] == "32"
    assert (run / "deploy/MODEL_CARD.md").is_file() and (run / "deploy/config.yaml").is_file()
    if rep["best"] != "baseline":
        assert deploy.read_metadata(run / "deploy/baseline.onnx")[deploy.META_PRECISION] == "fp32"
    assert {"batch", "concurrency"} <= set(rep["serving"]) and (run / "serving.png").is_file()
    assert rep["deploy"]["startup"]["seconds_optimized"] > 0 and (run / "deploy/model.optimized.onnx").is_file()
    files = _test_jpegs(tmp_path / "imgs", 150)
    pred = Predictor(run / "deploy")
    top1 = np.array([json.loads(meta[deploy.META_CLASSES]).index(t[0][0])
                     for t in pred.classify(pred.to_input(np.stack([pred.load(f)[0] for f in files])), 1)])
    from pipeline.tools import data_config

    y = load_splits(data_config(), 0).test_y[:150].numpy()
    row = next(r for r in rep["rows"] if r["name"] == rep["best"])
    exported = inference.get().session(run / row["onnx"])  # the float-input export validate measured
    s = load_splits(data_config(), 0)
    ref = inference.predict(exported, onnxio.normalise(s.test_x[:150], MEAN, STD)).argmax(1)
    assert (top1 == ref).all() and abs((top1 == y).mean() * 100 - (ref == y).mean() * 100) == 0


def test_serving_measurements_cover_every_setting(fp32_onnx):
    from pipeline import serving

    x = onnxio.normalise(torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8), MEAN, STD)
    sess = {"m": inference.get().session(fp32_onnx)}
    batch = serving.batch_sweep(sess, x, [1, 4], warmup=1, runs=2, rounds=2)
    assert set(batch["m"]) == {1, 4} and all(v["throughput_ips"] > 0 for v in batch["m"].values())
    conc = serving.concurrency(sess, x, [1, 3], requests=12, warmup=1, rounds=2)
    for mode in ("threads", "async"):
        for k in (1, 3):
            v = conc["m"][mode][k]
            assert 0 < v["latency_ms_p50"] <= v["latency_ms_p99"] and v["throughput_ips"] > 0
    rows = serving.settings_sweep(inference.get(), fp32_onnx, x, [1, 2], ["basic", "all"], ["CPUExecutionProvider"],
                                  4, 1, 2, 1)
    assert [(r["threads"], r["graph_optimization"]) for r in rows] == [(1, "basic"), (1, "all"), (2, "basic"),
                                                                        (2, "all")]


def test_one_thread_sessions_measure_concurrency_without_run_async(fp32_onnx):
    """ORT's run_async needs intra-op pool threads besides the caller's; with validate.threads=1 it raised
    (INVALID_ARGUMENT) at the end of validate. Such a session measures the thread-pool mode only."""
    from pipeline import serving

    x = onnxio.normalise(torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), MEAN, STD)
    one, two = inference.get().session(fp32_onnx, 1), inference.get().session(fp32_onnx, 2)
    assert not one.supports_async and two.supports_async
    conc = serving.concurrency({"m": one}, x, [2], requests=4, warmup=1, rounds=1)
    assert list(conc["m"]) == ["threads"] and conc["m"]["threads"][2]["throughput_ips"] > 0


def test_no_bundle_when_deploy_is_off(cfg_factory, tmp_path):
    run = tmp_path / "run"
    run_pipeline(cfg_factory("pipeline=[train,export,validate]", "train.epochs=0", tiny_weights(tmp_path),
                             "validate.deploy=false",
                             "validate.serving_batch_sizes=[]", "validate.concurrency=[]"), run)
    rep = json.loads((run / "report.json").read_text())
    assert not (run / "deploy").exists() and "deploy" not in rep and rep["serving"] == {}


def test_predict_equals_validate_for_photos_resized_by_the_shorter_side(fp32_onnx, tmp_path):
    """data.resize=shorter (ImageNet-style): the bundle says so and the predictor crops like the store."""
    from pipeline.tools import data_config

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, (w, h) in enumerate([(50, 37), (41, 77)]):
            d = tmp_path / "photos" / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (h + i, w, 3), dtype=np.uint8)).save(d / f"{i}.png")
    dc = data_config("data=photos", f"data.root={tmp_path / 'photos'}", "data.image_size=32", "data.num_classes=2",
                     "data.val_fraction=0", "data.crop_fraction=0.8", f"data.mean={MEAN}", f"data.std={STD}")
    s = load_splits(dc, 0, tmp_path / "cache")
    assert s.test_x.shape[1:] == (3, 32, 32) and s.test_x.full([0]).shape[-1] == 40  # stored 40, evaluated 32
    deploy.write_metadata(fp32_onnx, tmp_path / "m.onnx", {
        deploy.META_CLASSES: [f"c{i}" for i in range(10)], deploy.META_MEAN: MEAN, deploy.META_STD: STD,
        deploy.META_SIZE: "32", deploy.META_RESIZE: {"mode": "shorter", "crop_fraction": 0.8}})
    pred = Predictor(tmp_path / "m.onnx")
    files = sorted((tmp_path / "photos" / "test").rglob("*.png"))
    x = pred.to_input(np.stack([pred.load(f)[0] for f in files]))
    np.testing.assert_array_equal(x, onnxio.normalise(s.test_x[:], MEAN, STD))
    assert "center-cropped from 50x37 to 32x32" in pred.load(files[0])[1]
