"""The search's report (``search.md``, ``search.png``) and what it reads from other sweeps: the points of an
earlier sweep (``search.warm_start``) and a grid drawn beside the trials (``search.compare``)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from pipeline.artifacts import atomic_write_bytes
from pipeline.errors import PipelineError


def _parse(overrides: list[str]) -> dict[str, Any]:
    """``key=value`` overrides as values (Hydra's parser); groups and Hydra's own keys left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = {}
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.key_or_group
        if key.startswith("hydra") or o.is_delete() or "." not in key:
            continue
        out[key] = o.value()
    return out


def _jobs(folder: Path) -> list[Path]:
    """The job folders of a sweep that wrote a report."""
    return sorted((p.parent for p in folder.glob("*/report.json")), key=lambda p: p.name)


def sweep_points(folder: Path) -> list[tuple[str, dict]]:
    """The points of an earlier sweep: a search's complete trials, or a grid's jobs that wrote a report."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PipelineError(f"search.warm_start: {folder} is not a sweep folder (no such folder)")
    search = folder / "search.json"
    if search.is_file():
        trials = json.loads(search.read_text())["trials"]
        return [(f"trial {t['number']}", _parse(t["overrides"])) for t in trials if t["state"] == "COMPLETE"]
    points = []
    for job in _jobs(folder):
        ovr = job / ".hydra" / "overrides.yaml"
        if ovr.is_file():
            points.append((f"job {job.name}", _parse(yaml.safe_load(ovr.read_text()) or [])))
    if not points:
        raise PipelineError(f"search.warm_start: {folder} has no job with a report (report.json); give a finished "
                            "sweep's folder")
    return points


def grid_points(folder: Path, row: str, stages: list[str]) -> dict:
    """A grid sweep's jobs (row ``row`` of each report), the keys that vary between them and its fine-tuning
    cost (every job's epochs in the fidelity stages, as its config says)."""
    from pipeline.fidelity import fine_tune_epochs

    folder = Path(folder)
    jobs = _jobs(folder)
    if not jobs:
        raise PipelineError(f"search.compare: {folder} has no job with a report (report.json); give a finished "
                            "grid sweep's folder")
    points, cost, params = [], 0, []
    for job in jobs:
        rep = json.loads((job / "report.json").read_text())
        r = next((x for x in rep["rows"] if x["name"] == row), None)
        ovr = job / ".hydra" / "overrides.yaml"
        params.append(_parse(yaml.safe_load(ovr.read_text()) or []) if ovr.is_file() else {})
        cfg_file = job / ".hydra" / "config.yaml"
        if cfg_file.is_file():
            cost += fine_tune_epochs(OmegaConf.load(cfg_file), stages)[1]
        if r is not None:
            points.append({"job": job.name, "accuracy": r["accuracy"], "delta": r["accuracy_delta_vs_baseline"],
                           "speedup": r["speedup_vs_baseline"]})
    varying = sorted({k for p in params for k in p if any(q.get(k) != p.get(k) for q in params)})
    for pt, p in zip(points, params, strict=False):
        pt["point"] = " ".join(f"{k}={p.get(k)}" for k in varying)
    return {"sweep": str(folder), "points": points, "epochs": cost}


def compare_grid(grid: dict, best: dict | None, settings: Any) -> dict:
    """The search's recommended trial against the grid's best point (the most accurate that meets the
    constraints, else the most accurate): does it dominate or equal it, or meet the constraints where no
    grid point does?"""
    def feasible(p: dict) -> bool:
        return ((settings.max_accuracy_drop is None or -p["delta"] <= settings.max_accuracy_drop) and
                (settings.min_speedup is None or p["speedup"] >= settings.min_speedup))

    pts = grid["points"]
    ok = [p for p in pts if feasible(p)]
    gbest = max(ok or pts, key=lambda p: (p["accuracy"], p["speedup"])) if pts else None
    out = {"sweep": grid["sweep"], "points": len(pts), "epochs": grid["epochs"],
           "grid_best": gbest, "grid_feasible": len(ok), "verdict": "no recommended trial"}
    if best is not None and gbest is not None:
        r = best["row"]
        if r["accuracy"] >= gbest["accuracy"] and r["speedup_vs_baseline"] >= gbest["speedup"]:
            out["verdict"] = "dominates or equals the grid's best"
        elif not ok:
            out["verdict"] = "meets the constraints where no grid point does"
        else:
            out["verdict"] = "does not beat the grid's best"
    return out


def plot_search(out: dict, grids: list[dict], path: Path) -> None:
    """Accuracy against speedup: the complete trials (Pareto-optimal ones filled, the recommended one
    starred) and each compared grid's points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=110)
    done = [t for t in out["trials"] if t["state"] == "COMPLETE" and t["row"]]
    for t in done:
        r = t["row"]
        ax.scatter(r["speedup_vs_baseline"], r["accuracy"], s=40, color="tab:blue",
                   facecolors="tab:blue" if t["pareto"] else "none")
        ax.annotate(str(t["number"]), (r["speedup_vs_baseline"], r["accuracy"]), textcoords="offset points",
                    xytext=(4, 3), fontsize=8)
        if t["number"] == out["recommended"]:
            ax.scatter(r["speedup_vs_baseline"], r["accuracy"], s=160, marker="*", color="gold", zorder=3,
                       label="recommended")
    if done:
        ax.scatter([], [], color="tab:blue", label="trials (filled: Pareto)")
    for n, g in enumerate(grids):
        xs, ys = [p["speedup"] for p in g["points"]], [p["accuracy"] for p in g["points"]]
        ax.scatter(xs, ys, marker="s", s=40, color=f"C{n + 3}", label=f"grid ({len(xs)} points, {g['epochs']} ep)")
        for p in g["points"]:
            ax.annotate(p["point"], (p["speedup"], p["accuracy"]), textcoords="offset points", xytext=(4, -9),
                        fontsize=7, color=f"C{n + 3}")
    ax.set_xlabel("speedup vs the baseline (ONNX Runtime throughput)")
    ax.set_ylabel("top-1 accuracy (%)")
    spent = out["budget"]["spent"]
    ax.set_title(f"search: {len(done)} complete trials, {spent} fine-tuning epochs", fontsize=10)
    ax.grid(alpha=0.3)
    if done or grids:
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _state(t: dict) -> str:
    if t["state"] == "PRUNED" and t.get("stopped_at_epoch"):
        return f"pruned at epoch {t['stopped_at_epoch']}"
    if t["state"] == "PRUNED":
        return f"pruned (probe {t['probe_speedup']:.2f}x)"
    return t["state"].lower()


def search_markdown(out: dict) -> str:
    names = list(out["objectives"])
    b = out["budget"]
    budget = (f"{b['spent']} of {b['epochs']}" if b["epochs"] else str(b["spent"]))
    lines = ["# Search", "", f"Objectives: {', '.join(f'{n} ({d})' for n, d in out['objectives'].items())}.",
             f"Fine-tuning epochs spent ({', '.join(b['stages'])}): {budget}; pruner: {b['pruner']}. "
             f"Study: `{out['storage']}`.", "",
             "| trial | state | overrides | " + " | ".join(names) + " | epochs | feasible | Pareto |",
             "|---|---|---|" + "---|" * len(names) + "---|---|---|"]
    for t in out["trials"]:
        vals = [f"{t['values'][n]:.3f}" if t["values"] else "–" for n in names]
        mark = "**yes**" if t["pareto"] else ""
        rec = " ⟵ recommended" if t["number"] == out["recommended"] else ""
        epochs = f"{t['epochs_trained']}/{t['epochs_full']}" if t.get("epochs_full") is not None else "0"
        lines.append(f"| {t['number']}{rec} | {_state(t)} | `{' '.join(t['overrides'])}` | " + " | ".join(vals) +
                     f" | {epochs} | {'yes' if t['feasible'] else 'no'} | {mark} |")
    lines += ["", "Epochs: trained / the trial's full schedule (a stage reused from the artifact cache trains none).",
              "", f"Recommended: `{out['reproduce']}`" if out["reproduce"] else f"Note: {out['note']}.", ""]
    for c in out.get("compare", []):
        g = c["grid_best"]
        best = (f"its best point `{g['point']}` {g['accuracy']:.2f}% at {g['speedup']:.2f}x" if g else "no point")
        lines += [f"Grid `{c['sweep']}` ({c['points']} points, {c['epochs']} fine-tuning epochs): {best}; "
                  f"the recommended trial {c['verdict']}.", ""]
    lines += ["![accuracy against speedup](search.png)", ""]
    return "\n".join(lines)
