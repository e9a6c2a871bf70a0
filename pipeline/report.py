"""Reports: interleaved timing on an inference runtime, report.{json,md,png} for a run, summary.* for a sweep."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import inference
from pipeline.artifacts import atomic_write_bytes, atomic_write_text, write_json
from pipeline.pruning import grouped_reasons

log = logging.getLogger(__name__)

NOISE = 0.95  # throughputs within 5% count as equal when picking the best artifact
COLUMNS = [  # (key, header, format)
    ("name", "model", "{}"), ("runtime", "runtime", "{}"), ("precision", "precision", "{}"),
    ("accuracy", "top-1 %", "{:.2f}"),
    ("accuracy_delta_vs_baseline", "Δ top-1", "{:+.2f}"), ("params", "params", "{:,}"),
    ("macs", "MACs", "{:,}"), ("size_mb", "size MB", "{:.2f}"),
    ("latency_ms_p50", "p50 ms (b=1)", "{:.2f}"), ("latency_ms_p99", "p99 ms (b=1)", "{:.2f}"),
    ("throughput_ips", "img/s", "{:.0f}"), ("speedup_vs_baseline", "speedup", "{:.2f}x"),
    ("int8_kernels", "INT8 kernels", "{}"),  # "INT8 / all" convs+matmuls in ORT's graph
    ("quantize_s", "quantize s", "{:.1f}"),  # INT8 rows: seconds the quantization took (ptq / qat stage, ORT static)
]


def measure(sessions: dict, x: np.ndarray, cfg: Any, progress: bool = False) -> dict[str, dict]:
    """Batch-1 latency and batch-N throughput per session, in interleaved rounds (medians)."""
    from tqdm import tqdm

    b1 = np.ascontiguousarray(x[:1])
    bn = np.ascontiguousarray(np.resize(x, (cfg.batch_size, *x.shape[1:])))
    lat = {n: [] for n in sessions}
    thr = {n: [] for n in sessions}
    steps = [(r, n) for r in range(cfg.rounds) for n in sessions]
    for _, name in tqdm(steps, desc="validate timing", unit="run", disable=not progress, leave=False):
        sess = sessions[name]
        lat[name].append(inference.time_runs(sess, b1, cfg.warmup, cfg.latency_runs))
        thr[name].append(inference.time_runs(sess, bn, cfg.warmup, cfg.throughput_runs))
    return {n: timing_summary(np.concatenate(lat[n]), np.concatenate(thr[n]), cfg.batch_size)
            for n in sessions}


def timing_summary(times_b1: np.ndarray, times_bn: np.ndarray, batch: int) -> dict:
    """Latency percentiles (batch 1) and throughput (median run time at ``batch``)."""
    return {
        "latency_ms_p50": float(np.percentile(times_b1, 50) * 1e3),
        "latency_ms_p90": float(np.percentile(times_b1, 90) * 1e3),
        "latency_ms_p99": float(np.percentile(times_b1, 99) * 1e3),
        "throughput_ips": float(batch / np.median(times_bn)),
        "batch_size": batch,
    }


def _gates(rows: list[dict], base: dict, cfg: Any) -> tuple[list[str], dict[str, bool]]:
    failures, ok = [], {}
    for r in rows:
        reasons = []
        if cfg.max_accuracy_drop is not None and -r["accuracy_delta_vs_baseline"] > cfg.max_accuracy_drop:
            reasons.append(f"{r['name']} loses {-r['accuracy_delta_vs_baseline']:.2f} points "
                           f"(validate.max_accuracy_drop={cfg.max_accuracy_drop})")
        if (cfg.min_speedup is not None and r is not base and r["speedup_vs_baseline"] < cfg.min_speedup):
            reasons.append(f"{r['name']} is {r['speedup_vs_baseline']:.2f}x the baseline "
                           f"(validate.min_speedup={cfg.min_speedup})")
        reasons += _coverage_gate(r, rows, getattr(cfg, "min_int8_coverage", None))
        ok[r["name"]] = not reasons
        failures += reasons
    return failures, ok


def _ort_row(rows: list[dict], row: dict) -> dict | None:
    """The same model's row in ONNX Runtime (a row on another runtime names it as ``model``)."""
    return next((r for r in rows if r["name"] == row.get("model")), None)


def _kernels(row: dict | None) -> int | None:
    return int(row["int8_kernels"].split("/")[0]) if row and row.get("int8_kernels") else None


