"""The stage graph end to end on the tiny preset: caching, upstream handling, report schema, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from pipeline.runner import Runner, run_pipeline
from tests.conftest import tiny_weights

ROOT = Path(__file__).resolve().parent.parent
ROW_KEYS = {"name", "stage", "precision", "accuracy", "params", "macs", "size_mb", "latency_ms_p50",
            "latency_ms_p99", "throughput_ips", "batch_size", "speedup_vs_baseline",
            "accuracy_delta_vs_baseline", "onnx"}


def test_keys_follow_the_config_that_matters(cfg_factory, tmp_path):
    a = Runner(cfg_factory(), tmp_path)
    b = Runner(cfg_factory("train.lr=0.05"), tmp_path)
    c = Runner(cfg_factory("validate.rounds=2", "export.parity_images=32"), tmp_path)
    assert a.key("train") != b.key("train") and a.key("export/train") != b.key("export/train")
    assert a.key("train") == c.key("train") and a.key("export/train") != c.key("export/train")


def test_missing_upstream_without_run_upstream_names_the_command(cfg_factory, tmp_path):
    cfg = cfg_factory("stage=export", "run_upstream=false")
    with pytest.raises(PipelineError, match=r"python -m pipeline stage=train"):
        run_pipeline(cfg, tmp_path / "run")


@pytest.mark.slow
def test_tiny_pipeline_report_and_reuse(cfg_factory, tmp_path):
    cfg = cfg_factory()
    done = run_pipeline(cfg, tmp_path / "run1")
    rep = json.loads((tmp_path / "run1/report.json").read_text())
    assert rep["baseline"] == "baseline" and {"versions", "cpu", "threads"} <= set(rep["environment"])
    for row in rep["rows"]:
        assert set(row) >= ROW_KEYS, ROW_KEYS - set(row)
        assert (tmp_path / "run1" / row["onnx"]).is_file()
    assert (tmp_path / "run1/report.md").read_text().count("| baseline | onnxruntime | fp32 |") == 1
    inputs = {p["name"]: p["fp32_input"] for p in rep["int8_vs_fp32_input"]}
    assert inputs == {"qat-int8": "distill", "ort-static-int8": "distill"}
    assert "INT8 against its FP32 input" in (tmp_path / "run1/report.md").read_text()
    assert (tmp_path / "run1/report.png").stat().st_size > 1000
    train_dir = done["train"].path
    assert {"model.pt", "metrics.json", "config.yaml", "manifest.json"} <= {p.name for p in train_dir.iterdir()}
    mtime = (train_dir / "model.pt").stat().st_mtime_ns
    done2 = run_pipeline(cfg_factory("stage=train"), tmp_path / "run2")
    assert done2["train"].path == train_dir and (train_dir / "model.pt").stat().st_mtime_ns == mtime
    done3 = run_pipeline(cfg_factory("stage=train", "force=stage"), tmp_path / "run3")
    assert (done3["train"].path / "model.pt").stat().st_mtime_ns != mtime
    # a gate is not part of the key: every export is reused and checked against the new gate
    onnx = {n: (a.path / "model.onnx").stat().st_mtime_ns for n, a in done.items() if n.startswith("export/")}
    done5 = run_pipeline(cfg_factory("stage=export", "export.min_top1_agreement=50"), tmp_path / "run5")
    assert {n: (a.path / "model.onnx").stat().st_mtime_ns for n, a in done5.items() if n in onnx} == onnx
    worst = min((a.metrics["parity"]["top1_agreement"], n) for n, a in done5.items() if n in onnx and "static" not in n)
    if worst[0] < 100:  # a stricter gate fails on the reused artifact, which is kept
        with pytest.raises(PipelineError, match=rf"{worst[1]}: ONNX Runtime agrees .*artifact kept"):
            run_pipeline(cfg_factory("stage=export", f"export.min_top1_agreement={worst[0] + 0.01}"), tmp_path / "r6")
    # a failing gate: one-line error after the report is written
    with pytest.raises(PipelineError, match=r"gate failed: .* is \d+\.\d+x the baseline \(validate.min_speedup=100"):
        run_pipeline(cfg_factory("stage=validate", "validate.min_speedup=100"), tmp_path / "run4")
    gated = json.loads((tmp_path / "run4/report.json").read_text())
    assert gated["gates"]["failures"] and gated["best"] == "baseline"


def _fp16_row(run: Path) -> None:
    """The FP16 export of the baseline: a report row, float32 in and out, FP16 weights."""
    import onnx

    rows = {r["name"]: r for r in json.loads((run / "report.json").read_text())["rows"]}
    fp16, fp32 = rows["baseline-fp16"], rows["baseline"]
    assert fp16["precision"] == "fp16" and fp16["parity_top1_agreement"] >= 99
    assert abs(fp16["accuracy"] - fp32["accuracy"]) <= 1 and fp16["size_mb"] < 0.6 * fp32["size_mb"]
    graph = onnx.load(run / fp16["onnx"]).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 in and out
    types = {t.data_type for t in graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types and onnx.TensorProto.FLOAT not in types  # weights in FP16


@pytest.mark.slow
def test_mixed_precision_qat_reloads_and_reports_its_int8_share_beside_an_fp16_row(cfg_factory, tmp_path):
    done = run_pipeline(cfg_factory("pipeline=[train,qat,export,validate]", "qat.source=train",
                                    "qat.float_layers=[conv1,layer1,measure]", "export.fp16=[train]",
                                    "validate.serving_batch_sizes=[]", "validate.concurrency=[]",
                                    "validate.deploy_optimized=false"), tmp_path / "run")
    _fp16_row(tmp_path / "run")
    placed = done["qat"].metrics["placement"]  # measured on top of the named layers: timings of every candidate
    assert done["qat"].metrics["quant"]["float_layers"] == ["conv1", "layer1", *placed["float_layers"]]
    assert placed["candidates"][0]["float_blocks"] == 0 and all(c["ms"] > 0 for c in placed["candidates"])
    md = (tmp_path / "run/report.md").read_text()
    assert f"- qat-int8: {placed['summary']}" in md
    bits = done["qat"].metrics["quant"]["weight_bits"]  # qat.weight_bits=auto: which and why, in the report
    assert f"INT8 weights: qat-int8 {bits}-bit ({done['qat'].metrics['weight_bits_reason']})." in md
    cov = done["export/qat"].metrics["int8_coverage"]  # export rebuilt the QAT model from its checkpoint
    assert 0 < cov["int8_kernels"] == cov["quantized_layers"] < cov["int8_kernels"] + cov["float_kernels"]
    rows = {r["name"]: r for r in json.loads((tmp_path / "run/report.json").read_text())["rows"]}
    assert rows["qat-int8"]["int8_kernels"] == f"{cov['int8_kernels']}/{cov['int8_kernels'] + cov['float_kernels']}"
    assert rows["qat-int8"]["parity_top1_agreement"] >= 90


def _cli(*args, cwd: Path, check=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600, check=check)


@pytest.mark.heavy  # the default run reproduces from a saved config in the model-card test (test_bad_inputs)
def test_cli_run_and_reproduce_from_saved_config(tmp_path):
    # a shortened chain (test_tiny_pipeline_report_and_reuse runs all of it): its overrides must come back too
    out = _cli("experiment=tiny", "pipeline=[train,prune,export,validate]", "validate.deploy=false",
               f"paths.outputs={tmp_path}/o", "hydra.run.dir=" + str(tmp_path / "r1"), cwd=tmp_path)
    assert "report:" in out.stdout
    first = json.loads((tmp_path / "r1/report.json").read_text())
    saved = tmp_path / "r1/.hydra"
    _cli("--config-path", str(saved), "--config-name", "config", "force=all",
         f"paths.outputs={tmp_path}/o2", "hydra.run.dir=" + str(tmp_path / "r2"), cwd=tmp_path)
    second = json.loads((tmp_path / "r2/report.json").read_text())
    assert [r["name"] for r in second["rows"]] == [r["name"] for r in first["rows"]] == ["baseline", "prune"]
    assert abs(first["rows"][0]["accuracy"] - second["rows"][0]["accuracy"]) <= 0.5


def test_cli_help_and_bad_input_are_short(tmp_path):
    job = _cli("--cfg", "job", "prune.ratio=0.55", "experiment=tiny", cwd=tmp_path).stdout
    assert "  ratio: 0.55\n" in job and "  name: resnet8\n" in job  # the override and the preset are composed
    assert "Presets (experiment=NAME):" in _cli("--help", cwd=tmp_path).stdout  # the pipeline's own help
    bad = _cli("stage=nope", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "error: config error: stage: 'nope' is not a stage" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.heavy  # the default run shares the baseline across job processes in the Ray and Submitit sweeps
def test_parallel_sweep_shares_the_baseline_and_writes_a_summary(tmp_path):
    """Two jobs in parallel (joblib launcher) need the same baseline: one builds it, the other waits."""
    out = _cli("-m", "experiment=tiny", "pipeline=[train,prune,export,validate]", "prune.ratio=0.3,0.5",
               f"paths.outputs={tmp_path}/o", f"data.root={tmp_path}",
               f"hydra.sweep.dir={tmp_path}/sweep", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", cwd=tmp_path)
    assert "sweep summary:" in out.stdout
    summary = json.loads((tmp_path / "sweep/summary.json").read_text())
    assert len(summary["jobs"]) == 2 and (tmp_path / "sweep/summary.png").is_file()
    assert len(list((tmp_path / "o/artifacts/prune").glob("*/manifest.json"))) == 2
    logs = [p.read_text() for p in (tmp_path / "sweep").glob("*/*.log")]  # job folders are not nested by paths
    assert sum("train: running" in log for log in logs) == 1, logs
    prune_rows = [r for r in summary["rows"] if r["name"] == "prune"]
    assert prune_rows[0]["macs"] > prune_rows[1]["macs"]
    assert not list((tmp_path / "sweep").glob("*.work"))


@pytest.mark.slow
def test_sweep_through_the_ray_launcher_runs_each_job_in_a_worker_process_of_its_own(tmp_path, ray_env):
    """Two jobs as Ray tasks on a local Ray instance the sweep starts (and stops), over a knob training does not
    read: each job in a Ray worker process (not the sweep's), one trains under the artifact lock, the other
    reuses it."""
    cmd = [sys.executable, "-m", "pipeline", "-m", "experiment=tiny", "pipeline=[train]", "train.epochs=1",
           "validate.batch_size=8,16", f"paths.outputs={tmp_path}", f"hydra.sweep.dir={tmp_path}/sweep",
           "hydra/launcher=ray", "hydra.job_logging.formatters.simple.format='pid %(process)d: %(message)s'"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env={**ray_env, "PYTHONPATH": str(ROOT)}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Ray is launching 2 jobs (1 CPU, 0 GPU each)" in stdout
    logs = [p.read_text() for p in sorted((tmp_path / "sweep").glob("*/__main__.log"))]
    pids = {line.split(":")[0] for log in logs for line in log.splitlines() if line.startswith("pid ")}
    assert len(logs) == 2 and len(pids) == 2 and f"pid {proc.pid}" not in pids, (pids, proc.pid)
    assert sum("train: running" in log for log in logs) == 1, logs
    assert sum("train: reusing" in log for log in logs) == 1, logs
    assert len(list((tmp_path / "artifacts/train").glob("*/manifest.json"))) == 1  # built once
    keys = {json.loads(p.read_text())["train"]["key"] for p in (tmp_path / "sweep").glob("*/artifacts.json")}
    assert len(keys) == 1


def test_ray_launcher_without_a_cluster_to_join_is_one_line(tmp_path, ray_env):
    out = subprocess.run([sys.executable, "-m", "pipeline", "-m", "experiment=tiny", "pipeline=[train]",
                          "validate.batch_size=8,16", f"paths.outputs={tmp_path}", f"hydra.sweep.dir={tmp_path}/sweep",
                          "hydra/launcher=ray", "hydra.launcher.address=auto"], cwd=tmp_path,
                         env={**ray_env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: hydra.launcher.address=auto: Ray could not start or "
                                                     "connect ("), out.stderr[-2000:]
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.heavy  # the default run trains on two gloo ranks in test_sync_batchnorm_on_two_cpu_ranks_...
def test_torchrun_ddp_two_cpu_processes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pipeline",
           "experiment=tiny", "stage=qat", "distill.feature_layers=[layer2]", "device=cpu",
           "qat.float_layers=[measure]", f"paths.outputs={tmp_path}/o", f"hydra.run.dir={tmp_path}/r"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    printed = [line for line in out.stdout.splitlines() if line.startswith("qat: ")]
    assert len(printed) == 1, out.stdout  # only rank 0 speaks
    assert "Grad strides do not match" not in out.stderr  # 1x1 shortcut kernels under channels_last
    # rank 0 alone timed the placements and both ranks trained the model it chose (else DDP's buckets differ)
    assert (out.stdout + out.stderr).count("qat: measured placement") == 1
    for stage in ("train", "prune", "distill", "qat"):  # rank 0 alone wrote, same layout as one process
        arts = list((tmp_path / "o/artifacts" / stage).glob("*/manifest.json"))
        assert len(arts) == 1, stage
        metrics = json.loads((arts[0].parent / "metrics.json").read_text())
        assert metrics["test_acc"] > 0, stage


def test_world_size_must_divide_the_batch(cfg_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(PipelineError, match="train.batch_size: 64 is not divisible by the world size 3"):
        Runner(cfg_factory(), tmp_path)


def test_cuda_requested_without_gpu(cfg_factory, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(PipelineError, match="device=cuda but no CUDA GPU"):
        run_pipeline(cfg_factory("device=cuda"), tmp_path / "run")


def test_kd_seeds_compares_kd_with_no_kd_per_seed_from_one_shared_start(tmp_path):
    """pipeline.tools.kd_seeds: 2 seeds x (KD, no KD), parallel jobs; upstream built once, seeds recorded."""
    out = tmp_path / "kd"
    args = [sys.executable, "-m", "pipeline.tools.kd_seeds", "--seeds", "0,1", "--jobs", "2", "--out", str(out),
            "--", "experiment=tiny", "train.epochs=0", tiny_weights(tmp_path), "prune.epochs=0", "distill.epochs=1",
            "data.train_subset=256", f"paths.outputs={tmp_path}/outputs"]
    res = subprocess.run(args, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "over 2 seeds" in res.stdout and "gain" in res.stdout
    summary = json.loads((out / "kd_seeds.json").read_text())
    assert [r["seed"] for r in summary["rows"]] == [0, 1]
    arts = [json.loads((out / f"seed{s}-{k}" / "artifacts.json").read_text()) for s in (0, 1) for k in ("kd", "no_kd")]
    assert len({a["prune"]["key"] for a in arts}) == 1  # the same teacher and pruned start for every job
    assert len({a["distill"]["key"] for a in arts}) == 4
    assert len(list((tmp_path / "outputs" / "artifacts" / "prune").glob("*/model.pt"))) == 1
    metrics = [json.loads((Path(a["distill"]["path"]) / "metrics.json").read_text()) for a in arts]
    assert [m["seed"] for m in metrics] == [0, 0, 1, 1]
    assert summary["rows"][1]["no_kd"] == metrics[3]["test_acc"]
