"""Bad input, second round: one line and a non-zero exit, checked before anything is built where it can be;
nothing run that the user did not name (a saved config's ``hydra:`` section), nothing filled that does not
fit (the decoded-image cache), nothing silently wrong (random-init baselines, clipped 16-bit images, stale
artifacts of replaced images)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import data as data_mod
from pipeline.data import DataConfig, check_size, fingerprint, load_splits
from pipeline.errors import PipelineError
from pipeline.runner import Runner, run_pipeline
from tests.conftest import tiny_weights

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("cat", "dog")


def _cli(*args: str, cwd: Path, module: str = "pipeline", timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _one_line_error(out: subprocess.CompletedProcess, match: str) -> str:
    """The command failed with exit 2 and one ``error:`` line matching ``match``, without a traceback."""
    err = out.stderr.strip()
    assert out.returncode == 2, (out.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and re.search(match, lines[0]), err[-3000:]
    return lines[0]


def _folder(root: Path, per_class: int = 3, size: int = 8, suffix: str = ".png") -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}{suffix}")
    return root


def _data_cfg(**kw) -> DataConfig:
    base = dict(source="imagefolder", root=None, download=False, image_size=8, num_classes=2, val_fraction=0.0,
                mean=[0.5] * 3, std=[0.25] * 3, augment=False, crop_padding=0, train_subset=None, resize="squash",
                crop_fraction=0.875, train_crop="pad", rrc_scale=[0.08, 1.0], cutout=0, decode_workers=1,
                max_cache_gb=100.0, fingerprint="stat")
    base.update(kw)
    return DataConfig(**base)


# ---------------------------------------------------------------- config values: one line, before anything runs


@pytest.mark.parametrize("overrides,message", [
    (["seed=-1"], "config error: seed: -1 must be in [0, 4294967295]"),  # 3.
    (["seed=99999999999"], "config error: seed: 99999999999 must be in [0, 4294967295]"),
    (["distill.seed=-1"], "config error: distill.seed: -1 must be in [0, 4294967295]"),
    (["pipeline=[train]", "train.epochs=0"],  # 7.
     "config error: train.epochs=0 keeps the starting weights as the baseline, but model.weights is not set (the "
     "baseline would be a randomly initialised model); give model.weights=<file or weights name>, or train with "
     "train.epochs=<N >= 1>"),
    (["+sed=3"], "config error: sed: unknown key; did you mean seed?"),  # 8.
    (["+train.lrr=0.1"], "config error: train.lrr: unknown key; did you mean train.lr?"),
    (["validate.models=[foo]"],  # 14.
     "config error: validate.models: no report row named 'foo' in this pipeline; rows are baseline, prune, distill, "
     "qat-int8, ort-static-int8"),
    (["qat.target=openvino"], "config error: qat.target=openvino places the INT8 model for openvino, which "
                              "validate.runtimes=['onnxruntime'] does not measure; add it: validate.runtimes="
                              "[onnxruntime,openvino]"),
    (["data.image_size=20000"], "config error: data.image_size: 20000 must be in [8, 4096] pixels"),  # 2.
    (["data.max_cache_gb=0"], "config error: data.max_cache_gb: 0.0 must be > 0 (or null: no limit)"),
    (["data.fingerprint=md5"], "config error: data.fingerprint: got 'md5', expected 'stat' | 'content'; fix it with "
                               "data.fingerprint=<value>"),
])
def test_bad_values_are_one_line_config_errors(cfg_factory, tmp_path, overrides, message):
    with pytest.raises(PipelineError) as e:
        Runner(cfg_factory(*overrides), tmp_path)
    assert str(e.value) == message


@pytest.mark.parametrize("overrides,match", [
    (["validate.provider=cuda"], r"^config error: validate.provider=cuda but (onnxruntime has no CUDAExecutionProvider "
                                 r".*install onnxruntime-gpu|no CUDA GPU is visible).*validate.provider=cpu"),
    (["validate.provider=tensorrt"], r"^config error: validate.provider=tensorrt but (onnxruntime has no "
                                     r"TensorrtExecutionProvider|no CUDA GPU is visible)"),
    (["validate.runtimes=[openvino]"], r"^config error: validate.runtimes=\['openvino'\]: list onnxruntime first"),
])
def test_runtimes_and_gpu_providers_that_cannot_be_had_are_one_line(cfg_factory, tmp_path, overrides, match):
    """ONNX Runtime's GPU providers without onnxruntime-gpu or a GPU, and a runtime list without the baseline's
    runtime first: one line at the config check (this machine has no GPU; with both, cuda would be accepted)."""
    import onnxruntime
    import torch

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers() and torch.cuda.is_available():
        pytest.skip("onnxruntime-gpu and a GPU are present")
    with pytest.raises(PipelineError, match=match) as e:
        Runner(cfg_factory("pipeline=[train,export,validate]", *overrides), tmp_path)
    assert "\n" not in str(e.value)


def test_validate_rows_named_up_front_match_the_rows_it_reports(cfg_factory, tmp_path):
    from stages.validate import expected_rows

    r = Runner(cfg_factory("export.fp16=[train,distill]", "export.ort_static_reference=true"), tmp_path)
    assert expected_rows(r.view) == ["baseline", "prune", "distill", "qat-int8", "ort-static-int8", "baseline-fp16",
                                     "distill-fp16"]
    Runner(cfg_factory("export.fp16=[train]", "validate.models=[baseline-fp16,qat-int8]"), tmp_path)


def test_epochs_0_with_weights_is_accepted(cfg_factory, tmp_path):
    Runner(cfg_factory("pipeline=[train]", "train.epochs=0", tiny_weights(tmp_path)), tmp_path)


# ---------------------------------------------------------------- the command line (18., 6., 16.)


@pytest.mark.parametrize("args,match", [
    (["prune.ratoi=0.5"], r"^error: prune\.ratoi: no such key; did you mean prune\.ratio\?$"),  # 18.
    (["prnue.ratio=0.5"], r"^error: prnue\.ratio: no such key; did you mean prune\.ratio\?$"),
    (["hydra.run.dirr=x"], r"^error: hydra\.run\.dirr: no such key; did you mean hydra\.run\.dir\?$"),
    (["model=resnet999"], r"^error: model=resnet999: no such option; choose one of custom, mobilenet_v2, resnet18"),
    (["-m", "prune.ratio="],  # 6.: under -m too, and with no traceback
     r"^error: config error: prune\.ratio: got '', expected float; fix it with prune\.ratio=<value>$"),
    (["-m", "prune.ratio=0.3,1.5"],  # every point is checked before job 0 trains
     r"^error: sweep job 1 \(prune\.ratio=1\.5\): config error: prune\.ratio: 1\.5 must be in \[0, 1\)"),
    (["-m", "prune.ratoi=0.3,0.5"], r"^error: prune\.ratoi: no such key; did you mean prune\.ratio\?$"),
    (["-m", "seed=1,-1"], r"^error: sweep job 1 \(seed=-1\): config error: seed: -1 must be in"),
])
def test_command_line_mistakes_are_one_line_before_anything_runs(tmp_path, args, match):
    out = _cli(*args, "experiment=tiny", f"paths.outputs={tmp_path}/o", f"hydra.sweep.dir={tmp_path}/sweep",
               cwd=tmp_path)
    _one_line_error(out, match)
    assert not (tmp_path / "o").exists() and not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_a_sweep_with_a_failing_job_runs_the_others_writes_the_summary_and_exits_2(tmp_path):
    out = _cli("-m", "experiment=tiny", "pipeline=[train,export,validate]", "validate.deploy=false",
               "validate.serving_batch_sizes=[]", "validate.concurrency=[]", "train.lr=0.1,1e30",
               f"paths.outputs={tmp_path}/o", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    line = _one_line_error(out, r"^error: sweep job 1_.*train\.lr=1e\+30.* failed: train: loss became nan")
    assert "sweep summary:" in out.stdout, line
    summary = json.loads((tmp_path / "sweep/summary.json").read_text())
    assert [j["job"][0] for j in summary["jobs"]] == ["0"] and [f["job"][0] for f in summary["failed"]] == ["1"]
    assert "Failed jobs (1)" in (tmp_path / "sweep/summary.md").read_text()


@pytest.mark.heavy  # the default run checks the message in test_tracking (a search stopped on a bad space)
def test_the_empty_search_space_suggests_an_override_hydra_accepts(tmp_path):  # 16.
    base = ["-m", "experiment=tiny", f"paths.outputs={tmp_path}/o", f"hydra.sweep.dir={tmp_path}/sweep", "search=base"]
    line = _one_line_error(_cli(*base, cwd=tmp_path), "the search space is empty")
    suggested = shlex.split(line.split("add e.g. ", 1)[1])  # as a shell passes it
    assert len(suggested) == 1
    # run it as given: one trial, pruned by the probe before training (min_speedup out of reach)
    out = _cli(*base, *suggested, "hydra.sweeper.n_trials=1", "search.min_speedup=1000", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    trials = json.loads((tmp_path / "sweep/search.json").read_text())["trials"]
    assert [t["overrides"][0].split("=")[0] for t in trials] == ["prune.ratio"]


# ---------------------------------------------------------------- 1./11. saved configs are data; reports are kept


def _saved(tmp_path: Path, text: str) -> Path:
    folder = tmp_path / "saved"
    folder.mkdir(exist_ok=True)
    (folder / "config.yaml").write_text(text)
    return folder


@pytest.mark.parametrize("extra,named", [
    ("hydra:\n  callbacks:\n    x:\n      _target_: builtins.open\n      _args_: [{marker}, w]\n", r"hydra\.callbacks"),
    ("hydra:\n  job_logging:\n    handlers: {{}}\n", r"hydra\.job_logging"),
    ("defaults:\n  - override hydra/launcher: basic\n", "a defaults list"),
])
def test_a_saved_config_may_not_configure_hydra(tmp_path, extra, named):
    marker = tmp_path / "written-by-a-callback"
    folder = _saved(tmp_path, "seed: 0\n" + extra.format(marker=marker))
    for mode in ([], ["-m"]):
        out = _cli(*mode, "--config-path", str(folder), "--config-name", "config", cwd=tmp_path)
        line = _one_line_error(out, named + ".*data and may not configure Hydra")
        assert str(folder / "config.yaml") in line
    assert not marker.exists()
    header = _saved(tmp_path, "# @package hydra\ncallbacks: {}\n")
    _one_line_error(_cli("--config-path", str(header), "--config-name", "config", cwd=tmp_path), "@package hydra")


@pytest.mark.slow
def test_the_model_cards_command_reproduces_into_a_new_folder_each_time(tmp_path):
    run = tmp_path / "run"
    common = ["experiment=tiny", "pipeline=[train,export,validate]", "train.epochs=0", tiny_weights(tmp_path),
              "validate.serving_batch_sizes=[]", "validate.concurrency=[]", "validate.deploy_optimized=false",
              f"paths.outputs={tmp_path}/o"]
    assert _cli(*common, f"hydra.run.dir={run}", cwd=tmp_path).returncode == 0
    card = (run / "deploy/MODEL_CARD.md").read_text()
    command = next(ln for ln in card.splitlines() if ln.startswith("python -m pipeline --config-path"))
    args = shlex.split(command)[3:]
    for folder in (Path(f"{run}_reproduced"), Path(f"{run}_reproduced_2")):
        out = _cli(*args, cwd=tmp_path)
        assert out.returncode == 0 and f"{folder.name}/report.md" in out.stdout, out.stderr[-2000:]
        assert (folder / "report.json").is_file()
    # the same fixed folder twice: refused before anything runs, the first report kept
    before = (run / "report.json").read_bytes()
    out = _cli(*common, f"hydra.run.dir={run}", cwd=tmp_path)
    _one_line_error(out, r"the run folder .*run already holds report\.json of an earlier run; give a new one with "
                         r"hydra\.run\.dir=<new folder>")
    assert (run / "report.json").read_bytes() == before
    # a bundle whose config was given a hydra: section runs nothing of it
    marker = tmp_path / "opened"
    with open(run / "deploy/config.yaml", "a") as f:
        f.write(f"hydra:\n  callbacks:\n    x:\n      _target_: builtins.open\n      _args_: [{marker}, w]\n")
    _one_line_error(_cli(*args, cwd=tmp_path), r"has a hydra: section \(hydra\.callbacks\)")
    assert not marker.exists()


# ---------------------------------------------------------------- 2. the decoded data must fit


def test_the_cache_size_is_checked_before_decoding(tmp_path, monkeypatch):
    cfg = _data_cfg(root=str(_folder(tmp_path / "d")), image_size=64)  # 12 images x 64 x 64 x 3 = 147 kB
    with pytest.raises(PipelineError) as e:
        load_splits(_data_cfg(root=cfg.root, image_size=64, max_cache_gb=0.0001), 0, tmp_path / "cache")
    assert str(e.value) == ("data: 12 images decoded at 64x64 need 0.1 MB of cache, more than "
                            "data.max_cache_gb=0.0001; lower data.image_size or raise data.max_cache_gb")
    assert not (tmp_path / "cache").exists()  # nothing decoded, nothing written

    class Disk:
        free = 1000

    monkeypatch.setattr(data_mod.shutil, "disk_usage", lambda p: Disk)
    with pytest.raises(PipelineError, match=r"need 0\.1 MB of cache, but .* has 0\.0 MB free; lower data\.image_size, "
                                            r"free space or move paths\.cache elsewhere$"):
        check_size(cfg, tmp_path / "cache")
    monkeypatch.undo()
    load_splits(cfg, 0, tmp_path / "cache")  # fits: decoded once
    monkeypatch.setattr(data_mod.shutil, "disk_usage", lambda p: Disk)
    check_size(cfg, tmp_path / "cache")  # the store is there: nothing to check


def test_embedded_data_upscaled_beyond_memory_is_one_line(cfg_factory, tmp_path, monkeypatch):
    """Checked with the config, before the stage checks build (and trace) the model at that size."""
    monkeypatch.setattr(data_mod, "available_memory", lambda: 10**9)
    with pytest.raises(PipelineError) as e:
        Runner(cfg_factory("data.image_size=4096", "data.max_cache_gb=null"), tmp_path)
    assert str(e.value) == ("config error: data: 8000 images decoded at 4096x4096 need 402.7 GB of memory, but this "
                            "machine has 1.0 GB of memory available; lower data.image_size")
    with pytest.raises(PipelineError, match=r"need 402\.7 GB of memory, more than data\.max_cache_gb=100; lower "
                                            r"data\.image_size or raise data\.max_cache_gb$"):
        Runner(cfg_factory("data.image_size=4096"), tmp_path)
    assert not (tmp_path / "outputs/artifacts/train").exists()


_DECODE_SLOWLY = """
import signal, sys, time
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as in a terminal (a parent may ignore SIGINT)
from pipeline import imagestore
read = imagestore.read_rgb
def slow(*a, **k):
    time.sleep(0.05)
    return read(*a, **k)