def _coverage_gate(r: dict, rows: list[dict], share: float | None) -> list[str]:
    """An INT8 model on another runtime must run (``share`` of) the layers ONNX Runtime runs as INT8 in INT8:
    ORT's own coverage is gated at export; another runtime may fall back to float kernels for a QDQ pattern."""
    if share is None or r.get("runtime", inference.DEFAULT) == inference.DEFAULT or r.get("precision") != "int8":
        return []
    got, want = _kernels(r), _kernels(_ort_row(rows, r))
    if got is None or not want or got >= share * want:
        return []
    return [f"{r['name']} runs {got} of the {want} layers ONNX Runtime runs in INT8 as INT8 "
            f"(validate.min_int8_coverage={share})"]


def build_report(rows: list[dict], baseline: str, env: dict, cfg: Any) -> dict:
    """Add gates and the recommended artifact to the measured rows: of the rows that pass the gates and lose at most
    ``cfg.recommend_max_drop`` points (None: any), the fastest, or within timing noise of it the most accurate."""
    base = next(r for r in rows if r["name"] == baseline)
    failures, ok = _gates(rows, base, cfg)
    passing = [r for r in rows if ok[r["name"]]]
    tol = getattr(cfg, "recommend_max_drop", None)
    close = [r for r in passing if tol is None or r is base or -r["accuracy_delta_vs_baseline"] <= tol]
    best = None
    if close:  # the fastest; within timing noise (5%) of it, the most accurate
        top = max(r["throughput_ips"] for r in close)
        best = max((r for r in close if r["throughput_ips"] >= NOISE * top), key=lambda r: r["accuracy"])
    if best is None:
        why = "no artifact passes the gates"
    elif best is base:
        why = "no compressed model is faster than the FP32 baseline within the gates on this machine"
    else:
        within = "" if tol is None else f" and lose at most {tol:g} points"
        why = (f"the most accurate of the artifacts within 5% of the fastest that pass the gates{within}: "
               f"{best['speedup_vs_baseline']:.2f}x the baseline's throughput at "
               f"{best['accuracy_delta_vs_baseline']:+.2f} points of top-1")
        if best.get("runtime", inference.DEFAULT) != inference.DEFAULT:
            why += f", running on {best['runtime']} in {best['precision']}" + _runtime_why(rows, best)
    faster = [r for r in passing if r not in close and (best is None or r["throughput_ips"] > best["throughput_ips"])]
    if faster:  # left out of the choice: say so, with what it would have given
        r = max(faster, key=lambda r: r["throughput_ips"])
        why += (f"; {r['name']} is faster ({r['speedup_vs_baseline']:.2f}x) but loses "
                f"{-r['accuracy_delta_vs_baseline']:.2f} points, more than validate.recommend_max_drop={tol:g}")
    return {
        "baseline": baseline, "rows": rows, "environment": env,
        "gates": {"max_accuracy_drop": cfg.max_accuracy_drop, "min_speedup": cfg.min_speedup,
                  "passed": {n: v for n, v in ok.items()}, "failures": failures},
        "best": best["name"] if best else None, "best_reason": why, "recommend_max_drop": tol,
        "int8_vs_fp32_input": _int8_vs_input(rows),
    }


def _runtime_why(rows: list[dict], best: dict) -> str:
    """Why another runtime: the same model's throughput in ONNX Runtime against the chosen row's."""
    same = _ort_row(rows, best)
    if same is None:
        return ""
    return (f" ({best['throughput_ips'] / same['throughput_ips']:.2f}x the same model in ONNX Runtime, "
            f"{best['accuracy'] - same['accuracy']:+.2f} points)")


def _int8_vs_input(rows: list[dict]) -> list[dict]:
    """Each INT8 row's throughput over its FP32 input's (the model it was quantized from), where both were timed."""
    by_name = {r["name"]: r for r in rows}
    # on a runtime with a reduced float precision, the INT8 row also against its input in it (distill@openvino-bf16)
    pairs = [(r, f) for r in rows if r.get("fp32_input") for f in (r["fp32_input"], r["fp32_input"] + "-bf16")
             if f in by_name and (f == r["fp32_input"] or by_name[f].get("runtime") == r.get("runtime"))]
    return [{"name": r["name"], "fp32_input": f, "ratio": r["throughput_ips"] / by_name[f]["throughput_ips"]}
            for r, f in pairs]


def runtime_markdown(rows: list[dict]) -> list[str]:
    """The rows of runtimes other than ONNX Runtime: what they are and how far their predictions agree with it."""
    other = [r for r in rows if r.get("agreement_vs_onnxruntime") is not None]
    if not other:
        return []
    return ["Rows `<model>@<runtime>` run the same ONNX file on another runtime (OpenVINO: f32 inference "
            "precision; `-bf16`: bfloat16, on CPUs that run it natively); speedups are against the FP32 baseline "
            "in ONNX Runtime. Top-1 agreement with the same model in ONNX Runtime, on every test image: "
            + ", ".join(f"{r['name']} {r['agreement_vs_onnxruntime']:.2f}%" for r in other) + ".", ""]


