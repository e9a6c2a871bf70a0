"""Hydra callback that writes a sweep summary (summary.{json,md,png}) at the multirun's root."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pipeline import tracking
from pipeline.artifacts import atomic_write_text, write_json
from pipeline.report import markdown_table, plot_points

log = logging.getLogger(__name__)
JOB_ERROR = "error.txt"  # a sweep job that failed leaves its one-line error here (pipeline.__main__)

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
    failed = []
    for err in sorted(sweep_dir.glob(f"*/{JOB_ERROR}"), key=lambda p: p.parent.name):
        ovr_file = err.parent / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(ovr_file.read_text()) if ovr_file.is_file() else []
        failed.append({"job": err.parent.name, "overrides": " ".join(overrides), "error": err.read_text().strip()})
    return {"sweep_dir": str(sweep_dir), "jobs": jobs, "rows": rows, "failed": failed}


def _failed_lines(summary: dict) -> list[str]:
    if not summary["failed"]:
        return []
    return ["", f"Failed jobs ({len(summary['failed'])}):", "",
            markdown_table(summary["failed"], [("job", "job", "{}"), ("overrides", "overrides", "{}"),
                                               ("error", "error", "{}")]), ""]


def _search_marks(sweep_dir: Path, summary: dict) -> dict | None:
    """With a search (search.json from hydra/sweeper=pareto): mark Pareto-optimal and recommended jobs."""
    path = Path(sweep_dir) / "search.json"
    if not path.is_file():
        return None
    search = json.loads(path.read_text())
    marks = {}
    for t in search["trials"]:
        if t.get("job"):
            marks[t["job"]] = ("recommended, " if t["number"] == search["recommended"] else "") + \
                ("Pareto" if t["pareto"] else "") + ("" if t["feasible"] else " (fails constraints)")
    for r in summary["rows"]:
        r["search"] = marks.get(r["job"], "").strip(", ") if r["name"] == search.get("row") else ""
    return search


def write_summary(sweep_dir: Path) -> dict | None:
    summary = summarize(sweep_dir)
    search = _search_marks(sweep_dir, summary)
    if not summary["rows"]:
        log.warning("sweep: no job wrote a report under %s", sweep_dir)
        if search is not None or summary["failed"]:  # every trial pruned by the probe, or every job failed
            note = f"see search.md.\n\n{search.get('note') or ''}\n" if search is not None else ""
            write_json(Path(sweep_dir) / "summary.json", summary)
            atomic_write_text(Path(sweep_dir) / "summary.md", "\n".join(
                ["# Sweep summary", "", f"No job wrote a report; {note}", *_failed_lines(summary)]))
            return summary
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
    columns = SUMMARY_COLUMNS + ([("search", "search", "{}")] if search is not None else [])
    md = ["# Sweep summary", "", f"{len(summary['jobs'])} jobs in `{sweep_dir}`.", "",
          markdown_table(summary["rows"], columns), "", "![Pareto plot](summary.png)", "", *_failed_lines(summary)]
    if search is not None:
        summary["search"] = {k: search[k] for k in ("pareto", "recommended", "reproduce", "note")}
        write_json(Path(sweep_dir) / "summary.json", summary)
        md += ["Search: " + (f"recommended `{search['reproduce']}`" if search["reproduce"] else search["note"]) +
               ". Every trial (also those pruned before training) is in `search.md`.", ""]
    atomic_write_text(Path(sweep_dir) / "summary.md", "\n".join(md))
    log.info("sweep: summary written to %s", Path(sweep_dir) / "summary.md")
    return summary


class SweepSummary(Callback):
    """``hydra.callbacks.sweep_summary``: opens the trackers' parent run before the jobs (``logger=...``);
    writes the summary once after all multirun jobs and closes the parent run with it."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        tracking.sweep_start(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        summary = write_summary(sweep_dir)
        tracking.sweep_end(config, summary)
        if summary is None:
            return
        print(f"sweep summary: {sweep_dir / 'summary.md'}")
        if summary["failed"] and not (sweep_dir / "search.json").is_file():  # a search records failed trials
            for f in summary["failed"]:
                print(f"error: sweep job {f['job']} failed: {f['error']}", file=sys.stderr)
            sys.exit(2)
