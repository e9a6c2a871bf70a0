"""Hydra callback that writes a sweep summary (summary.{json,md,png}) at the multirun's root."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pipeline.artifacts import atomic_write_text, write_json
from pipeline.report import markdown_table, plot_points

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = [
    ("job", "job", "{}"), ("overrides", "overrides", "{}"), ("name", "model", "{}"),
    ("precision", "precision", "{}"), ("accuracy", "top-1 %", "{:.2f}"),
    ("accuracy_delta_vs_baseline", "Δ top-1", "{:+.2f}"), ("params", "params", "{:,}"), ("macs", "MACs", "{:,}"),
    ("latency_ms_p50", "p50 ms", "{:.2f}"), ("throughput_ips", "img/s", "{:.0f}"),
    ("speedup_vs_baseline", "speedup", "{:.2f}x"),
]


def summarize(sweep_dir: Path) -> dict:
    """Collect every job's report.json under ``sweep_dir`` into one summary (rows per job and model)."""
    sweep_dir = Path(sweep_dir)
    rows, jobs = [], []
    for rep_path in sorted(sweep_dir.glob("*/report.json"), key=lambda p: p.parent.name):
        job = rep_path.parent
        ovr_file = job / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(ovr_file.read_text()) if ovr_file.is_file() else []
        rep = json.loads(rep_path.read_text())
        jobs.append({"job": job.name, "overrides": overrides, "best": rep.get("best")})
        for r in rep["rows"]:
            rows.append({"job": job.name, "overrides": " ".join(overrides), **r,
                         "onnx": str((job / r["onnx"]).resolve())})
    return {"sweep_dir": str(sweep_dir), "jobs": jobs, "rows": rows}


def write_summary(sweep_dir: Path) -> dict | None:
    summary = summarize(sweep_dir)
    if not summary["rows"]:
        log.warning("sweep: no job wrote a report under %s; no summary", sweep_dir)
        return None
    write_json(Path(sweep_dir) / "summary.json", summary)
    # the Pareto plot: every distinct model once (the baseline is shared across jobs)
    seen, points = set(), []
    for r in summary["rows"]:
        key = r["onnx"]
        if key not in seen:
            seen.add(key)
            label = r["name"] if r["name"] == "baseline" else f"{r['name']} ({r['overrides']})"
            points.append((label, r["throughput_ips"], r["accuracy"]))
    plot_points(points, "sweep: accuracy vs ONNX Runtime throughput", Path(sweep_dir) / "summary.png", pareto=True)
    md = ["# Sweep summary", "", f"{len(summary['jobs'])} jobs in `{sweep_dir}`.", "",
          markdown_table(summary["rows"], SUMMARY_COLUMNS), "", "![Pareto plot](summary.png)", ""]
    atomic_write_text(Path(sweep_dir) / "summary.md", "\n".join(md))
    log.info("sweep: summary written to %s", Path(sweep_dir) / "summary.md")
    return summary


class SweepSummary(Callback):
    """``hydra.callbacks.sweep_summary``: runs once after all multirun jobs."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        summary = write_summary(Path(config.hydra.sweep.dir))
        if summary is not None:
            print(f"sweep summary: {Path(config.hydra.sweep.dir) / 'summary.md'}")