def int8_markdown(rep: dict) -> list[str]:
    """One line on whether INT8 pays on this machine, and what to do where it does not."""
    pairs = rep.get("int8_vs_fp32_input") or []
    if not pairs:
        return []
    line = "INT8 against its FP32 input (same batch, same run): " + ", ".join(
        f"{p['name']} {p['ratio']:.2f}x {p['fp32_input']}" for p in pairs) + "."
    slower = [p for p in pairs if p["ratio"] < 1]
    if slower:
        line += " " + "; ".join(f"{p['name']} is slower than {p['fp32_input']} on this CPU" for p in slower) + (
            ": INT8 does not pay here (no INT8 kernel is faster than FP32 for these layers, or the"
            " QuantizeLinear/DequantizeLinear pairs around float ops cost more than they save); deploy the FP32"
            " model, or let `qat.float_layers=[measure]` time which leading blocks to keep FP32.")
    return [line, ""]


def markdown_table(rows: list[dict], columns=COLUMNS) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("–" if v is None else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_points(points: list[tuple[str, float, float]], title: str, path: Path, pareto: bool = False) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=110)
    for label, thr, acc in points:
        ax.scatter(thr, acc, s=40)
        ax.annotate(label, (thr, acc), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if pareto and points:
        front, best = [], -np.inf
        for _, thr, acc in sorted(points, key=lambda p: -p[1]):
            if acc > best:
                front.append((thr, acc))
                best = acc
        ax.plot(*zip(*sorted(front), strict=True), "--", color="gray", label="Pareto front")
        ax.legend(loc="lower left", fontsize=8)
    ax.set_xlabel("ONNX Runtime throughput (images/s)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def float_markdown(rows: list[dict]) -> list[str]:
    """What stays float per INT8 model: the QAT rewrite's list (op, why) and the ops ONNX Runtime's optimised
    graph runs on dequantized data (also for ORT's own quantizer, whose model has no such list)."""
    def line(r: dict) -> str:
        ours = ", ".join(f"{op} x{n}" for op, n in (r.get("float_ops") or {}).items())
        ort = ", ".join(f"{op} x{n}" for op, n in (r.get("dequantized_ops") or {}).items())
        return f"- {r['name']}: " + "; ".join(p for p in (ours, ort and f"ONNX Runtime runs float: {ort}") if p)

    floats = [line(r) for r in rows if r.get("float_ops") or r.get("dequantized_ops")]
    if not floats:
        return []
    return ["What stays float in the INT8 models (between DequantizeLinear and QuantizeLinear):", "", *floats, ""]


def kept_markdown(rows: list[dict]) -> list[str]:
    """The report's lines on layers channel pruning kept at full width because Torch-Pruning cannot prune them."""
    kept = [(r["name"], r["kept_unprunable"]) for r in rows if r.get("kept_unprunable")]
    if not kept:
        return []
    return (["Layers channel pruning left at full width (Torch-Pruning cannot prune them correctly):", ""]
            + [f"- {name}: {grouped_reasons(layers)}" for name, layers in kept] + [""])


def write_report(run_dir: Path, rep: dict) -> None:
    run_dir = Path(run_dir)
    env = rep["environment"]
    write_json(run_dir / "report.json", rep)
    plot_points([(r["name"], r["throughput_ips"], r["accuracy"]) for r in rep["rows"]],
          f"accuracy vs throughput (batch {rep['rows'][0]['batch_size']}, {env['threads'] or 'default'} threads)",
          run_dir / "report.png")
    gate = "all gates passed" if not rep["gates"]["failures"] else "; ".join(rep["gates"]["failures"])
    md = [
        "# Pipeline report", "",
        f"Baseline: **{rep['baseline']}**. Best deployable choice: **{rep['best']}** — {rep['best_reason']}.",
        f"Gates: {gate}.", "",
        markdown_table(rep["rows"]), "",
        "Throughput at batch {b}, latency at batch 1; medians over interleaved rounds. "
        "Dense ONNX Runtime does not run zeroed (unstructured-pruned) weights faster; only removed "
        "channels and INT8 kernels change speed.".format(b=rep["rows"][0]["batch_size"]), "",
        f"Machine: {env['cpu']} ({env['cores']} cores, {', '.join(env['flags']) or 'no SIMD flags read'}), "
        f"ORT {env['versions'].get('onnxruntime')}, providers {', '.join(env['providers'])}, "
        f"graph optimisation `{env['graph_optimization']}`"
        + "".join(f", {n} {r['version']}" for n, r in (env.get("runtimes") or {}).items() if n != "onnxruntime")
        + ".", "",
        "![accuracy vs throughput](report.png)", "",
    ]
    if env.get("note"):
        md.insert(4, f"Note: {env['note']}.")
    md += runtime_markdown(rep["rows"])
    md += int8_markdown(rep)
    md += float_markdown(rep["rows"])
    md += kept_markdown(rep["rows"])
    bits = [f"{r['name']} {r['weight_bits']}" for r in rep["rows"] if r.get("weight_bits")]
    if bits:
        md += ["INT8 weights: " + "; ".join(bits) + ".", ""]
    placed = [(r["name"], r["placement"]) for r in rep["rows"] if r.get("placement")]
    if placed:
        md += ["FP32 layers chosen by timing placements in ONNX Runtime on this CPU (`qat.float_layers=[measure]`):",
               ""] + [f"- {name}: {summary}" for name, summary in placed] + [""]
    md += serving_markdown(rep, run_dir)
    atomic_write_text(run_dir / "report.md", "\n".join(md))


def serving_markdown(rep: dict, run_dir: Path) -> list[str]:
    """The report's serving section (and serving.png): batch sizes, concurrency, session settings, bundle."""
    srv = rep.get("serving") or {}
    md: list[str] = []
    if "batch" in srv:
        sizes = sorted({b for per in srv["batch"].values() for b in per}, key=int)
        md += ["## Serving", "", "Throughput (images/s) per batch size, one session, sequential calls:", "",
               "| model | " + " | ".join(f"b={b}" for b in sizes) + " | best / b=1 |",
               "|---|" + "---|" * (len(sizes) + 1)]
        for name, per in srv["batch"].items():
            vals = [per[b]["throughput_ips"] for b in sizes]
            md.append(f"| {name} | " + " | ".join(f"{v:.0f}" for v in vals) + f" | {max(vals) / vals[0]:.2f}x |")
        md.append("")
    if "concurrency" in srv:
        md += ["Batch-1 requests with N in flight over one shared session (thread pool / ORT `run_async`): "
               "p50 / p99 latency in ms and images/s:", "",
               "| model | mode | " + " | ".join(f"N={k}" for k in next(iter(
                   next(iter(srv["concurrency"].values())).values()))) + " |",
               "|---|---|" + "---|" * len(next(iter(next(iter(srv["concurrency"].values())).values())))]
        for name, modes in srv["concurrency"].items():
            for mode, per in modes.items():
                md.append(f"| {name} | {mode} | " + " | ".join(
                    f"{v['latency_ms_p50']:.2f} / {v['latency_ms_p99']:.2f} ms, {v['throughput_ips']:.0f}/s"
                    for v in per.values()) + " |")
        md.append("")
    if "settings" in srv:
        md += [f"Session settings for **{srv['settings']['model']}** (intra-op threads x graph optimisation):", "",
               "| threads | graph optimisation | p50 ms (b=1) | img/s |", "|---|---|---|---|"]
        md += [f"| {r['threads'] or 'default'} | {r['graph_optimization']} | {r['latency_ms_p50']:.2f} | "
               f"{r['throughput_ips']:.0f} |" for r in srv["settings"]["rows"]]
        md.append("")
    if "batch" in srv or "concurrency" in srv:
        _plot_serving(srv, run_dir / "serving.png")
        md += ["![latency vs throughput](serving.png)", ""]
    if rep.get("deploy"):
        md += ["## Deploy", "", f"Bundle: `{rep['deploy']['path']}` (model card, metadata, config). Classify:", "",
               f"    {rep['deploy']['predict']}", ""]
        if st := rep["deploy"].get("startup"):
            md += [f"Session start-up: {st['seconds'] * 1e3:.1f} ms from `model.onnx`, "
                   f"{st['seconds_optimized'] * 1e3:.1f} ms from ORT's saved optimised graph `{st['file']}`.", ""]
    return md


def _plot_serving(srv: dict, path: Path) -> None:
    """Latency vs throughput per model: one line over batch sizes, one over concurrency levels."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=110)
    for i, name in enumerate(srv.get("batch") or srv.get("concurrency")):
        color = f"C{i}"
        if "batch" in srv:
            pts = sorted(srv["batch"][name].items(), key=lambda kv: int(kv[0]))
            ax.plot([v["throughput_ips"] for _, v in pts], [v["ms_per_call"] for _, v in pts], "o-", color=color,
                    label=f"{name} (batch sizes)")
        if "concurrency" in srv:
            pts = list(srv["concurrency"][name]["threads"].values())
            ax.plot([v["throughput_ips"] for v in pts], [v["latency_ms_p50"] for v in pts], "s--", color=color,
                    alpha=0.7, label=f"{name} (concurrent b=1)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("throughput (images/s)")
    ax.set_ylabel("latency per call (ms)")
    ax.set_title("ONNX Runtime serving: latency vs throughput", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
