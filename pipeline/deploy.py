"""Deployable ONNX: self-describing metadata, optional built-in preprocessing, and the run's bundle.

A bundle (``outputs/runs/<run>/deploy/``) holds the recommended model as ``model.onnx`` (and the FP32
baseline as ``baseline.onnx`` when the recommendation is another row), ``bundle.json``, a model card
and the composed config. Every ONNX file in it carries its own metadata (``metadata_props``), so
``python -m pipeline.predict`` needs nothing else.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

from pipeline.artifacts import atomic_write_bytes, atomic_write_text, write_json
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

# metadata_props keys (values are strings; lists and dicts as JSON)
META_CLASSES, META_MEAN, META_STD, META_SIZE = "classes", "mean", "std", "input_size"
META_RESIZE = "resize"  # {"mode": "squash" | "shorter", "crop_fraction": f}: how images reach input_size
META_LAYOUT, META_PRECISION, META_SOURCE = "input_layout", "precision", "source_stage"
META_ROW, META_COMMIT = "report_row", "git_commit"
META_RUNTIME = "runtime"  # {"name": "openvino", "options": {...}, "threads": 0, ...}: what validate measured it on
LAYOUT_FLOAT = "NCHW float32, normalised: (pixel / 255 - mean) / std"
LAYOUT_UINT8 = "NHWC uint8 RGB pixels (normalisation inside the graph)"
BUNDLE = "bundle.json"


def embed_preprocessing(src: Path, dst: Path, mean: list[float], std: list[float]) -> None:
    """Rewrite an ONNX classifier that takes normalised NCHW float32 into one that takes uint8 NHWC
    pixels: Cast -> Transpose -> Sub(mean * 255) -> Mul(1 / (std * 255)) in front of the old graph."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    old = g.input[0]
    dims = old.type.tensor_type.shape.dim
    n = dims[0].dim_param or (dims[0].dim_value or "batch")
    h, w = dims[2].dim_value, dims[3].dim_value
    pixels = "pixels"
    m = np.asarray(mean, np.float32).reshape(1, 3, 1, 1) * 255
    inv = 1.0 / (np.asarray(std, np.float32).reshape(1, 3, 1, 1) * 255)
    g.initializer.extend([numpy_helper.from_array(m.astype(np.float32), "pre_mean"),
                          numpy_helper.from_array(inv.astype(np.float32), "pre_inv_std")])
    nodes = [helper.make_node("Cast", [pixels], ["pre_float"], to=TensorProto.FLOAT, name="pre_cast"),
             helper.make_node("Transpose", ["pre_float"], ["pre_nchw"], perm=[0, 3, 1, 2], name="pre_nchw"),
             helper.make_node("Sub", ["pre_nchw", "pre_mean"], ["pre_centred"], name="pre_sub"),
             helper.make_node("Mul", ["pre_centred", "pre_inv_std"], [old.name], name="pre_scale")]
    new_nodes = nodes + list(g.node)
    del g.node[:]
    g.node.extend(new_nodes)
    g.input.remove(old)
    g.input.insert(0, helper.make_tensor_value_info(pixels, TensorProto.UINT8, [n, h, w, 3]))
    onnx.checker.check_model(model, full_check=True)
    atomic_write_bytes(dst, model.SerializeToString())


def write_metadata(src: Path, dst: Path, meta: dict[str, object]) -> None:
    """Copy an ONNX file, setting ``metadata_props`` (non-strings stored as JSON)."""
    import onnx

    model = onnx.load(str(src))
    keep = {p.key: p.value for p in model.metadata_props}
    keep.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    del model.metadata_props[:]
    for k, v in keep.items():
        model.metadata_props.add(key=k, value=v)
    atomic_write_bytes(dst, model.SerializeToString())