imagestore.read_rgb = slow
files = sorted(Path(sys.argv[1]).rglob("*.png")) * 400  # minutes: the signal always comes mid-decode
imagestore.build(Path(sys.argv[2]) / "store", files, {}, 8, "squash", 0.875, int(sys.argv[3]), chunk=8)
"""


@pytest.mark.parametrize("sig,workers", [(signal.SIGTERM, 2), (signal.SIGINT, 1)])
def test_a_stopped_decode_removes_its_partial_store(tmp_path, sig, workers):
    _folder(tmp_path / "d")
    (tmp_path / "cache").mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-c", _DECODE_SLOWLY, str(tmp_path / "d"), str(tmp_path / "cache"),
                          str(workers)], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((tmp_path / "cache").glob("store.partial-*")) and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, "the decode ended before it could be stopped"
    time.sleep(0.5)  # decoding
    p.send_signal(sig)
    err = p.communicate(timeout=60)[1]
    assert p.returncode != 0 and not list((tmp_path / "cache").iterdir()), err[-2000:]


# ---------------------------------------------------------------- 4. 17. bad files and folders


def test_a_truncated_safetensors_file_is_one_line(cfg_factory, tmp_path):
    from safetensors.torch import save_file

    from pipeline.models import build_model

    save_file(build_model({"name": "resnet8", "num_classes": 10, "width": 0.5}).state_dict(), str(tmp_path / "w.sf"))
    data = (tmp_path / "w.sf").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[:100])
    with pytest.raises(PipelineError) as e:
        Runner(cfg_factory(f"model.weights={tmp_path}/w.safetensors"), tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and re.fullmatch(
        r"config error: model\.weights=.*w\.safetensors cannot be read as safetensors \(SafetensorError: .*\); give a "
        r"complete \.safetensors file", msg), msg


def test_data_root_that_is_a_file_says_so(cfg_factory, tmp_path):
    (tmp_path / "data.zip").write_bytes(b"PK")
    r = Runner(cfg_factory("data=imagefolder", f"data.root={tmp_path}/data.zip"), tmp_path)
    with pytest.raises(PipelineError) as e:
        r.run()
    assert str(e.value) == (f"data.root={tmp_path}/data.zip is a file, not a folder; point it at the folder that "
                            "holds train/ and test/")


# ---------------------------------------------------------------- 9. 16-bit images


def test_16_bit_gray_images_are_scaled_not_clipped(tmp_path):
    from pipeline.imagestore import read_rgb

    rng = np.random.default_rng(0)
    wide = (rng.integers(0, 65536, (16, 16)) // 257 * 257).astype(np.uint16)  # exact 8-bit values, 16-bit file
    Image.fromarray(wide).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    got = read_rgb(tmp_path / "g16.png", 16, "squash", 0.875)
    np.testing.assert_array_equal(got, np.broadcast_to((wide // 257).astype(np.uint8), (3, 16, 16)))
    mid = np.full((16, 16), 124 * 257, np.uint16)  # mean 124/255, which RGB conversion turned into 255
    Image.fromarray(mid).save(tmp_path / "mid.png")
    assert read_rgb(tmp_path / "mid.png", 16, "squash", 0.875).mean() == 124


def test_16_bit_images_train_and_predict_alike(tmp_path):
    from pipeline.imagestore import to_rgb
    from pipeline.predict import Predictor

    root = _folder(tmp_path / "d", per_class=2, size=16)
    mid = np.full((16, 16), 124 * 257, np.uint16)
    Image.fromarray(mid).save(root / "test/cat/16bit.png")
    s = load_splits(_data_cfg(root=str(root), image_size=16), 0, tmp_path / "cache")
    files = sorted((root / "test").rglob("*.png"))
    row = files.index(root / "test/cat/16bit.png")
    assert float(s.test_x[row].float().mean()) == 124.0
    with Image.open(root / "test/cat/16bit.png") as im:
        assert np.asarray(to_rgb(im)).mean() == 124
    pred = Predictor.__new__(Predictor)  # only the loader: no model needed
    pred.size, pred.resize, pred.crop_fraction = 16, "squash", 1.0
    assert pred.load(root / "test/cat/16bit.png")[0].mean() == 124


# ---------------------------------------------------------------- 10. content fingerprints


def test_content_fingerprint_sees_a_replaced_image_with_the_same_size_and_mtime(tmp_path, monkeypatch):
    root = _folder(tmp_path / "d", suffix=".ppm")  # PPM: every 8x8 image has the same file size
    stat_cfg, content_cfg = _data_cfg(root=str(root)), _data_cfg(root=str(root), fingerprint="content")
    cache = tmp_path / "cache"
    before = (fingerprint(stat_cfg), fingerprint(content_cfg, cache))
    reads = []
    real = data_mod.file_sha256
    monkeypatch.setattr(data_mod, "file_sha256", lambda p, n=16: reads.append(p) or real(p, n))
    data_mod._FILE_HASHES.clear()  # as in a new process: the hashes come from the cache file
    assert fingerprint(content_cfg, cache) == before[1] and reads == []  # unchanged files are not read again
    img = root / "train/cat/0.ppm"
    st = img.stat()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(img)  # another image, same size
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))  # touch -r: the old mtime
    assert img.stat().st_size == st.st_size and img.stat().st_mtime_ns == st.st_mtime_ns
    assert fingerprint(stat_cfg) == before[0]  # what the default does not see
    assert fingerprint(content_cfg, cache) != before[1] and reads == [img]  # only the changed file is read again


def test_content_fingerprint_keys_artifacts(cfg_factory, tmp_path):
    _folder(tmp_path / "d")
    over = ("data=imagefolder", f"data.root={tmp_path}/d", "data.num_classes=2", "data.image_size=8")
    stat_key = Runner(cfg_factory(*over), tmp_path).key("train")
    r = Runner(cfg_factory(*over, "data.fingerprint=content"), tmp_path)
    assert r.key("train") != stat_key and r.data_fingerprint().startswith("c")


# ---------------------------------------------------------------- 5. 12. 13. predict


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory) -> Path:
    from pipeline import deploy, onnxio
    from pipeline.models import build_model

    folder = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(0)
    model = build_model({"name": "resnet8", "num_classes": 3, "width": 0.5}).eval()
    onnxio.export_onnx(model, torch.randn(2, 3, 32, 32), folder / "plain.onnx", 18)
    deploy.write_metadata(folder / "plain.onnx", folder / "model.onnx", {
        deploy.META_CLASSES: ["a", "b", "c"], deploy.META_MEAN: [0.5] * 3, deploy.META_STD: [0.25] * 3,
        deploy.META_SIZE: "32"})
    (folder / "plain.onnx").unlink()
    (folder / "bundle.json").write_text(json.dumps({"recommended": "model.onnx"}))
    Image.new("RGB", (32, 32), (90, 20, 200)).save(folder.parent / "img.png")
    return folder


def test_predict_checks_the_csv_folder_before_predicting(three_classes, tmp_path, capsys):
    from pipeline.predict import main

    img = three_classes.parent / "img.png"
    assert main([str(three_classes), str(img), "--csv", str(tmp_path / "missing/out.csv")]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.strip() == (f"error: --csv {tmp_path}/missing/out.csv: the folder "
                                                 f"{tmp_path}/missing does not exist; create it or give a file in an "
                                                 "existing folder")
    assert main([str(three_classes), str(img), "--csv", str(tmp_path)]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err


def test_top_k_beyond_the_classes_is_clamped_with_a_note(three_classes, tmp_path, capsys):
    from pipeline.predict import main

    assert main([str(three_classes), str(three_classes.parent / "img.png"), "--top-k", "5", "--csv",
                 str(tmp_path / "out.csv")]) == 0
    err = capsys.readouterr().err
    assert "note: --top-k 5 is more than the model's 3 classes; showing 3" in err
    header, row = (tmp_path / "out.csv").read_text().splitlines()
    assert header == "file,class1,prob1,class2,prob2,class3,prob3" and len(row.split(",")) == 7


@pytest.mark.parametrize("recommended", ["../elsewhere.onnx", "/etc/passwd", "link.onnx"])
def test_a_bundle_may_only_recommend_a_model_inside_it(three_classes, tmp_path, recommended):
    import shutil

    from pipeline.deploy import resolve_model

    bundle = tmp_path / "bundle"
    shutil.copytree(three_classes, bundle)
    (bundle / "link.onnx").symlink_to(three_classes / "model.onnx")
    (bundle / "bundle.json").write_text(json.dumps({"recommended": recommended}))
    with pytest.raises(PipelineError) as e:
        resolve_model(bundle)
    assert str(e.value) == (f"{bundle}/bundle.json recommends {recommended!r}, which lies outside the bundle folder; "
                            "a bundle's models lie inside it: write the bundle again with python -m pipeline "
                            "stage=validate, or give the .onnx file itself")
    (bundle / "bundle.json").write_text(json.dumps({"recommended": "model.onnx"}))
    assert resolve_model(bundle) == bundle / "model.onnx"


# ---------------------------------------------------------------- 19. damaged artifacts: said once, and why


def test_a_damaged_or_unlisted_artifact_is_reported_once(cfg_factory, tmp_path, caplog):
    over = ("stage=train", "train.epochs=0", tiny_weights(tmp_path))
    art = run_pipeline(cfg_factory(*over), tmp_path / "r1")["train"].path
    (art / "metrics.json").write_text("{}")
    caplog.set_level("WARNING")
    run_pipeline(cfg_factory(*over), tmp_path / "r2")
    assert caplog.text.count("is damaged") == 1, caplog.text
    caplog.clear()
    (art / "manifest.json").unlink()
    run_pipeline(cfg_factory(*over), tmp_path / "r3")
    assert caplog.text.count(f"the artifact in {art} has no manifest.json (deleted?); building it again") == 1
    assert (art / "manifest.json").is_file()
