"""validate: accuracy, latency and throughput of every exported model on each inference runtime vs the baseline.

Reads every ``export/*`` artifact of the pipeline. Writes ``report.json``, ``report.md`` and
``report.png`` into the run folder (not cached: measurements belong to the machine and moment).
Every model is a row per runtime of ``validate.runtimes`` (and per float precision the runtime offers on this
CPU: OpenVINO's bf16 for FP32 models); speedups are relative to the FP32 baseline in ONNX Runtime.
Timing is interleaved: each round measures every row once, and medians over rounds are reported.
"""

from __future__ import annotations

import logging
import os
import platform
import shlex
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipeline import deploy, inference, onnxio, report, serving
from pipeline.artifacts import shown
from pipeline.config import not_in_key, setting
from pipeline.env import cpu_info, git_commit, versions
from pipeline.errors import PipelineError
from pipeline.results import ExportResult
from pipeline.stage import GraphView, Stage, StageContext

log = logging.getLogger(__name__)


@dataclass
class Config:
    """``conf/stages/validate.yaml``."""

    batch_size: int = setting(ge=1, msg="must be {range}")  # throughput batch
    # ORT intra-op threads; 0 = ORT's default (one per core)
    threads: int = setting(ge=0, msg="must be {range} (0 = ORT default)")
    graph_optimization: Literal["disable", "basic", "extended", "all"]
    provider: Literal["auto", "cpu", "cuda", "tensorrt"]  # auto: CUDA EP when installed and a GPU is present
    runtimes: list[Literal["onnxruntime", "openvino"]]  # a row per model and runtime; onnxruntime first (baseline)
    warmup: int  # untimed runs before each measurement
    latency_runs: int = setting(ge=1, msg="must be {range}")  # batch-1 runs per round
    throughput_runs: int = setting(ge=1, msg="must be {range}")  # batch runs per round
    rounds: int = setting(ge=1, msg="must be {range}")  # interleaved rounds over all models; medians are reported
    max_accuracy_drop: float | None = not_in_key()  # gate: points of top-1 below the baseline
    min_speedup: float | None = not_in_key()  # gate: throughput / baseline throughput
    # the recommended row (and the bundle's model) loses at most this many points; not a gate; None: any
    recommend_max_drop: float | None = not_in_key(ge=0, msg="{value} must be {range} points (null: any)")
    # gate: INT8 layers of a row on another runtime / INT8 layers of the same model in ONNX Runtime
    min_int8_coverage: float = not_in_key(ge=0, le=1, msg="{value} must be a fraction {range}")
    models: list[str]  # restrict to these rows (empty = all)
    # throughput vs batch size for every row (empty: skip)
    serving_batch_sizes: list[int] = setting(ge=1, each=True, msg="{value}; every value must be {range}")
    serving_runs: int = setting(ge=1, msg="must be {range}")  # timed calls per batch size and round
    # batch-1 requests in flight over one session (thread pool and run_async); empty: skip
    concurrency: list[int] = setting(ge=1, each=True, msg="{value}; every value must be {range}")
    # requests per level, mode and model (spread over the rounds)
    concurrency_requests: int = setting(ge=1, msg="must be {range}")
    # recommended model: intra-op thread counts to compare (empty: only `threads`)
    sweep_threads: list[int] = setting(ge=0, each=True, msg="{value}; thread counts must be {range} (0 = ORT default)")
    sweep_graph_optimization: list[Literal["disable", "basic", "extended", "all"]]  # likewise, optimisation levels
    deploy: bool  # write the deployment bundle outputs/runs/<run>/deploy/
    deploy_optimized: bool  # also ship ORT's optimised graph (model.optimized.onnx) and time session start-up


ROW_NAMES = {"train": "baseline", "ort_static": "ort-static"}


def row_name(src: str, result: ExportResult) -> str:
    """Report row of ``export/<src>``: baseline, prune, distill-fp16, qat-int8, ort-static-int8, ..."""
    if result.kind == "fp16":
        return ROW_NAMES.get(result.source, result.source) + "-fp16"
    return ROW_NAMES.get(src, src) + ("-int8" if result.precision == "int8" else "")