def read_metadata(path: Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (without loading the weights into memory twice)."""
    from pipeline import inference

    return inference.get().session(path, opt_level="disable").metadata


def model_card(rep: dict, chosen: dict, fallback: dict | None, classes: list[str], size: int,
               layout: str, reproduce: str, files: dict[str, str]) -> str:
    """Markdown: what the model is, how well and how fast it runs (from the report), how to call it."""
    env = rep["environment"]
    base = next(r for r in rep["rows"] if r["name"] == rep["baseline"])
    lines = [
        f"# Model card: {chosen['name']}", "",
        f"An image classifier for {len(classes)} classes ({', '.join(classes[:10])}"
        f"{', ...' if len(classes) > 10 else ''}), {chosen['precision'].upper()} ONNX, made by the "
        f"`{chosen['stage']}` stage of the compression pipeline.", "",
        "## How well and how fast", "",
        "| model | file | precision | top-1 % | Δ vs baseline | img/s | speedup | p50 ms (b=1) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r, f in ((chosen, files[chosen["name"]]), (fallback, files.get(fallback["name"]) if fallback else None)):
        if r is None or f is None:
            continue
        lines.append(f"| {r['name']} | `{f}` | {r['precision']} | {r['accuracy']:.2f} | "
                     f"{r['accuracy_delta_vs_baseline']:+.2f} | {r['throughput_ips']:.0f} | "
                     f"{r['speedup_vs_baseline']:.2f}x | {r['latency_ms_p50']:.2f} |")
    rt = chosen.get("runtime", "onnxruntime")
    version = (env.get("runtimes") or {}).get(rt, {}).get("version") or env["versions"].get(rt)
    settings = ", ".join(f"{k}={v}" for k, v in (chosen.get("runtime_options") or {}).items())
    lines += [
        "", f"Why this one: {rep['best_reason']}.", "",
        f"Runs on **{rt}**{f' ({settings})' if settings else ''}: `pipeline.predict` uses it (`--runtime` "
        "chooses another).", "",
        f"Measured with {rt} {version}"
        + (f" (the baseline: onnxruntime {env['versions'].get('onnxruntime')})" if rt != "onnxruntime" else "")
        + f" on {env['cpu']} ({env['cores']} cores, "
        f"{', '.join(env['flags']) or 'no SIMD flags read'}), throughput at batch {base['batch_size']}, "
        "medians of interleaved rounds; accuracy on the held-out test split.", "",
        "## How to call it", "",
        f"Input `{layout}`, {size}x{size} pixels (other sizes are resized first); output: one logit per class.",
        "", "```bash", "python -m pipeline.predict <this folder> <image or folder> --top-k 5", "```", "",
        "Class names, mean, std and the input size are stored in each ONNX file's `metadata_props`.", "",
        "## Reproduce", "", "```bash", reproduce, "```", "",
    ]
    return "\n".join(lines)


def runtime_of(row: dict, settings: dict | None = None) -> dict:
    """The runtime a report row was measured on and its session settings (what ``pipeline.predict`` uses)."""
    return {"name": row.get("runtime", "onnxruntime"), "precision": row["precision"],
            "options": row.get("runtime_options") or {}, **(settings or {})}


def write_bundle(out: Path, rep: dict, onnx_files: dict[str, Path], classes: list[str], mean: list[float],
                 std: list[float], size: int, config_yaml: str, reproduce: str, commit: str | None,
                 resize: dict | None = None, settings: dict | None = None) -> Path:
    """Write ``out`` (replacing it): the recommended row's ONNX and the baseline, with metadata and card, and
    for each the runtime it was measured on with its settings (``settings``: threads, graph optimisation)."""
    rows = {r["name"]: r for r in rep["rows"]}
    chosen = rows.get(rep["best"]) or rows[rep["baseline"]]
    fallback = rows[rep["baseline"]] if chosen["name"] != rep["baseline"] else None
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files: dict[str, str] = {}
    entries = {}
    for row, fname in ((chosen, "model.onnx"), (fallback, "baseline.onnx")):
        if row is None:
            continue
        src = onnx_files[row["name"]]
        layout = LAYOUT_UINT8 if src.name.endswith("_uint8.onnx") else LAYOUT_FLOAT
        meta = {META_CLASSES: classes, META_MEAN: mean, META_STD: std, META_SIZE: str(size), META_LAYOUT: layout,
                META_RESIZE: resize or {"mode": "squash", "crop_fraction": 1.0},
                META_PRECISION: row["precision"], META_SOURCE: row["stage"],
                META_ROW: {k: row[k] for k in ("name", "accuracy", "accuracy_delta_vs_baseline", "throughput_ips",
                                               "speedup_vs_baseline", "latency_ms_p50", "batch_size")},
                META_COMMIT: commit or "unknown", META_RUNTIME: runtime_of(row, settings)}
        write_metadata(src, tmp / fname, meta)
        files[row["name"]] = fname
        entries[fname] = {"row": row["name"], "precision": row["precision"], "input_layout": layout,
                          "accuracy": row["accuracy"], "speedup_vs_baseline": row["speedup_vs_baseline"],
                          "runtime": runtime_of(row, settings)}
    write_json(tmp / BUNDLE, {"recommended": "model.onnx", "fallback": "baseline.onnx" if fallback else None,
                              "models": entries, "classes": classes, "input_size": size, "mean": mean, "std": std})
    layout = entries["model.onnx"]["input_layout"]
    atomic_write_text(tmp / "MODEL_CARD.md", model_card(rep, chosen, fallback, classes, size, layout, reproduce,
                                                        files))
    atomic_write_text(tmp / "config.yaml", config_yaml)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def bundle_runtime(model: Path) -> dict | None:
    """The runtime (name, precision, options, threads, ...) the bundle next to ``model`` records for it, or None
    (a bare ONNX file, or a bundle written before runtimes were recorded)."""
    index = Path(model).parent / BUNDLE
    try:
        entry = json.loads(index.read_text())["models"][Path(model).name]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return entry.get("runtime") if isinstance(entry, dict) else None


def resolve_model(path: Path) -> Path:
    """A bundle folder (its recommended model), a folder with ``model.onnx``, or an ``.onnx`` file."""
    path = Path(path)
    if path.is_dir():
        if (path / BUNDLE).is_file():
            try:
                name = json.loads((path / BUNDLE).read_text())["recommended"]
                model = path / name
            except (ValueError, KeyError, TypeError) as e:
                raise PipelineError(f"{path / BUNDLE} is damaged ({type(e).__name__}); write the bundle again "
                                    "with python -m pipeline stage=validate") from None
            if not model.resolve().is_relative_to(path.resolve()):  # ../elsewhere.onnx, /abs/path, a link out
                raise PipelineError(f"{path / BUNDLE} recommends {name!r}, which lies outside the bundle folder; a "
                                    "bundle's models lie inside it: write the bundle again with python -m "
                                    "pipeline stage=validate, or give the .onnx file itself")
            return model
        if (path / "model.onnx").is_file():
            return path / "model.onnx"
        raise PipelineError(f"{path} holds no model ({BUNDLE} or model.onnx); give a bundle folder such as "
                            "outputs/runs/<run>/deploy or an .onnx file")
    if not path.is_file():
        raise PipelineError(f"{path} does not exist; give a bundle folder or an .onnx file")
    return path
