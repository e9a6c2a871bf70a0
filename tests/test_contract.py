"""The stage contract: registered stages, one-way imports, defaults only in YAML, keys that follow what
changes an artifact, checks only for stages that run."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from pipeline.data import DataConfig
from pipeline.errors import PipelineError
from pipeline.models import ModelConfig
from pipeline.runner import RootConfig, Runner, stage_registry
from pipeline.stage import Stage
from pipeline.training import FitConfig
from tests.conftest import CONF

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions (lazy imports hide circles too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def test_stages_import_no_other_stage_and_not_the_runner():
    for path in sorted((ROOT / "stages").glob("*.py")):
        if path.name == "__init__.py":
            continue
        bad = {m for m in _imports(path) if m == "stages" or m.startswith("stages.") or
               m.startswith(("pipeline.runner", "pipeline.__main__", "pipeline.sweep"))}
        assert not bad, f"{path.name} imports {bad}"


def test_pipeline_below_the_runner_imports_no_stage():
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        if path.name in ("runner.py", "__main__.py", "search.py"):  # the runner and the entry points above it
            continue
        bad = {m for m in _imports(path) if m == "stages" or m.startswith(("stages.", "pipeline.runner"))}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_only_the_runtime_modules_import_onnxruntime():
    """Inference goes through pipeline.inference; ONNX Runtime is one runtime module and its quantizer wrapper."""
    allowed = {"pipeline/inference/ort.py", "pipeline/inference/ort_quantize.py"}
    for path in sorted([*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "stages").glob("*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if rel in allowed or rel.startswith("pipeline/tools/"):
            continue
        bad = {m for m in _imports(path) if m.split(".")[0] == "onnxruntime"}
        assert not bad, f"{rel} imports {bad}; go through pipeline.inference"


def test_only_the_openvino_runtime_module_imports_openvino():
    """OpenVINO is optional: one runtime module imports it, behind the guard that names the pip extra."""
    for path in sorted([*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "stages").glob("*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "pipeline/inference/openvino.py" or rel.startswith("pipeline/tools/"):
            continue
        bad = {m for m in _imports(path) if m.split(".")[0] == "openvino"}
        assert not bad, f"{rel} imports {bad}; go through pipeline.inference"


def test_only_the_tracker_modules_import_their_libraries():
    """Experiment tracking goes through pipeline.tracking; each backend's library is imported by its module only."""
    tb = "pipeline/tracking/tensorboard_tracker.py"
    allowed = {"mlflow": "pipeline/tracking/mlflow_tracker.py", "tensorboard": tb, "torch.utils.tensorboard": tb}
    for path in sorted([*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "stages").glob("*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        for m in _imports(path):
            lib = next((k for k in allowed if m == k or m.startswith(k + ".")), None)
            assert lib is None or allowed[lib] == rel, f"{rel} imports {m}; go through pipeline.tracking"


def test_no_import_cycles_in_the_project():
    files = [*ROOT.joinpath("pipeline").rglob("*.py"), *ROOT.joinpath("stages").glob("*.py")]
    mods = {_module(p): p for p in files}
    graph = {m: {i for i in _imports(p) if i in mods and i != m} for m, p in mods.items()}
    graph["stages"] = set()  # its registry discovers the stage modules at run time, not by import

    def visit(m: str, stack: list[str]) -> None:
        assert m not in stack, "import cycle: " + " -> ".join([*stack, m])
        for n in graph[m]:
            visit(n, [*stack, m])

    for m in graph:
        visit(m, [])


def test_families_import_only_the_registries_and_their_libraries():
    """A model family is one module of pipeline/families/ that registers hooks: it imports the registries
    (``pipeline.families``, which re-exports the building blocks families need), torch / torchvision / timm and
    the standard library, never ``pipeline.quant`` or ``pipeline.pruning`` internals, so the core stays the one
    place that knows how to quantize or prune."""
    import sys

    allowed_roots = {"torch", "torchvision", "timm", "__future__"} | set(sys.stdlib_module_names)
    for path in sorted((ROOT / "pipeline" / "families").glob("*.py")):
        if path.name == "__init__.py":
            continue
        bad = set()
        for m in _imports(path):
            if m == "pipeline" or m == "pipeline.families":
                continue
            if m.startswith("pipeline.families.") and m.removeprefix("pipeline.families.").count(".") == 0 and \
                    not (ROOT / "pipeline" / "families" / f"{m.rsplit('.', 1)[1]}.py").exists():
                continue  # a name the registry module exports (from pipeline.families import X)
            if m.split(".")[0] not in allowed_roots:
                bad.add(m)
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    registry = _imports(ROOT / "pipeline" / "families" / "__init__.py")
    assert not {m for m in registry if m.startswith(("pipeline.quant", "pipeline.pruning"))}


def test_every_stage_module_registers_a_stage_with_its_yaml():
    registry = stage_registry()
    modules = {p.stem for p in (ROOT / "stages").glob("*.py") if p.name != "__init__.py"}
    assert modules == set(registry), "a module in stages/ without STAGE = Stage(...) (or the reverse)"
    config = (Path(CONF) / "config.yaml").read_text()
    for name, st in registry.items():
        assert isinstance(st, Stage) and st.name == name
        assert (Path(CONF) / "stages" / f"{name}.yaml").is_file(), name
        assert f"stages@{name}: {name}" in config, f"conf/config.yaml does not compose stages@{name}"


def _bound_classes() -> list[type]:
    return [RootConfig, DataConfig, ModelConfig, FitConfig, *(st.config for st in stage_registry().values())]


@pytest.mark.parametrize("cls", _bound_classes(), ids=lambda c: f"{c.__module__}.{c.__name__}")
def test_defaults_live_only_in_yaml(cls):
    """Dataclasses bound to config sections declare types, never values: the YAML is the one source."""
    with_default = [f.name for f in dataclasses.fields(cls)
                    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
    assert not with_default, f"{cls.__name__} has defaults for {with_default}; put them in conf/ only"


def test_gates_and_node_switches_reuse_artifacts(cfg_factory, tmp_path):
    a = Runner(cfg_factory(), tmp_path)
    b = Runner(cfg_factory("export.min_top1_agreement=50", "export.min_int8_coverage=0.9", "export.fp16=[train]",
                           "validate.min_speedup=3", "validate.max_accuracy_drop=0.5", "data.download=true"),
               tmp_path)
    for node in ["train", "prune", "distill", "qat", *a.expand("export")]:
        assert a.key(node) == b.key(node), node
    assert "export/train_fp16" in b.expand("export") and "export/train_fp16" not in a.expand("export")


def test_settings_that_change_a_model_change_its_key_and_everything_downstream(cfg_factory, tmp_path):
    a = Runner(cfg_factory(), tmp_path)
    b = Runner(cfg_factory("export.parity_images=32"), tmp_path)
    assert a.key("train") == b.key("train") and a.key("export/train") != b.key("export/train")
    c = Runner(cfg_factory("distill.alpha=0.5"), tmp_path)
    assert a.key("prune") == c.key("prune") and a.key("distill") != c.key("distill")
    assert a.key("qat") != c.key("qat") and a.key("export/train") == c.key("export/train")


def test_amp_is_in_the_key_where_it_changes_training(cfg_factory, tmp_path):
    off = Runner(cfg_factory("amp=off"), tmp_path)
    auto = Runner(cfg_factory("amp=auto"), tmp_path)
    bf16 = Runner(cfg_factory("amp=bf16"), tmp_path)
    # on CPU auto means off: the same model, the same artifact; bf16 autocast trains another model
    assert off.key("train") == auto.key("train") and off.key("train") != bf16.key("train")
    assert off.key("export/train") != bf16.key("export/train")
    assert Runner(cfg_factory("channels_last=off"), tmp_path).key("train") != off.key("train")


def test_checks_run_only_for_stages_that_will_run(cfg_factory, tmp_path):
    Runner(cfg_factory("stage=train", "prune.ratio=2", "prune.exclude=[nope]", "qat.weight_bits=4"), tmp_path)
    with pytest.raises(PipelineError, match=r"prune\.ratio: 2\.0 must be in \[0, 1\)"):
        Runner(cfg_factory("stage=prune", "prune.ratio=2"), tmp_path)
    with pytest.raises(PipelineError, match=r"prune\.exclude: no layer named 'nope'"):
        Runner(cfg_factory("stage=distill", "prune.exclude=[nope]"), tmp_path)  # prune runs upstream
    Runner(cfg_factory("pipeline=[train,export,validate]", "prune.exclude=[nope]", "qat.float_layers=[x]"),
           tmp_path)


def test_qat_source_outside_the_pipeline_is_built_upstream_not_swapped(cfg_factory, tmp_path):
    r = Runner(cfg_factory("stage=distill", "pipeline=[train,export]"), tmp_path)
    assert r.inputs("distill") == {"teacher": "train", "student": "prune"}
    r = Runner(cfg_factory("pipeline=[train,qat,export,validate]"), tmp_path)
    assert r.inputs("qat")["model"] == "distill"
    assert r.inputs("export/ort_static") == {"model": "export/distill"}


def test_export_gates_judge_the_stored_metrics():
    from pipeline.results import ExportResult
    from stages.export import Config
    from stages.export import gate as gate_result

    def gate(cfg, node, metrics):
        kind = "ort_static" if node.endswith("ort_static") else "int8"
        return gate_result(cfg, node, ExportResult.from_metrics({"kind": kind, **metrics}))

    cfg = Config(opset=18, parity_images=8, min_top1_agreement=99.0, min_int8_coverage=0.5,
                 ort_static_reference=True, calib_images=8, fp16=[], embed_preprocessing=False)
    good = {"parity": {"top1_agreement": 99.5},
            "int8_coverage": {"int8_kernels": 10, "quantized_layers": 10, "float_ops": {}}}
    assert gate(cfg, "export/qat", good) == []
    bad = {"parity": {"top1_agreement": 98.0},
           "int8_coverage": {"int8_kernels": 4, "quantized_layers": 10, "float_ops": {"Conv": 6}}}
    failures = gate(cfg, "export/qat", bad)
    assert len(failures) == 2 and "only 4 of the 10 quantized" in failures[0] and "98.00%" in failures[1]
    assert gate(cfg, "export/ort_static", bad) == []  # the reference row is reported, never gated
    attention = {"parity": {"top1_agreement": 99.5},  # 8 INT8 kernels, but 4 are attention matmuls, no layers
                 "int8_coverage": {"int8_kernels": 8, "activation_matmuls": 4, "quantized_layers": 10,
                                   "float_ops": {"Gemm": 6}}}
    assert "only 4 of the 10 quantized" in gate(cfg, "export/qat", attention)[0]
    # placed for OpenVINO: its kernels and its parity are judged on OpenVINO too
    placed = {**good, "target": "openvino", "target_coverage": good["int8_coverage"],
              "target_parity": {"top1_agreement": 83.2}}
    failures = gate(cfg, "export/ptq", placed)
    assert len(failures) == 1 and failures[0].startswith("export/ptq: openvino (qat.target) agrees with PyTorch on "
                                                         "only 83.20%"), failures