def _row(name: str, src: str, r: ExportResult, onnx: str, names: dict[str, str]) -> dict:
    """The report row of one export, before it is measured (accuracy and timing are added to it)."""
    cov = r.int8_coverage or {}
    row = {"name": name, "stage": src, "precision": r.precision, "accuracy": None,
           "params": r.params, "macs": r.macs, "size_mb": r.size_mb, "onnx": onnx,
           "int8_coverage": cov.get("coverage"),
           "int8_kernels": f"{cov['int8_kernels']}/{cov['int8_kernels'] + cov['float_kernels']}" if cov else None,
           "parity_top1_agreement": r.parity.top1_agreement}
    if cov.get("dequantized_ops"):
        row["dequantized_ops"] = cov["dequantized_ops"]
    if r.fp32_input in names:
        row["fp32_input"] = names[r.fp32_input]
    if r.quantize_seconds is not None:
        row["quantize_s"] = r.quantize_seconds
    for k in ("float_ops", "placement", "weight_bits", "kept_unprunable"):
        if getattr(r, k):
            row[k] = getattr(r, k)
    return row


def runtime_rows(name: str, precision: str, runtime: str, rt: inference.InferenceRuntime) -> list[tuple[str, str,
                                                                                                          dict]]:
    """(row name, precision, session options) of one model on one runtime: ONNX Runtime's row keeps the model's
    name; another runtime's rows are ``<model>@<runtime>`` in its plain float precision, and for FP32 models one
    more per reduced float precision it runs natively on this CPU (``<model>@openvino-bf16``)."""
    if runtime == inference.DEFAULT:
        return [(name, precision, {})]
    floats = rt.float_precisions()
    out = [(f"{name}@{runtime}", precision, rt.precision_options(floats[0]))]
    if precision == "fp32":
        out += [(f"{name}@{runtime}-{p}", p, rt.precision_options(p)) for p in floats[1:]]
    return out


def expected_rows(view: GraphView) -> list[str]:
    """The report rows the configured graph makes (what ``row_name`` gives for each export node): the export
    of ``qat`` and ORT's static reference are INT8, ``<stage>_fp16`` nodes FP16, the rest FP32."""
    rows = []
    for node in view.expand("export"):
        src = node.partition("/")[2]
        if src.endswith("_fp16"):
            rows.append(ROW_NAMES.get(src.removesuffix("_fp16"), src.removesuffix("_fp16")) + "-fp16")
        else:
            rows.append(ROW_NAMES.get(src, src) + ("-int8" if src in ("qat", "ptq", "ort_static") else ""))
    return rows


def check(view: GraphView) -> list[str]:
    """``validate.models`` names rows this pipeline makes (checked before anything is trained)."""
    cfg: Config = view.settings["validate"]
    errors = []
    if cfg.runtimes[:1] != [inference.DEFAULT] or len(set(cfg.runtimes)) < len(cfg.runtimes):
        errors.append(f"validate.runtimes={cfg.runtimes}: list onnxruntime first (the baseline every speedup is "
                      "relative to) and each runtime once, e.g. validate.runtimes=[onnxruntime,openvino]")
    for name in dict.fromkeys(cfg.runtimes):
        try:  # a missing optional package is found before anything is trained
            inference.get(name).devices(cfg.provider)
        except PipelineError as e:  # a missing package, or a GPU provider that cannot be had
            errors.append(str(e) if str(e).startswith("validate.") else f"validate.runtimes: {e}")
    qat = view.settings.get("qat")
    if qat is not None and qat.target not in cfg.runtimes and view.settings.get("export") is not None and \
            "export/qat" in view.expand("export"):
        errors.append(f"qat.target={qat.target} places the INT8 model for {qat.target}, which validate.runtimes="
                      f"{cfg.runtimes} does not measure; add it: validate.runtimes=[{','.join(cfg.runtimes)},"
                      f"{qat.target}]")
    if errors or not cfg.models or view.settings.get("export") is None:
        return errors
    rows = expected_rows(view)
    return [f"validate.models: no report row named {m!r} in this pipeline; rows are {', '.join(rows)}"
            for m in cfg.models if m not in rows]


def inputs(view: GraphView, node: str) -> dict[str, str]:
    nodes = view.expand("export")
    if not nodes:
        raise PipelineError(
            "validate needs at least one model stage in `pipeline`, e.g. pipeline=[train,export,validate]"
        )
    return {n.split("/", 1)[1]: n for n in nodes}


