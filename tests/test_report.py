"""Report logic: gates and the recommended artifact; the sweep summary reads job reports."""

from __future__ import annotations

import json
from types import SimpleNamespace

from pipeline.report import build_report, float_markdown, int8_markdown, kept_markdown, markdown_table
from pipeline.sweep import summarize


def _rows():
    def row(name, thr, acc):
        return {"name": name, "throughput_ips": thr, "accuracy": acc, "accuracy_delta_vs_baseline": acc - 50,
                "speedup_vs_baseline": thr / 100}

    return [row("baseline", 100, 50), row("fast", 190, 48), row("close", 185, 49.5), row("slow", 120, 50)]


def _gates(drop=None, speed=None):
    return SimpleNamespace(max_accuracy_drop=drop, min_speedup=speed)


def test_best_is_most_accurate_within_noise_of_the_fastest():
    assert build_report(_rows(), "baseline", {}, _gates())["best"] == "close"


def test_a_faster_row_losing_more_than_recommend_max_drop_is_named_not_chosen():
    cfg = SimpleNamespace(max_accuracy_drop=None, min_speedup=None, recommend_max_drop=0.2)
    rep = build_report(_rows(), "baseline", {}, cfg)
    assert rep["best"] == "slow" and not rep["gates"]["failures"] and rep["recommend_max_drop"] == 0.2
    assert rep["best_reason"].endswith("; fast is faster (1.90x) but loses 2.00 points, more than "
                                       "validate.recommend_max_drop=0.2")
    rows = [r for r in _rows() if r["name"] != "slow"]  # nothing close enough: the baseline, and why
    rep = build_report(rows, "baseline", {}, cfg)
    assert rep["best"] == "baseline" and "no compressed model" in rep["best_reason"] and "fast is faster" in \
        rep["best_reason"]


def test_gates_fail_with_reasons_and_can_leave_the_baseline_best():
    rep = build_report(_rows(), "baseline", {}, _gates(drop=0.2, speed=1.5))
    assert rep["best"] == "baseline" and "no compressed model" in rep["best_reason"]
    assert any("fast loses 2.00 points" in f for f in rep["gates"]["failures"])
    assert any("slow is 1.20x" in f for f in rep["gates"]["failures"])


def test_int8_slower_than_its_fp32_input_is_called_out():
    rows = _rows() + [{**_rows()[1], "name": "fast-int8", "throughput_ips": 171, "fp32_input": "fast"},
                      {**_rows()[1], "name": "slow-int8", "throughput_ips": 240, "fp32_input": "slow"}]
    rep = build_report(rows, "baseline", {}, _gates())
    assert [(p["name"], round(p["ratio"], 2)) for p in rep["int8_vs_fp32_input"]] == [("fast-int8", 0.9),
                                                                                        ("slow-int8", 2.0)]
    line = int8_markdown(rep)[0]
    assert "fast-int8 0.90x fast, slow-int8 2.00x slow" in line
    assert "fast-int8 is slower than fast on this CPU" in line and "slow-int8 is slower" not in line


def test_markdown_table_has_a_row_per_model():
    md = markdown_table(_rows(), [("name", "model", "{}"), ("accuracy", "top-1", "{:.1f}")])
    assert md.count("\n") == 5 and "| close | 49.5 |" in md


def test_sweep_summary_collects_every_job(tmp_path):
    for i, ratio in enumerate((0.3, 0.5)):
        job = tmp_path / f"{i}_prune.ratio={ratio}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra/overrides.yaml").write_text(f"- prune.ratio={ratio}\n")
        rows = [{"name": "baseline", "onnx": "a.onnx"}, {"name": "prune", "onnx": "b.onnx"}]
        (job / "report.json").write_text(json.dumps({"rows": rows, "best": "prune"}))
    s = summarize(tmp_path)
    assert [j["overrides"] for j in s["jobs"]] == [["prune.ratio=0.3"], ["prune.ratio=0.5"]]
    assert len(s["rows"]) == 4


def test_layers_pruning_kept_are_listed_by_reason():
    rows = _rows() + [{**_rows()[1], "name": "prune", "kept_unprunable": {
        "a.conv": "pruning it breaks the model (IndexError)", "b.conv": "pruning it breaks the model (IndexError)",
        "stem": "a slice of part of its channels follows"}}]
    assert kept_markdown(rows)[2] == ("- prune: pruning it breaks the model (IndexError): a.conv, b.conv; a slice of "
                                      "part of its channels follows: stem")
    assert kept_markdown(_rows()) == []


def test_what_stays_float_lists_the_rewrite_and_what_onnx_runtime_runs_on_dequantized_data():
    rows = [{"name": "baseline"}, {"name": "qat-int8", "float_ops": {"sum (no INT8 kernel in ONNX Runtime)": 8},
                                   "dequantized_ops": {"ReduceSum": 4, "Softmax": 4}},
            {"name": "ort-static-int8", "dequantized_ops": {"ReduceSum": 8}}]
    md = float_markdown(rows)
    assert md[2:4] == ["- qat-int8: sum (no INT8 kernel in ONNX Runtime) x8; ONNX Runtime runs float: ReduceSum x4, "
                       "Softmax x4", "- ort-static-int8: ONNX Runtime runs float: ReduceSum x8"]
    assert float_markdown([{"name": "qat-int8", "float_ops": {}, "dequantized_ops": {}}]) == []


def test_an_int8_row_on_another_runtime_that_falls_back_to_float_kernels_is_not_recommended():
    def row(name, model, runtime, thr, kernels, precision="int8"):
        return {"name": name, "model": model, "runtime": runtime, "precision": precision, "throughput_ips": thr,
                "accuracy": 50.0, "accuracy_delta_vs_baseline": 0.0, "speedup_vs_baseline": thr / 100,
                "int8_kernels": kernels}

    rows = [row("baseline", "baseline", "onnxruntime", 100, None, "fp32"), row("q", "q", "onnxruntime", 200, "10/10"),
            row("q@openvino", "q", "openvino", 300, "4/10")]
    gates = type("G", (), {"max_accuracy_drop": None, "min_speedup": None, "min_int8_coverage": 0.5})
    rep = build_report(rows, "baseline", {}, gates)
    assert rep["best"] == "q" and rep["gates"]["failures"] == [
        "q@openvino runs 4 of the 10 layers ONNX Runtime runs in INT8 as INT8 (validate.min_int8_coverage=0.5)"]
    rows[2]["int8_kernels"] = "5/10"
    assert build_report(rows, "baseline", {}, gates)["best"] == "q@openvino"
