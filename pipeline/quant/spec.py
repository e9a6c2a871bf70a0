"""What the stage asks of the backend (``QuantSpec``) and how tensors are fake-quantized: weights per output channel
(symmetric), biases as INT32 on input x weight scale, activations per tensor (``ActQuant``: an observer,
``FixedQuant``: a fixed range, ``SharedQuant``: the grid of the tensor it was cut from); calibration and freezing
of the observers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

import pipeline.quant.onnx_ops  # noqa: F401  (registers torch.ops.qdq.*, which the export form calls)
from pipeline.errors import PipelineError


@dataclass
class QuantSpec:
    """What the stage asks of the backend (stored in the checkpoint to rebuild the model)."""

    act_dtype: Literal["uint8", "int8"]
    weight_bits: int  # 8, or 7 to avoid u8*s8 pair saturation on CPUs without VNNI
    ema: float  # observer moving-average constant during QAT (calibration uses min/max)
    float_layers: tuple[str, ...]  # module names (and everything inside them) kept in FP32
    # convs whose fused ReLU6 runs as ReLU (cross-layer equalization scales channels, which a fixed clip at 6 forbids)
    relu6_as_relu: tuple[str, ...] = ()
    target: Literal["onnxruntime", "openvino"] = "onnxruntime"  # the runtime whose placement rules apply

    def __post_init__(self) -> None:
        self.float_layers = tuple(self.float_layers)  # a list when read back from a checkpoint
        self.relu6_as_relu = tuple(self.relu6_as_relu)

    def keeping_fp32(self, names) -> QuantSpec:
        """The same spec with ``names`` kept in FP32 as well."""
        return dataclasses.replace(self, float_layers=(*self.float_layers, *names))


def _weight_qparams(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    qmax = 2 ** (bits - 1) - 1
    amax = w.detach().abs().amax(dim=tuple(range(1, w.dim())))
    scale = torch.clamp(amax / qmax, min=1e-8).float()
    return scale, torch.zeros_like(scale, dtype=torch.int32)


def quantize_bias(b: torch.Tensor | None, w: torch.Tensor, bits: int, in_quant: ActQuant | None):
    """INT32 bias with scale = input scale x weight scale, as ORT's QLinearConv/QGemm use it (STE)."""
    if b is None or in_quant is None or not in_quant.enabled:
        return b, None
    scale = _weight_qparams(w, bits)[0] * in_quant.scale
    q = torch.round(b.detach() / scale).clamp(-(2**31), 2**31 - 1)
    return b + (q * scale - b).detach(), (q.to(torch.int32), scale)


def fake_quant_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric fake-quant (values in [-(2^(bits-1)-1), 2^(bits-1)-1])."""
    scale, zp = _weight_qparams(w, bits)
    return torch.fake_quantize_per_channel_affine(w, scale, zp, 0, -128, 127)


class ActQuant(nn.Module):
    """Per-tensor activation observer + fake-quant (asymmetric UINT8 or symmetric INT8)."""

    def __init__(self, spec: QuantSpec):
        super().__init__()
        self.qmin, self.qmax = (0, 255) if spec.act_dtype == "uint8" else (-128, 127)
        self.ema = spec.ema
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.observe, self.calibrating, self.enabled, self.export_mode = True, False, False, False

    def _update(self, x: torch.Tensor) -> None:
        mn, mx = torch.aminmax(x.detach().float())
        if self.calibrating or not torch.isfinite(self.min_val):
            self.min_val.copy_(torch.minimum(self.min_val, mn) if torch.isfinite(self.min_val) else mn)
            self.max_val.copy_(torch.maximum(self.max_val, mx) if torch.isfinite(self.max_val) else mx)
        else:
            self.min_val.lerp_(mn, self.ema)
            self.max_val.lerp_(mx, self.ema)
        self._qparams()

    @torch.no_grad()
    def set_range(self, lo: float, hi: float) -> None:
        """Set the range (a percentile or MSE search instead of min/max) and the scale and zero point from it."""
        self.min_val.fill_(lo)
        self.max_val.fill_(hi)
        self._qparams()

    def _qparams(self) -> None:
        lo, hi = torch.clamp(self.min_val, max=0.0), torch.clamp(self.max_val, min=0.0)
        if self.qmin == 0:
            scale = torch.clamp((hi - lo) / 255.0, min=1e-8)
            self.scale.copy_(scale)
            self.zero_point.copy_(torch.clamp(torch.round(-lo / scale), 0, 255).to(torch.int32))
        else:
            self.scale.copy_(torch.clamp(torch.maximum(-lo, hi) / 127.0, min=1e-8))
            self.zero_point.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.export_mode and self.observe and (self.training or self.calibrating):
            self._update(x)
        return self.fake_quant(x)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on this observer's grid as it stands (no observing): QDQ in the export form."""
        if self.export_mode:
            return torch.ops.qdq.fake_quant(x, self.const_scale, self.const_zero_point, self.qmin, self.qmax)
        if not self.enabled:
            return x
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.qmin, self.qmax)


class FixedQuant(ActQuant):
    """Fake-quant of [0, hi] in 255 steps (no observer), read back ``out_factor`` times smaller.

    It clips like ReLU6 (ORT folds the Clip into the QuantizeLinear) and, with ``out_factor=1/6``, divides
    by 6 for free: the export is QuantizeLinear(scale) -> DequantizeLinear(scale * out_factor).
    """

    def __init__(self, spec: QuantSpec, hi: float, out_factor: float = 1.0):
        super().__init__(spec)
        self.out_factor = out_factor
        self.scale.fill_(hi / 255.0)
        self.zero_point.fill_(self.qmin)  # 0 -> the lowest code (uint8 0, int8 -128)
        self.min_val.fill_(0.0)
        self.max_val.fill_(hi)
        self.observe, self.enabled = False, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.export_mode:
            return torch.ops.qdq.requant(x, self.const_scale, self.const_zero_point, self.qmin, self.qmax,
                                         self.const_scale * self.out_factor)
        fq = torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.qmin, self.qmax)
        return fq * self.out_factor


class SharedQuant(nn.Module):
    """Fake-quant with the scale of ``source``, the ActQuant of the tensor this one was cut from.

    A slice of a quantized tensor (``qkv.unbind(0)[i]``, ``x.chunk(2, 1)[i]``) is already on its source's
    grid, so re-quantizing it with the same scale changes nothing, and the export's DequantizeLinear ->
    Gather/Slice/Split -> QuantizeLinear with equal parameters is what ORT drops to run the slice on INT8
    data (an own observer would give the slice its own scale and leave it float between DQ and Q).
    """

    def __init__(self, source: ActQuant):
        super().__init__()
        object.__setattr__(self, "source", source)  # not a submodule: its state lives where it is

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.source.fake_quant(x)  # a FixedQuant source reads back by 1 here (prepare_qat checks)


def act_quants(model: nn.Module) -> list[ActQuant]:
    return [m for m in model.modules() if isinstance(m, ActQuant)]


@torch.no_grad()
def calibrate(model: nn.Module, batches) -> int:
    """Run real batches through the observers (min/max), then switch fake-quant on."""
    aqs = act_quants(model)
    for a in aqs:
        a.calibrating = True
    model.eval()
    n = 0
    for xb, _ in batches:
        model(xb)
        n += 1
    if n == 0:
        raise PipelineError("the QAT calibration set is empty; raise qat.calib_batches or check the data")
    for a in aqs:
        a.calibrating, a.enabled = False, True
    return n


def freeze_observers(model: nn.Module) -> None:
    for a in act_quants(model):
        a.observe = False