def _serving(ctx: StageContext, sessions: dict, x, rows: list[dict], best: str | None) -> dict:
    """Throughput per batch size, latency under concurrency (every row, every runtime), and the settings sweep of
    the recommended row on its runtime."""
    cfg: Config = ctx.settings
    out: dict = {}
    if cfg.serving_batch_sizes:
        out["batch"] = serving.batch_sweep(sessions, x, cfg.serving_batch_sizes, cfg.warmup, cfg.serving_runs,
                                           cfg.rounds)
    if cfg.concurrency:
        out["concurrency"] = serving.concurrency(sessions, x, cfg.concurrency, cfg.concurrency_requests,
                                                 cfg.warmup, cfg.rounds)
    if (cfg.sweep_threads or cfg.sweep_graph_optimization) and best is not None:
        row = next(r for r in rows if r["name"] == best)
        rt = inference.get(row["runtime"])
        out["settings"] = {"model": best, "rows": serving.settings_sweep(
            rt, ctx.run_dir / row["onnx"], x, cfg.sweep_threads or [cfg.threads],
            cfg.sweep_graph_optimization or [cfg.graph_optimization], rt.devices(cfg.provider)[0], cfg.batch_size,
            cfg.warmup, cfg.throughput_runs, cfg.rounds, row.get("runtime_options"))}
    return out


def _bundle(ctx: StageContext, rep: dict, arts: dict, classes: list[str]) -> dict:
    """outputs/runs/<run>/deploy: the recommended model (+ the baseline), metadata, model card, config, and the
    runtime (with its settings) that measured it."""
    cfg: Config = ctx.settings
    files = {}
    for name, art in arts.items():
        uint8 = art.path / "model_uint8.onnx"
        files[name] = uint8 if uint8.is_file() else art.path / "model.onnx"
    out = ctx.run_dir / "deploy"
    # a new folder next to this run each time (<run>_reproduced, _reproduced_2, ...): no report is replaced
    run_dir = shlex.quote(f"hydra.run.dir=${{unique_dir:{shown(ctx.run_dir)}_reproduced}}")
    reproduce = f"python -m pipeline --config-path {shlex.quote(str(out.absolute()))} --config-name config {run_dir}"
    deploy.write_bundle(out, rep, files, classes, ctx.data_cfg.mean, ctx.data_cfg.std, ctx.data_cfg.image_size,
                        ctx.config_yaml, reproduce, git_commit(),
                        {"mode": ctx.data_cfg.resize, "crop_fraction": ctx.data_cfg.crop_fraction},
                        {"threads": cfg.threads, "graph_optimization": cfg.graph_optimization})
    log.info("validate: deployment bundle written to %s", out)
    info = {"path": str(out), "model": rep["best"],
            "predict": f"python -m pipeline.predict {shown(out)} <image or folder>"}
    chosen = next(r for r in rep["rows"] if r["name"] == rep["best"])
    info["runtime"] = chosen["runtime"]
    if cfg.deploy_optimized and chosen["runtime"] == inference.DEFAULT:
        info["startup"] = _optimized(out, cfg)
    elif cfg.deploy_optimized:
        log.info("validate: deploy_optimized saves ONNX Runtime's optimised graph; the recommended row runs on %s, "
                 "so none is saved", chosen["runtime"])
    return info


def _optimized(out, cfg: Config) -> dict:
    """ORT's optimised graph of the recommended model, saved once, and session start-up with and without it."""
    rt = inference.get()
    providers, _ = rt.devices(cfg.provider)
    opt = out / "model.optimized.onnx"
    rt.session(out / "model.onnx", cfg.threads, cfg.graph_optimization, providers, optimized_path=opt)
    plain, loaded = [], []
    for _ in range(5):  # interleaved
        plain.append(inference.startup_seconds(rt, out / "model.onnx", providers, 1))
        loaded.append(inference.startup_seconds(rt, opt, providers, 1, "disable"))
    res = {"file": opt.name, "seconds": float(np.median(plain)), "seconds_optimized": float(np.median(loaded))}
    log.info("validate: session start-up %.1f ms, from the saved optimised graph %.1f ms", res["seconds"] * 1e3,
             res["seconds_optimized"] * 1e3)
    return res


