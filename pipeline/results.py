"""Typed results that stages publish and downstream stages read.

A stage declares the result it publishes (``Stage(result=ExportResult, ...)``); its ``run`` returns that
dataclass (or a plain dict of metrics), the runner writes it to ``metrics.json``, and a downstream stage
reads ``ctx.inputs[role].result`` as fields instead of looking keys up by name. ``from_metrics`` also reads
``metrics.json`` files written before a field existed (missing fields are ``None``), so reused artifacts
keep working.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

R = TypeVar("R", bound="Result")


@dataclass
class Result:
    """Base of every published result: a typed view of ``metrics.json``."""

    extra: dict[str, Any] = field(default_factory=dict, repr=False, kw_only=True)  # keys without a field

    @classmethod
    def from_metrics(cls: type[R], metrics: dict) -> R:
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs: dict[str, Any] = {}
        for name in names:
            value = metrics.get(name)
            nested = _result_type(hints[name])
            kwargs[name] = nested.from_metrics(value) if nested and isinstance(value, dict) else value
        return cls(**kwargs, extra={k: v for k, v in metrics.items() if k not in names})

    def to_metrics(self) -> dict:
        """The ``metrics.json`` form: fields that are set (``None`` left out), then the extra keys."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or value is None:
                continue
            out[f.name] = value.to_metrics() if isinstance(value, Result) else value
        return {**out, **self.extra}


def _result_type(tp: Any) -> type[Result] | None:
    """``Parity`` or ``Parity | None`` -> ``Parity``; anything else -> None."""
    for t in (tp, *typing.get_args(tp)):
        if isinstance(t, type) and issubclass(t, Result):
            return t
    return None


def _field(**kw: Any) -> Any:
    return field(default=None, **kw)


@dataclass
class ModelResult(Result):
    """What a model stage (train, prune, distill) publishes: accuracy and size of its PyTorch model."""

    test_acc: float | None = _field()  # top-1 % on the test split (PyTorch)
    params: int | None = _field()
    macs: int | None = _field()  # at batch 1, of the float architecture
    kept_unprunable: Any = _field()  # prune: layers Torch-Pruning could not prune correctly, kept whole


@dataclass
class QatResult(ModelResult):
    """The qat stage's result: the model it quantized and how (weight bits and placement, resolved once)."""

    source: str | None = _field()  # the stage whose model was quantized
    weight_bits: int | None = _field()  # 7 or 8, resolved from qat.weight_bits (auto: by the CPU)
    weight_bits_reason: str | None = _field()  # why, e.g. "auto: this CPU has avx512_vnni"
    placement_summary: str | None = _field()  # qat.float_layers=[measure]: the chosen placement, one line
    target: str | None = _field()  # the runtime the quantizers were placed for (qat.target)

    @classmethod
    def from_metrics(cls, metrics: dict) -> QatResult:
        out = super().from_metrics(metrics)
        if out.weight_bits is None:  # stored inside "quant" (the QuantSpec) and "placement" by the qat stage
            out.weight_bits = (metrics.get("quant") or {}).get("weight_bits")
        if out.placement_summary is None:
            out.placement_summary = (metrics.get("placement") or {}).get("summary")
        if out.target is None:
            out.target = (metrics.get("quant") or {}).get("target", "onnxruntime")
        return out

    @property
    def weight_bits_note(self) -> str | None:
        """The report's line: ``8-bit (auto: this CPU has avx512_vnni)``."""
        if self.weight_bits is None or self.weight_bits_reason is None:
            return None
        return f"{self.weight_bits}-bit ({self.weight_bits_reason})"


@dataclass
class Parity(Result):
    """An exported model against its reference on real test images."""

    images: int | None = _field()
    max_abs_diff: float | None = _field()
    top1_agreement: float | None = _field()  # %
    reference: str | None = _field()  # what it was compared with when not the PyTorch model ("fp32 onnx")


@dataclass
class ExportResult(Result):
    """What an ``export/<node>`` publishes and validate reads: one ONNX model and its checks."""

    source: str | None = _field()  # the node whose model was exported
    kind: str | None = _field()  # fp32 | int8 (QDQ from QAT) | fp16 | ort_static (ORT's own quantizer)
    precision: str | None = _field()  # fp32 | int8 | fp16
    opset: int | None = _field()
    fp32_input: str | None = _field()  # INT8 rows: the model stage the INT8 model was quantized from
    weight_bits: str | None = _field()  # INT8 from QAT: "8-bit (why)"
    placement: str | None = _field()  # INT8 from QAT with a measured placement: its summary
    quantize_seconds: float | None = _field()  # INT8 rows: wall time of the quantization (qat / ptq stage, ORT's)
    kept_unprunable: Any = _field()
    params: int | None = _field()
    macs: int | None = _field()
    size_mb: float | None = _field()
    parity: Parity | None = _field()
    int8_coverage: dict | None = _field()  # ONNX Runtime's kernel coverage (INT8 rows)
    target: str | None = _field()  # INT8 placed for another runtime (qat.target): its name
    target_coverage: dict | None = _field()  # and that runtime's kernel coverage, which the gate checks
    target_parity: Parity | None = _field()  # and that runtime's parity with PyTorch, which the gate checks too
    float_ops: dict | None = _field()  # INT8 from QAT: what stayed float, and why, with counts
    preprocessing_parity: Parity | None = _field()  # export.embed_preprocessing: uint8-input model vs float

    @classmethod
    def from_metrics(cls, metrics: dict) -> ExportResult:
        out = super().from_metrics(metrics)
        if out.kind is None:  # metrics.json written before kinds were published
            reference = out.parity.reference if out.parity else None
            out.kind = "ort_static" if reference == "fp32 onnx" else out.precision
        return out