def _sessions(ctx: StageContext, results: dict[str, ExportResult], names: dict[str, str]) -> tuple[list, dict, dict]:
    """The report rows (not yet measured) and a session per row: every model on every runtime of
    ``validate.runtimes``, in each precision the runtime offers for it. Also the runtimes' environment."""
    cfg: Config = ctx.settings
    rows, sessions, env = [], {}, {}
    for rname in cfg.runtimes:
        rt = inference.get(rname)
        devices, note = rt.devices(cfg.provider)
        env[rname] = {"version": rt.version(), "devices": devices, **({"note": note} if note else {})}
        for src, art in ctx.inputs.items():
            name, r = names[src], results[src]
            if cfg.models and name not in cfg.models:
                continue
            path = art.path / "model.onnx"
            for row_name_, precision, options in runtime_rows(name, r.precision, rname, rt):
                sessions[row_name_] = rt.session(path, cfg.threads, cfg.graph_optimization, devices, options=options)
                row = _row(row_name_, src, r, os.path.relpath(path, ctx.run_dir), names)
                row.update(model=name, runtime=rname, precision=precision)
                if options:
                    row["runtime_options"] = options
                if rname != inference.DEFAULT:
                    row["parity_top1_agreement"] = None  # measured against the ONNX Runtime row below
                    for k in ("float_ops", "placement", "weight_bits", "kept_unprunable"):  # the model's: once
                        row.pop(k, None)
                    if row.get("fp32_input"):
                        row["fp32_input"] = runtime_rows(row["fp32_input"], "int8", rname, rt)[0][0]
                    if r.precision == "int8":  # which convs/matmuls this runtime runs in INT8
                        cov = rt.kernel_coverage(path)
                        row.update(int8_coverage=cov["coverage"],
                                   int8_kernels=f"{cov['int8_kernels']}/{cov['int8_kernels'] + cov['float_kernels']}")
                        row.pop("dequantized_ops", None)
                rows.append(row)
    return rows, sessions, env


def run(ctx: StageContext) -> dict:
    cfg: Config = ctx.settings
    splits = ctx.splits()
    timing_n = max([cfg.batch_size, 256, *cfg.serving_batch_sizes])
    x = onnxio.normalise(splits.test_x[:timing_n], ctx.data_cfg.mean, ctx.data_cfg.std)  # timing inputs
    y = splits.test_y.numpy()
    results: dict[str, ExportResult] = {src: art.result for src, art in ctx.inputs.items()}
    names = {src: row_name(src, r) for src, r in results.items()}
    unknown = [m for m in cfg.models if m not in names.values()]
    if unknown:
        raise PipelineError(f"validate.models: no report row named {unknown[0]!r}; rows are "
                            f"{', '.join(names.values())}")
    rows, sessions, runtimes = _sessions(ctx, results, names)
    logits = inference.predict_images(sessions, splits.test_x, ctx.data_cfg.mean, ctx.data_cfg.std)
    for row in rows:
        row["accuracy"] = float((logits[row["name"]].argmax(1) == y).mean() * 100)
        if row["runtime"] != inference.DEFAULT:  # the same model's predictions in ONNX Runtime, on every test image
            ref = logits[row["model"]].argmax(1)
            row["agreement_vs_onnxruntime"] = float((logits[row["name"]].argmax(1) == ref).mean() * 100)
        log.info("validate: %s accuracy %.2f%%", row["name"], row["accuracy"])

    timing = report.measure(sessions, x, cfg, progress=ctx.rt.progress)  # every runtime in one interleaved loop
    for row in rows:
        row.update(timing[row["name"]])
    base = next((r for r in rows if r["name"] == "baseline"), rows[0])
    for row in rows:
        row["speedup_vs_baseline"] = row["throughput_ips"] / base["throughput_ips"]
        row["accuracy_delta_vs_baseline"] = row["accuracy"] - base["accuracy"]
    ort = runtimes[inference.DEFAULT]
    env = {"platform": platform.platform(), **cpu_info(), "threads": cfg.threads,
           "graph_optimization": cfg.graph_optimization, "providers": ort["devices"], "runtimes": runtimes,
           "versions": versions()}
    notes = [f"{n}: {r['note']}" if n != inference.DEFAULT else r["note"] for n, r in runtimes.items() if r.get("note")]
    if notes:
        env["note"] = "; ".join(notes)
    rep = report.build_report(rows, base["name"], env, cfg)
    rep["serving"] = _serving(ctx, sessions, x, rows, rep["best"])
    if (tracking := ctx.tracking()) is not None:
        rep["tracking"] = tracking
    if cfg.deploy and rep["best"] is not None:
        arts = {r["name"]: ctx.inputs[r["stage"]] for r in rows}
        rep["deploy"] = _bundle(ctx, rep, arts, splits.classes)
    report.write_report(ctx.run_dir, rep)
    log.info("validate: report written to %s", ctx.run_dir / "report.md")
    failures = rep["gates"]["failures"]
    if failures:
        raise PipelineError(f"gate failed: {failures[0]} (report: {ctx.run_dir / 'report.md'})")
    return {"report": str(ctx.run_dir / "report.json"), "best": rep["best"], "deploy": rep.get("deploy")}


STAGE = Stage(name="validate", config=Config, run=run, outputs=("report.json", "report.md", "report.png"),
              inputs=inputs, cached=False, main_only=True, check=check)
