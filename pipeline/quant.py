"""Quantization backend: the only module that knows how fake-quantization is done.

The QAT model is a ``torch.fx`` rewrite of the float model: conv-bn(-relu) become ``QConvBn``
(BN folded into per-channel symmetric fake-quantized weights, BN statistics live until frozen),
linears become ``QLinear``, and an ``ActQuant`` (observer + per-tensor fake-quant, UINT8 by
default) follows every tensor that ONNX Runtime's QDQ fusion needs quantized. Ops ORT has no INT8
kernel for are rewritten into ops it has where possible (Hardswish -> ``QHardSwish``, self-attention ->
``SelfAttention``, SiLU -> Sigmoid x), and slices of a quantized tensor keep its scale (``SharedQuant``).
Only plain ``torch.fake_quantize_*`` ops are used (no ``torch.ao.quantization``). For export, ``to_deploy``
turns weights into INT8 buffers behind ``qdq::dequantize_per_channel`` and activations into
``qdq::fake_quant``; ``onnx_translations`` maps both to ONNX QuantizeLinear/DequantizeLinear with
onnxscript, so ORT fuses the graph into QLinearConv / QLinearAdd / QGemm kernels.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import io
import logging
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torchvision.ops import StochasticDepth, stochastic_depth

from pipeline.errors import PipelineError, first_line
from pipeline.models import STD_CONVS, HeadAttention, inside, is_plain_mha, replace_module
from pipeline.pruning import grouped_reasons

log = logging.getLogger(__name__)


@dataclass
class QuantSpec:
    """What the stage asks of the backend (stored in the checkpoint to rebuild the model)."""

    act_dtype: Literal["uint8", "int8"]
    weight_bits: int  # 8, or 7 to avoid u8*s8 pair saturation on CPUs without VNNI
    ema: float  # observer moving-average constant during QAT (calibration uses min/max)
    float_layers: tuple[str, ...]  # module names (and everything inside them) kept in FP32

    def __post_init__(self) -> None:
        self.float_layers = tuple(self.float_layers)  # a list when read back from a checkpoint

    def keeping_fp32(self, names) -> QuantSpec:
        """The same spec with ``names`` kept in FP32 as well."""
        return dataclasses.replace(self, float_layers=(*self.float_layers, *names))


# ---------------------------------------------------------------- choices that depend on the CPU

REWRITE = 7  # version of what prepare_qat quantizes where (in the qat stage's key: a change rebuilds QAT models;
# 2: branches on tensor sizes traced, attention scores float into a float softmax; 3: parameters read by an
# Add / Mul quantized where that makes it INT8, x ** 2 as x * x, weight standardisation and BEiT biases folded;
# 4: sums over short dimensions as adds, stacks as concatenations, Conv1d quantized, an expand before a
# broadcasting Add / Mul dropped, reshapes / transposes / max pools on their input's grid (SharedQuant);
# 5: F.conv2d with a fixed weight as a conv (BlurPool), reflect / replicate pads on their input's grid, a layer
# behind F.dropout quantizes its bias on its input's scale, Python numbers in Add / Mul / Div / Sub as quantized
# constants; 6: buffers followed as traced values after a warm-up call (ConViT's GPSA), tensors computed from
# the model's constants alone kept float; 7: BatchNorm1d folded into the linear layer before or after it,
# reshape_as / view_as on their input's grid)

NARROW_CONV = 16  # x86 ORT runs INT8 convs with fewer output channels on im2col + GEMM, slower than FP32


def int8_dot_product() -> str | None:
    """Why this CPU has INT8 dot-product kernels (ARM, or x86 with VNNI/AMX), or None (x86 without them)."""
    import platform

    from pipeline.onnxio import cpu_info

    if platform.machine().lower() in ("aarch64", "arm64"):
        return "ARM dot-product kernels do not saturate"
    found = set(cpu_info()["flags"]) & {"avx512_vnni", "avx_vnni", "amx_int8"}
    return f"this CPU has {', '.join(sorted(found))}" if found else None


def resolve_weight_bits(setting: int | str) -> tuple[int, str]:
    """``qat.weight_bits`` (7, 8 or auto) -> bits and why. u8 x s8 products summed in pairs saturate int16 on
    x86 without VNNI with full 8-bit weights (ORT's reduce_range); VNNI and ARM dot products do not."""
    if setting != "auto":
        return int(setting), f"qat.weight_bits={setting}"
    why = int8_dot_product()
    if why:
        return 8, f"auto: {why}"
    return 7, "auto: no VNNI, so 7-bit weights avoid int16 saturation of u8 x s8 pairs"


def narrow_convs(model: nn.Module) -> list[str]:
    """``qat.float_layers=[auto]``: where convs whose INT8 kernel is slower than FP32 on this CPU (x86 without
    VNNI: fewer than 16 output channels, where ORT's fast symmetric INT8 conv does not apply) stay FP32.

    A lone float conv between DequantizeLinear and QuantizeLinear does not stay FP32 in ONNX Runtime: its
    WeightBiasQuantization pass quantizes it per tensor (untrained for, so accuracy drops). So each narrow
    conv is widened to its smallest enclosing module with at least two convs (a residual or inverted-
    residual block); a top-level conv (the stem, fed by the model input) stays itself.
    """
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86") or int8_dot_product():
        return []  # ARM, and x86 with VNNI/AMX: narrow INT8 convs are not slower (measured: 2.19x all-INT8 vs
        # 1.65x with the narrow ResNet-20 blocks FP32 on an AVX-512 VNNI EPYC)
    conv_modules = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    convs = [n for n, _ in conv_modules]
    narrow = [n for n, m in conv_modules if m.out_channels < NARROW_CONV]
    out: list[str] = []
    for name in narrow:
        while "." in name and sum(inside(c, (name,)) for c in convs) < 2:
            name = name.rsplit(".", 1)[0]
        if not inside(name, tuple(out)):
            out = [o for o in out if not o.startswith(name + ".")] + [name]
    return out


# ---------------------------------------------------------------- custom ops (export form)


@torch.library.custom_op("qdq::fake_quant", mutates_args=())
def _fake_quant_op(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)  # same math as in QAT


@_fake_quant_op.register_fake
def _(x, scale, zero_point, qmin, qmax):
    return torch.empty_like(x)


@torch.library.custom_op("qdq::dequantize_per_channel", mutates_args=())
def _dequant_op(w_q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * w_q.dim()
    shape[axis] = -1
    return (w_q.to(torch.float32) - zero_points.to(torch.float32).view(shape)) * scales.view(shape)


@_dequant_op.register_fake
def _(w_q, scales, zero_points, axis):
    return torch.empty(w_q.shape, dtype=torch.float32, device=w_q.device)


@torch.library.custom_op("qdq::requant", mutates_args=())
def _requant_op(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int,
                out_scale: float) -> torch.Tensor:
    fq = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)  # same math as in QAT
    return fq * (out_scale / scale)


@_requant_op.register_fake
def _(x, scale, zero_point, qmin, qmax, out_scale):
    return torch.empty_like(x)


@torch.library.custom_op("qdq::dequantize", mutates_args=())
def _dequant_tensor_op(q: torch.Tensor, scale: float, zero_point: int, qmin: int) -> torch.Tensor:
    return (q.to(torch.float32) - zero_point) * scale


@_dequant_tensor_op.register_fake
def _(q, scale, zero_point, qmin):
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


def onnx_translations() -> dict:
    """onnxscript translations of the custom ops to QuantizeLinear / DequantizeLinear."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    def zero_point_of(zero_point: int, qmin: int):  # UINT8 or INT8, as the activations are
        return op.Cast(op.Constant(value_int=zero_point), to=ir.DataType.UINT8 if qmin >= 0 else ir.DataType.INT8)

    def fake_quant(x, scale: float, zero_point: int, qmin: int, qmax: int):
        s, zp = op.Constant(value_float=scale), zero_point_of(zero_point, qmin)
        return op.DequantizeLinear(op.QuantizeLinear(x, s, zp), s, zp)

    def dequant(w_q, scales, zero_points, axis: int):
        return op.DequantizeLinear(w_q, scales, zero_points, axis=axis)

    def requant(x, scale: float, zero_point: int, qmin: int, qmax: int, out_scale: float):
        zp = zero_point_of(zero_point, qmin)
        return op.DequantizeLinear(op.QuantizeLinear(x, op.Constant(value_float=scale), zp),
                                   op.Constant(value_float=out_scale), zp)

    def dequant_tensor(q, scale: float, zero_point: int, qmin: int):
        return op.DequantizeLinear(q, op.Constant(value_float=scale), zero_point_of(zero_point, qmin))

    return {torch.ops.qdq.fake_quant.default: fake_quant, torch.ops.qdq.dequantize_per_channel.default: dequant,
            torch.ops.qdq.requant.default: requant, torch.ops.qdq.dequantize.default: dequant_tensor}


# ---------------------------------------------------------------- QAT modules


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


class NormGrad(nn.Module):
    """A LayerNorm / GroupNorm on a fake-quantized input, in training: its value on the quantized input, its
    gradient from the unquantized one (the straight-through estimate carried through the norm).

    Where quantization leaves a row constant (a class token far smaller than the tensor's range), the norm's
    gradient there is 1 / sqrt(eps), a thousandfold per norm: QAT diverged (CoaT). ``to_deploy`` drops it.
    """

    def forward(self, quantized: torch.Tensor, unquantized: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return quantized
        return unquantized + (quantized - unquantized).detach()


class QHardSwish(nn.Module):
    """Hardswish ``x * relu6(x + 3) / 6`` (or its gate, Hardsigmoid ``relu6(x + 3) / 6``) on ORT INT8 kernels.

    The 3 is a quantized constant behind DequantizeLinear (so ``x + 3`` is a QLinearAdd), ReLU6 is the
    range of the requantization that follows and /6 its read-back scale (``FixedQuant``), and the product
    with ``x`` is a QLinearMul. Left whole, ORT runs Hardswish in float between DequantizeLinear and
    QuantizeLinear.
    """

    def __init__(self, spec: QuantSpec, gate_only: bool):
        super().__init__()
        self.gate_only, self.export_mode = gate_only, False
        self.gate = FixedQuant(spec, 6.0, 1.0 / 6.0)
        qmin, qmax = self.gate.qmin, self.gate.qmax  # 3.0 = the top code, zero point the lowest code
        self.register_buffer("three_q", torch.tensor(qmax, dtype=torch.uint8 if qmin == 0 else torch.int8),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.export_mode:
            qmin, qmax = self.gate.qmin, self.gate.qmax
            three = torch.ops.qdq.dequantize(self.three_q, 3.0 / (qmax - qmin), qmin, qmin)
        else:
            three = x.new_tensor(3.0)
        g = self.gate(F.relu6(x + three))
        return g if self.gate_only else x * g


def _split_qkv(weight: torch.Tensor, bias: torch.Tensor | None, q_scale: float) -> tuple[nn.Linear, ...]:
    """q, k and v linears from one fused projection (rows q | k | v), the attention scale folded into q, so
    each is its own QLinear (one INT8 MatMul) and no float slicing sits between them."""
    e, r = weight.shape[1], weight.shape[0] // 3  # input width, rows per projection (heads x head width)
    out = []
    with torch.no_grad():
        for i, f in enumerate((q_scale, 1.0, 1.0)):
            lin = nn.Linear(e, r, bias=bias is not None)
            lin.weight.copy_(weight[i * r : (i + 1) * r] * f)
            if bias is not None:
                lin.bias.copy_(bias[i * r : (i + 1) * r] * f)
            out.append(lin)
    return tuple(out)


class SelfAttention(nn.Module):
    """Self-attention (``nn.MultiheadAttention`` in a ViT, a pruned one's ``HeadAttention``, timm's plain
    ``Attention``), written in ops that ``torch.fx`` traces, and called as the module it replaces.

    Left whole, ``nn.MultiheadAttention`` is one opaque float op between DequantizeLinear and QuantizeLinear.
    Unrolled, the q/k/v/out projections become ``QLinear`` (INT8 MatMul in ORT; q, k and v separate, so no
    float slicing of a fused qkv output), ``q @ k^T`` an INT8 matmul with float output (MatMulIntegerToFloat), the
    softmax float (ORT's QLinearSoftmax is several times slower) with its output quantized to [0, 1), and ``attn @
    v`` QLinearMatMul. The softmax scale is folded into q's weights. Same outputs as the module (``need_weights``
    is ignored: the weights are not returned).
    """

    def __init__(self, mod: nn.Module):
        super().__init__()
        self.timm = _is_timm_attention(mod)  # called as timm's Attention: attn(x) -> x
        if isinstance(mod, HeadAttention) or self.timm:
            weight, bias, scale, self.out_proj = mod.qkv.weight, mod.qkv.bias, mod.scale, mod.proj
        else:
            weight, bias, scale, self.out_proj = mod.in_proj_weight, mod.in_proj_bias, mod.head_dim**-0.5, mod.out_proj
        self.num_heads, self.head_dim = mod.num_heads, mod.head_dim
        self.dropout = float(mod.attn_drop.p if self.timm else mod.dropout)
        self.proj_drop = mod.proj_drop if self.timm else nn.Identity()
        self.q, self.k, self.v = _split_qkv(weight, bias, scale)

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                key_padding_mask=None, need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None] | torch.Tensor:
        if attn_mask is not None or is_causal or key_padding_mask is not None:
            raise PipelineError("attention with a mask cannot be quantized here; keep it FP32 with "
                                "qat.float_layers=[<its module name>]")
        x = query
        shape = (x.shape[0], x.shape[1], self.num_heads, self.head_dim)
        q = self.q(x).reshape(shape).transpose(1, 2)  # (b, h, n, d)
        k = self.k(x).reshape(shape).permute(0, 2, 3, 1)  # (b, h, d, n)
        v = self.v(x).reshape(shape).transpose(1, 2)
        attn = torch.matmul(q, k).softmax(dim=-1)
        if self.dropout and self.training:
            attn = F.dropout(attn, self.dropout)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(x.shape[0], x.shape[1], self.num_heads * self.head_dim)
        if self.timm:
            return self.proj_drop(self.out_proj(out))
        return self.out_proj(out), None


_TIMM_ATTENTION = ("timm.layers.attention", "timm.models.vision_transformer")  # its module, now and in older timm


def _is_timm_attention(mod: nn.Module) -> bool:
    """timm's plain ``Attention`` (ViT, DeiT): one ``qkv`` linear, no q/k norms, no gate. Other timm classes named
    Attention (BEiT's position bias, LeViT, EfficientFormer, PVT) compute more and keep their explicit path."""
    return type(mod).__name__ == "Attention" and type(mod).__module__ in _TIMM_ATTENTION \
        and all(isinstance(getattr(mod, n, nn.Identity()), nn.Identity) for n in ("q_norm", "k_norm", "norm")) \
        and getattr(mod, "gate", None) is None and isinstance(getattr(mod, "qkv", None), nn.Linear)


def window_attention_bias(attn: torch.Tensor, table: torch.Tensor, index: torch.Tensor, mask: torch.Tensor | None,
                          n_windows: int) -> torch.Tensor:
    """Swin's relative position bias (and shifted-window mask) added to q @ k^T: float between
    DequantizeLinear and QuantizeLinear (the mask's -100 would leave the logits few INT8 steps)."""
    _, heads, n, _ = attn.shape
    bias = table[index].view(n, n, heads).permute(2, 0, 1)
    if mask is None:
        return attn + bias
    return (attn.view(-1, n_windows, heads, n, n) + (bias + mask.unsqueeze(1))).view(-1, heads, n, n)


torch.fx.wrap("window_attention_bias")  # one node in the traced graph


class WindowAttention(nn.Module):
    """torchvision's ``ShiftedWindowAttention`` (Swin) for one input size, written in ops that ``torch.fx`` traces.

    Left whole it is one opaque float function. Here padding, the cyclic shift and the window partition
    are one token gather (and its inverse after the projection), q/k/v/proj become ``QLinear``, q @ k^T and
    attn @ v QLinearMatMul; the position bias + shift mask and softmax input stay float. Same outputs as the
    module for inputs of ``hw`` (height, width).
    """

    def __init__(self, swa: nn.Module, hw: tuple[int, int]):
        super().__init__()
        (ws0, ws1), h = swa.window_size, swa.num_heads
        c = swa.qkv.in_features
        H, W = hw
        hp, wp = H + (ws0 - H % ws0) % ws0, W + (ws1 - W % ws1) % ws1
        s0 = 0 if ws0 >= hp else swa.shift_size[0]  # as torchvision: no shift when one window covers the map
        s1 = 0 if ws1 >= wp else swa.shift_size[1]
        self.hw, self.c, self.heads, self.n = hw, c, h, ws0 * ws1
        self.n_windows = (hp // ws0) * (wp // ws1)
        self.pad = (hp, wp) != (H, W)
        self.q, self.k, self.v = _split_qkv(swa.qkv.weight, swa.qkv.bias, (c // h) ** -0.5)
        self.proj = swa.proj
        self.relative_position_bias_table = swa.relative_position_bias_table
        self.register_buffer("relative_position_index", swa.relative_position_index.clone(), persistent=False)
        # token of the (padded, shifted) map at every windowed position; H * W is the zero padding token
        src = torch.full((hp, wp), H * W, dtype=torch.long)
        src[:H, :W] = torch.arange(H * W).view(H, W)
        src = torch.roll(src, shifts=(-s0, -s1), dims=(0, 1))
        idx = src.view(hp // ws0, ws0, wp // ws1, ws1).permute(0, 2, 1, 3).reshape(-1)
        real = idx < H * W
        inv = torch.empty(H * W, dtype=torch.long)
        inv[idx[real]] = torch.arange(idx.numel())[real]
        self.register_buffer("token_index", idx, persistent=False)
        self.register_buffer("inverse_index", inv, persistent=False)
        mask = None
        if s0 or s1:  # torchvision's shifted-window mask: -100 between tokens from different regions
            region = torch.zeros(hp, wp)
            count = 0
            for hs in ((0, -ws0), (-ws0, -s0), (-s0, None)):
                for wsl in ((0, -ws1), (-ws1, -s1), (-s1, None)):
                    region[hs[0] : hs[1], wsl[0] : wsl[1]] = count
                    count += 1
            region = region.view(hp // ws0, ws0, wp // ws1, ws1).permute(0, 2, 1, 3).reshape(self.n_windows, -1)
            diff = region.unsqueeze(1) - region.unsqueeze(2)
            mask = torch.zeros_like(diff).masked_fill(diff != 0, -100.0)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (H, W), c, n, h = self.hw, self.c, self.n, self.heads
        t = x.reshape(-1, H * W, c)
        if self.pad:
            t = F.pad(t, (0, 0, 0, 1))  # the zero token the padded positions read
        t = torch.index_select(t, 1, self.token_index).reshape(-1, n, c)
        q = self.q(t).reshape(-1, n, h, c // h).transpose(1, 2)
        k = self.k(t).reshape(-1, n, h, c // h).permute(0, 2, 3, 1)
        v = self.v(t).reshape(-1, n, h, c // h).transpose(1, 2)
        attn = window_attention_bias(torch.matmul(q, k), self.relative_position_bias_table,
                                     self.relative_position_index, self.mask, self.n_windows)
        out = torch.matmul(attn.softmax(dim=-1), v).transpose(1, 2).reshape(-1, n, c)
        out = self.proj(out).reshape(-1, self.n_windows * n, c)
        return torch.index_select(out, 1, self.inverse_index).reshape(-1, H, W, c)


def _is_window_attention(mod: nn.Module) -> bool:
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    return type(mod) is ShiftedWindowAttention  # not V2 (cosine attention, a position MLP)


def _unroll_attention(model: nn.Module, float_layers: tuple[str, ...], image_size: int) -> nn.Module:
    """A copy of ``model`` with its self-attention ``nn.MultiheadAttention`` modules (batch_first, no extra
    k/v), pruned ones (``HeadAttention``) and timm's plain ``Attention`` replaced by ``SelfAttention``, Swin's
    window attention by ``WindowAttention`` (for the input sizes an ``image_size`` image gives it) and other
    timm attention on its explicit path (q @ k^T, softmax, @ v) instead of SDPA; ``model`` itself when there
    is none (the caller's float model is kept)."""
    names = [n for n, m in model.named_modules()
             if (getattr(m, "fused_attn", False) is True or is_plain_mha(m) or isinstance(m, HeadAttention)
                 or _is_window_attention(m) or _is_timm_attention(m))
             and not inside(n, float_layers)]
    if not names:
        return model
    model = copy.deepcopy(model)
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: sizes.__setitem__(n, tuple(i[0].shape[1:3])))
        for n in names if _is_window_attention(model.get_submodule(n))]
    if hooks:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
        for hook in hooks:
            hook.remove()
    for name in names:
        mod = model.get_submodule(name)
        if isinstance(mod, (nn.MultiheadAttention, HeadAttention)) or _is_timm_attention(mod):
            replace_module(model, name, SelfAttention(mod))
        elif _is_window_attention(mod):
            replace_module(model, name, WindowAttention(mod, sizes[name]))
        else:
            mod.fused_attn = False
    return model


def _is_split_qkv_bias(m: nn.Module) -> bool:
    """timm's BEiT / EVA attention: a bias-free ``qkv`` linear and q / v biases concatenated on every call."""
    return (isinstance(getattr(m, "qkv", None), nn.Linear) and m.qkv.bias is None
            and isinstance(getattr(m, "q_bias", None), torch.Tensor) and isinstance(getattr(m, "v_bias", None),
                                                                                    torch.Tensor))


def plain_layers(model: nn.Module, float_layers: tuple[str, ...]) -> nn.Module:
    """A copy of ``model`` whose layers that compute their weights from other parameters on every call hold
    those weights instead, as BN folds into a conv (same outputs; QAT then fine-tunes the folded weights):
    weight-standardised convs (timm's ``StdConv2d`` family: BiT, NFNet, ViT hybrids) become plain convs, and
    BEiT / EVA attention's q / v biases the ``qkv`` linear's bias (they ran ``F.linear`` on its weight). fx
    would trace that arithmetic and leave the conv or linear float. ``model`` itself when there is none."""

    names = [n for n, m in model.named_modules() if (type(m).__name__ in STD_CONVS or _is_split_qkv_bias(m))
             and not inside(n, float_layers)]
    if not names:
        return model
    model = copy.deepcopy(model)
    for name in names:
        mod = model.get_submodule(name)
        if _is_split_qkv_bias(mod):
            k_bias = mod.k_bias if isinstance(getattr(mod, "k_bias", None), torch.Tensor) else \
                torch.zeros_like(mod.v_bias)
            mod.qkv.bias = nn.Parameter(torch.cat((mod.q_bias, k_bias, mod.v_bias)).detach().clone())
            mod.q_bias = mod.k_bias = mod.v_bias = None  # its forward then calls the qkv linear
            continue
        gain = (mod.gain * mod.scale).view(-1) if hasattr(mod, "gain") else None
        with torch.no_grad():
            weight = F.batch_norm(mod.weight.reshape(1, mod.out_channels, -1), None, None, weight=gain,
                                  training=True, momentum=0.0, eps=mod.eps).reshape_as(mod.weight)
        if getattr(mod, "same_pad", False):  # 'SAME' padding from the input size: fixed later for this size
            from timm.layers import Conv2dSame

            conv: nn.Conv2d = Conv2dSame(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, 0,
                                         mod.dilation, mod.groups, mod.bias is not None)
        else:
            conv = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                             mod.dilation, mod.groups, mod.bias is not None)
        with torch.no_grad():
            conv.weight.copy_(weight)
            if mod.bias is not None:
                conv.bias.copy_(mod.bias)
        conv.train(mod.training)
        replace_module(model, name, conv)
    return model


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


class QConvBn(nn.Module):
    """Conv2d or Conv1d (+ BatchNorm folded into the fake-quantized weight) (+ ReLU/ReLU6)."""

    def __init__(self, conv: nn.Conv2d | nn.Conv1d, bn: nn.BatchNorm2d | None, act: nn.Module | None, spec: QuantSpec,
                 shift: float = 0.0):
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, act
        self.shift = shift  # added to the output before the activation (Hardsigmoid = ReLU6(y + 3) / 6)
        self.bits = spec.weight_bits
        self.bn_frozen = False
        object.__setattr__(self, "in_quant", None)  # the ActQuant feeding it (not a submodule)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = self.conv.weight, self.conv.bias
        if self.bn is None:
            if self.shift:
                b = (b if b is not None else w.new_zeros(w.shape[0])) + self.shift
            return w, b
        bn = self.bn
        sf = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = (b if b is not None else torch.zeros_like(bn.running_mean)) - bn.running_mean
        return w * sf.reshape(-1, 1, 1, 1), bias * sf + bn.bias + self.shift

    def _conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        c = self.conv
        if isinstance(c, SamePadConv2d):
            x = F.pad(x, c.same_pad)
        conv = F.conv1d if w.dim() == 3 else F.conv2d  # ECA's gate: a Conv1d across the channels
        return conv(x, w, b, c.stride, c.padding, c.dilation, c.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is not None and self.training and not self.bn_frozen:
            # Jacob et al. 2018: quantize weights folded with running stats, then let BN see the
            # unscaled conv output so it keeps learning batch statistics.
            bn = self.bn
            sf = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            # a zero BN weight (timm's zero-init of a block's last BN) would make the division 0/0: that
            # channel's conv runs unscaled, so BN still sees its output and its weight still gets a gradient
            sf = torch.where(sf == 0, torch.ones_like(sf), sf)
            y = self._conv(x, fake_quant_weight(self.conv.weight * sf.reshape(-1, 1, 1, 1), self.bits), None)
            y = y / sf.reshape(1, -1, 1, 1)
            if self.conv.bias is not None:
                y = y + self.conv.bias.reshape(1, -1, 1, 1)
            y = bn(y) + self.shift
        else:
            w, b = self.folded()
            y = self._conv(x, fake_quant_weight(w, self.bits), quantize_bias(b, w, self.bits, self.in_quant)[0])
        return self.act(y) if self.act is not None else y


class QLinear(nn.Module):
    def __init__(self, linear: nn.Linear, spec: QuantSpec):
        super().__init__()
        self.linear, self.bits = linear, spec.weight_bits
        object.__setattr__(self, "in_quant", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.linear.weight
        return F.linear(x, fake_quant_weight(w, self.bits), quantize_bias(self.linear.bias, w, self.bits,
                                                                          self.in_quant)[0])


class DeployConv(nn.Module):
    """Export form: INT8 weights and INT32 bias (scale = input scale x weight scale) behind DequantizeLinear."""

    def __init__(self, q: QConvBn | QLinear):
        super().__init__()
        if isinstance(q, QConvBn):
            w, b = q.folded()
            c = q.conv
            self.kw = dict(stride=c.stride, padding=c.padding, dilation=c.dilation, groups=c.groups)
            self.act = q.act
            self.same_pad = c.same_pad if isinstance(c, SamePadConv2d) else None
        else:
            w, b, self.kw, self.act, self.same_pad = q.linear.weight, q.linear.bias, None, None, None
        scale, zp = _weight_qparams(w, q.bits)
        shape = (-1,) + (1,) * (w.dim() - 1)
        w_fq = torch.fake_quantize_per_channel_affine(w.detach(), scale, zp, 0, -128, 127)  # exactly QAT's values
        self.register_buffer("w_q", torch.round(w_fq / scale.view(shape)).clamp(-128, 127).to(torch.int8))
        self.register_buffer("w_scale", scale)
        self.register_buffer("w_zp", torch.zeros(len(scale), dtype=torch.int8))
        self.register_buffer("b_q", None)
        self.register_buffer("b_scale", None)
        self.register_buffer("b_zp", None)
        self.register_buffer("bias", None)
        _, qb = quantize_bias(b, w, q.bits, q.in_quant)
        if qb is not None:  # INT32 bias: what ORT's QLinearConv / QGemm consume
            self.b_q, self.b_scale = qb[0], qb[1].detach().float()
            self.b_zp = torch.zeros_like(self.b_q)
        elif b is not None:
            self.bias = b.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.ops.qdq.dequantize_per_channel(self.w_q, self.w_scale, self.w_zp, 0)
        b = self.bias
        if self.b_q is not None:
            b = torch.ops.qdq.dequantize_per_channel(self.b_q, self.b_scale, self.b_zp, 0)
        if self.kw is None:
            return F.linear(x, w, b)
        if self.same_pad is not None:
            x = F.pad(x, self.same_pad)  # ONNX Runtime folds it into QLinearConv's pads
        y = (F.conv1d if w.dim() == 3 else F.conv2d)(x, w, b, **self.kw)
        return self.act(y) if self.act is not None else y


# ---------------------------------------------------------------- graph rewrite


# Coverage is a table, as in ONNX Runtime's quantizer registry: the ops below get an ActQuant on their output
# (ORT fuses DequantizeLinear -> op -> QuantizeLinear into an INT8 kernel, or moves the QDQ pair through
# shape-only ops); Hardswish/Hardsigmoid become Add + Mul on quantized tensors (QHardSwish), SiLU Sigmoid * x, a
# BatchNorm after no conv a depthwise QConvBn, a sum over a short dimension adds of its slices, a stack a concat.
# Every other op (GELU, LayerNorm, Swin's position bias, anything unknown) stays float between DequantizeLinear
# and QuantizeLinear; `float_ops(gm)` lists them.
_ACTS = (nn.ReLU, nn.ReLU6)  # fused into the conv before them
_PASS_MODULES = (nn.Dropout, nn.Identity, StochasticDepth)  # no op in the exported (eval) graph
_QUANT_AFTER_MODULES = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.Flatten, nn.ReLU, nn.ReLU6,
                        nn.Sigmoid, nn.LeakyReLU)
_ADD = {operator.add, torch.add, operator.iadd}
_MUL = {operator.mul, torch.mul, operator.imul}  # SE gates: QLinearMul
_MATMUL = {torch.matmul, operator.matmul}  # attention's q @ k^T and attn @ v: QLinearMatMul
_SOFTMAX = {F.softmax, torch.softmax}  # and the method .softmax
_QUANT_AFTER_FUNCS = {torch.flatten, F.relu, torch.relu, F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d,
                      torch.cat, torch.sigmoid, F.sigmoid, F.leaky_relu, torch.permute, torch.transpose,
                      torch.reshape, torch.squeeze, torch.unsqueeze, F.softmax,
                      torch.softmax, torch.index_select} | _ADD | _MUL | _MATMUL
_IDENTITY_FUNCS = {stochastic_depth, F.dropout, torch.dropout}  # identities in the exported (eval) graph
_PASS_FUNCS = {getattr} | _IDENTITY_FUNCS
_QUANT_AFTER_METHODS = {"view", "reshape", "flatten", "relu", "mean", "permute", "transpose", "squeeze",
                        "unsqueeze", "contiguous", "sigmoid", "mul", "add", "matmul", "softmax", "reshape_as",
                        "view_as"}
_PASS_METHODS = {"size", "dim"}
_MOVE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous", "permute", "transpose",
                 "reshape_as", "view_as"}
_MOVE_FUNCS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
               F.max_pool2d}  # with _MOVE_METHODS and _MOVE_MODULES: outputs hold input values (SharedQuant)
_MOVE_MODULES = (nn.MaxPool2d, nn.Flatten)
_CAST_METHODS = {"float", "to", "type_as", "type"}  # no op where the dtype stays (EfficientViT's attention)
_SPLIT_METHODS = {"chunk", "split", "unbind", "tensor_split"}  # tuples of slices, then getitem
_SPLIT_FUNCS = {torch.chunk, torch.split, torch.unbind, torch.tensor_split}


_NORM_ACT = ("BatchNormAct2d",)  # timm: BatchNorm2d + activation in one module (split so conv-BN folds)
_MAX_UNTRACEABLE = 64  # modules fx cannot trace that are kept FP32 before giving up
_SAID_UNTRACEABLE: set[tuple[str, tuple[str, ...], tuple[str, ...]]] = set()  # (model, untraceable, size-traced)
_SAME = ("Conv2dSame", "MaxPool2dSame", "AvgPool2dSame")  # timm's TensorFlow 'SAME' padding, computed per call
# library functions that write into a tensor in place (fx cannot trace `x[...] = y`): one float op in the graph
_WHOLE_FUNCTIONS = (("timm.models.mvitv2", "cal_rel_pos_type"),)  # MViTv2's relative positions added to q @ k^T


def _whole_functions() -> tuple[Callable, ...]:
    """The functions of ``_WHOLE_FUNCTIONS`` whose library is installed."""
    import importlib

    found = []
    for module, name in _WHOLE_FUNCTIONS:
        with contextlib.suppress(ImportError):
            if callable(fn := getattr(importlib.import_module(module), name, None)):
                found.append(fn)
    return tuple(found)


_SHAPE_ATTRS = {"shape", "ndim", "device", "dtype", "is_cuda"}  # what a tensor says about itself, not its data
_SHAPE_METHODS = {"size", "dim", "numel", "get_device"}
_UNKNOWN = object()  # a concrete value the tracer could not compute


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping timm's BatchNormAct2d (split later into BN + activation) and Linear whole;
    ``failed_in`` names the innermost module whose tracing raised (for the error message).

    Given an ``example`` input, every traced value is also computed on it, so a Python branch on a tensor's
    *size* (MobileViT: ``if new_h != H``; EfficientViT: ``if H == ws``) takes the branch this input size takes,
    as a size-specialised export does; ``specialized`` lists where. A branch on tensor *values* still raises.
    """

    failed_in: tuple[str, str] | None = None  # (qualified name, class name)

    def __init__(self, untraceable: set[str] = frozenset(), example: torch.Tensor | None = None):
        super().__init__(autowrap_functions=_whole_functions())
        self.untraceable = untraceable  # modules called whole (they stay FP32)
        self.example = example
        self.values: dict[fx.Node, object] = {}  # node -> its value on the example input
        self.static: set[fx.Node] = set()  # nodes whose value follows from tensor sizes only
        self.specialized: dict[str, str] = {}  # module -> the class whose code branched on a size
        self.evaluating = False  # inside a leaf module's concrete call (fx's patches must stand aside)
        # with an example, buffers are graph values too, so code on their sizes is followed like code on any
        # tensor's (ConViT: ``self.rel_indices.expand(B, -1, -1, -1)``)
        self.proxy_buffer_attributes = example is not None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:  # nn.Linear subclasses (timm's) -> QLinear
        return type(m).__name__ in _NORM_ACT + _SAME or isinstance(m, nn.Linear) or \
            qualname in self.untraceable or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        if self.evaluating:  # computing a leaf module's value: run it, do not trace it
            return forward(*args, **kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = (self.path_of_module(m), type(m).__name__)
            raise

    def getattr(self, attr: str, attr_val, parameter_proxy_cache: dict):
        return attr_val if self.evaluating else super().getattr(attr, attr_val, parameter_proxy_cache)

    # ---- concrete values (only with an example input)
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _SizedProxy(node, self) if self.example is not None else super().proxy(node)

    def value(self, a):
        """``a`` with every proxy replaced by its value on the example (``_UNKNOWN`` where there is none)."""
        if isinstance(a, fx.proxy.Attribute) and a._node is None:
            root = self.value(a.root)
            return _UNKNOWN if root is _UNKNOWN else getattr(root, a.attr, _UNKNOWN)
        if isinstance(a, fx.Proxy):
            return self.values.get(a.node, _UNKNOWN)
        if isinstance(a, (tuple, list)):
            return type(a)(self.value(x) for x in a)
        if isinstance(a, dict):
            return {k: self.value(v) for k, v in a.items()}
        if isinstance(a, slice):
            return slice(self.value(a.start), self.value(a.stop), self.value(a.step))
        return a

    def is_static(self, a) -> bool:
        """Whether ``a`` follows from tensor sizes and constants only (safe to specialise on)."""
        if isinstance(a, fx.proxy.Attribute) and a._node is None:
            return a.attr in _SHAPE_ATTRS or self.is_static(a.root)
        if isinstance(a, fx.Proxy):
            return a.node in self.static
        if isinstance(a, (tuple, list)):
            return all(self.is_static(x) for x in a)
        if isinstance(a, dict):
            return all(self.is_static(x) for x in a.values())
        return not isinstance(a, torch.Tensor)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if self.example is None:
            return proxy
        node = proxy.node
        self.evaluating = True
        try:
            with torch.no_grad():
                if kind == "placeholder":
                    val = self.example if not any(n.op == "placeholder" for n in self.values) else _UNKNOWN
                elif kind == "get_attr":
                    val = operator.attrgetter(target)(self.root)
                else:
                    a, kw = self.value(args), self.value(kwargs)
                    if any(v is _UNKNOWN for v in _flat((a, kw))):
                        val = _UNKNOWN
                    elif kind == "call_function":
                        val = target(*a, **kw)
                    elif kind == "call_method":
                        val = getattr(a[0], target)(*a[1:], **kw)
                    else:
                        val = self.root.get_submodule(target)(*a, **kw)
        except Exception:
            val = _UNKNOWN
        finally:
            self.evaluating = False
        self.values[node] = val
        if val is not _UNKNOWN and not isinstance(val, torch.Tensor) and kind in ("call_function", "call_method"):
            shape_query = (kind == "call_method" and target in _SHAPE_METHODS) or \
                (target is getattr and args[1] in _SHAPE_ATTRS)
            if shape_query or self.is_static((args, kwargs)):
                self.static.add(node)
        return proxy

    def concrete(self, obj: fx.Proxy, what: str):
        """The value of ``obj`` on the example input, where it follows from sizes only; else fx's error."""
        if self.example is None or not self.is_static(obj) or (val := self.value(obj)) is _UNKNOWN:
            raise fx.proxy.TraceError(f"symbolically traced variables cannot be used as inputs to {what}")
        self.specialized.setdefault(self.scope.module_path, (self.scope.module_type or type(self.root)).__name__)
        return val

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.concrete(obj, "control flow"))

    def iter(self, obj: fx.Proxy):
        n = len(self.concrete(obj, "iteration"))  # a size: iterate its elements as graph values (batch stays dynamic)
        return iter([obj[i] for i in range(n)])


def _calls(node: fx.Node, funcs: set, method: str) -> bool:
    """Whether ``node`` calls one of ``funcs`` or the tensor method ``method`` (``torch.matmul`` / ``x.matmul``)."""
    return (node.op == "call_function" and node.target in funcs) or (node.op == "call_method" and node.target == method)


def _flat(a) -> list:
    out: list = []
    fx.node.map_aggregate(a, out.append)
    return out


class _SizedProxy(fx.Proxy):
    """A proxy that converts to a Python number where its value follows from tensor sizes (see ``_Tracer``)."""

    def __getattr__(self, k: str):
        return _SizedAttribute(self, k)

    def __len__(self) -> int:
        return len(self.tracer.concrete(self, "len()"))

    def __int__(self) -> int:
        return int(self.tracer.concrete(self, "int()"))

    def __index__(self) -> int:
        return operator.index(self.tracer.concrete(self, "an index"))

    def __float__(self) -> float:
        return float(self.tracer.concrete(self, "float()"))

    def __ceil__(self) -> int:
        return math.ceil(self.tracer.concrete(self, "math.ceil"))

    def __floor__(self) -> int:
        return math.floor(self.tracer.concrete(self, "math.floor"))


class _SizedAttribute(fx.proxy.Attribute, _SizedProxy):
    """``x.device.type`` and the like: a string where the code needs one (``torch.autocast(device_type=...)``)."""

    def __getattr__(self, k: str):
        if k == "type" and isinstance(val := self.tracer.value(self), torch.device):
            return val.type
        return _SizedAttribute(self, k)


def _softmax_modules_as_calls(gm: fx.GraphModule) -> None:
    """``nn.Softmax`` modules (DaViT's, Swin V2's) -> ``F.softmax`` calls, which the rest treats as softmax."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(m := gm.get_submodule(node.target), nn.Softmax) and \
                m.dim is not None:
            with gm.graph.inserting_after(node):
                call = gm.graph.call_function(F.softmax, node.args[:1], {"dim": m.dim})
            node.replace_all_uses_with(call)
            gm.graph.erase_node(node)


def _split_norm_act(gm: fx.GraphModule) -> None:
    """timm's BatchNormAct2d -> a plain BatchNorm2d (same state dict keys) followed by its activation."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(mod := gm.get_submodule(node.target)).__name__ not in _NORM_ACT:
            continue
        bn = nn.BatchNorm2d(mod.num_features, mod.eps, mod.momentum, mod.affine, mod.track_running_stats)
        bn.load_state_dict(mod.state_dict(), strict=False)
        bn.train(mod.training)
        gm.add_submodule(node.target, bn)
        last = node
        for part in ("drop", "act"):
            sub_mod = getattr(mod, part, None)
            if sub_mod is None or isinstance(sub_mod, nn.Identity):
                continue
            name = f"{node.target.replace('.', '_')}_{part}"
            gm.add_submodule(name, sub_mod)
            with gm.graph.inserting_after(last):
                new = gm.graph.call_module(name, (last,))
            last.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)
            new.meta = dict(node.meta)
            last = new
    gm.recompile()


class SamePadConv2d(nn.Conv2d):
    """A Conv2d after a fixed zero pad, possibly one row/column more after than before (TensorFlow's 'SAME'
    for one input size, or a pad the model's code applies). ONNX Runtime folds the Pad into the Conv
    (asymmetric pads), also into QLinearConv."""

    def __init__(self, conv: nn.Conv2d, pad: tuple[int, int, int, int]):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                         conv.groups, conv.bias is not None)
        self.load_state_dict(conv.state_dict())
        self.same_pad = pad  # F.pad order: left, right, top, bottom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.same_pad))


class _SamePadPool(nn.Module):
    """timm's MaxPool2dSame / AvgPool2dSame for one input size (float in ONNX Runtime: a -inf Pad)."""

    def __init__(self, pool: nn.Module, pad: tuple[int, int, int, int]):
        super().__init__()
        self.pool, self.same_pad = pool, pad
        self.value = -float("inf") if isinstance(pool, nn.MaxPool2d) else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.pad(x, self.same_pad, value=self.value))


def _static_same_padding(gm: fx.GraphModule) -> bool:
    """timm's 'SAME' convs and pools (padding computed from the input size on every call, which fx cannot
    trace) -> the same layer with the fixed padding of the input size this graph saw (state dict keys
    unchanged; the conv folds with its BN like any other). True if anything changed."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(mod := gm.get_submodule(node.target)).__name__ not in _SAME:
            continue
        k, st, dil = (tuple(v) if isinstance(v, (tuple, list)) else (v, v)
                      for v in (mod.kernel_size, mod.stride, getattr(mod, "dilation", 1)))
        if isinstance(mod, nn.Conv2d):
            k = tuple(mod.weight.shape[-2:])
        ph, pw = (max((-(-n // s_) - 1) * s_ + (k_ - 1) * d + 1 - n, 0)
                  for n, k_, s_, d in zip(node.args[0].meta["tensor_meta"].shape[-2:], k, st, dil, strict=True))
        pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
        if isinstance(mod, nn.Conv2d):
            new: nn.Module = SamePadConv2d(mod, pad)
        else:
            pool = nn.MaxPool2d(k, st, 0, dil, ceil_mode=mod.ceil_mode) if isinstance(mod, nn.MaxPool2d) else \
                nn.AvgPool2d(k, st, 0, ceil_mode=mod.ceil_mode, count_include_pad=True)
            new = _SamePadPool(pool, pad)
        new.train(mod.training)
        gm.add_submodule(node.target, new)
        changed = True
    if changed:
        gm.recompile()
    return changed


def _fold_zero_pads(gm: fx.GraphModule) -> bool:
    """A zero pad whose only user is a conv (HGNetV2's stem pads one row and column after) becomes part of that
    conv (``SamePadConv2d``), so ORT folds it into QLinearConv instead of running it float between DQ and Q.
    True if anything changed."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is F.pad and len(node.args) == 2 and \
                node.kwargs.get("mode", "constant") == "constant" and not node.kwargs.get("value"):
            pad = node.args[1]
        elif node.op == "call_module" and isinstance(m := gm.get_submodule(node.target), nn.ZeroPad2d):
            pad = m.padding
        else:
            continue
        conv = _only_user(node)
        if not (isinstance(pad, (tuple, list)) and len(pad) == 4 and all(isinstance(p, int) and p >= 0 for p in pad)
                and conv is not None and conv.op == "call_module" and conv.args[:1] == (node,)
                and type(mod := gm.get_submodule(conv.target)) in (nn.Conv2d, SamePadConv2d)
                and mod.padding_mode == "zeros" and not isinstance(mod.padding, str)):
            continue
        own = mod.same_pad if isinstance(mod, SamePadConv2d) else (mod.padding[1],) * 2 + (mod.padding[0],) * 2
        new = SamePadConv2d(mod, tuple(a + b for a, b in zip(pad, own, strict=True)))
        new.train(mod.training)
        gm.add_submodule(conv.target, new)
        conv.replace_input_with(node, node.args[0])
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.recompile()
    return changed


def _functional_convs(gm: fx.GraphModule) -> bool:
    """``F.conv2d(x, w, b, ...)`` with ``w`` (and ``b``) a parameter or buffer of the model (a fixed filter:
    timm's BlurPool2d) -> an ``nn.Conv2d`` holding them, which ``_fuse_convs`` then quantizes (a QLinearConv
    instead of a float Conv between DequantizeLinear and QuantizeLinear). True if anything changed."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (F.conv2d, torch.conv2d):
            continue
        a = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
        a.update(zip(("input", "weight", "bias", "stride", "padding", "dilation", "groups"), node.args, strict=False))
        a.update(node.kwargs)
        given = [t for t in (a.get("weight"), a["bias"]) if t is not None]
        if not (isinstance(a.get("weight"), fx.Node) and not isinstance(a["padding"], str) and
                all(isinstance(t, fx.Node) and t.op == "get_attr" for t in given)):
            continue
        weight, bias = (operator.attrgetter(t.target)(gm) if t is not None else None for t in (a["weight"], a["bias"]))
        if weight.dim() != 4:
            continue
        conv = nn.Conv2d(weight.shape[1] * a["groups"], weight.shape[0], tuple(weight.shape[2:]), a["stride"],
                         a["padding"], a["dilation"], a["groups"], bias=bias is not None)
        with torch.no_grad():
            conv.weight.copy_(weight)
            if bias is not None:
                conv.bias.copy_(bias)
        trained = any(isinstance(t, nn.Parameter) and t.requires_grad for t in (weight, bias))
        conv.requires_grad_(trained)  # a buffer (a fixed filter) stays fixed in QAT
        _call_instead(gm, node, conv, "conv", a["input"])
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return changed


def _call_instead(gm: fx.GraphModule, node: fx.Node, module: nn.Module, kind: str, x: fx.Node) -> None:
    """``node`` replaced by a call of ``module`` (registered as ``<node>_<kind>``) on ``x``."""
    name = f"{node.name}_{kind}"
    gm.add_submodule(name, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, (x,))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _parameter_matmuls(gm: fx.GraphModule) -> bool:
    """``x @ w`` with ``w`` a 2-D parameter of the model (SwiftFormer's attention weights) -> an ``nn.Linear``
    holding ``w.T``, which ``_fuse_convs`` then quantizes (a float MatMul between DequantizeLinear and
    QuantizeLinear before). True if anything changed."""
    changed = False
    for node in list(gm.graph.nodes):
        if not (_calls(node, _MATMUL, "matmul") and len(node.args) == 2 and
                isinstance(w := node.args[1], fx.Node) and w.op == "get_attr"):
            continue
        weight = operator.attrgetter(w.target)(gm)
        if not (isinstance(weight, nn.Parameter) and weight.dim() == 2):
            continue
        linear = nn.Linear(*weight.shape, bias=False)
        with torch.no_grad():
            linear.weight.copy_(weight.T)
        _call_instead(gm, node, linear, "linear", node.args[0])
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return changed


def _scalar_operands(gm: fx.GraphModule, is_float: Callable[[fx.Node], bool]) -> bool:
    """``x * c``, ``x + c``, ``x / c`` and ``x - c`` with ``c`` a Python number -> ``x * t`` / ``x + t`` with ``t``
    a constant of the model (a buffer): then ``t`` gets its own quantizer where ``x`` is INT8 (as a parameter an
    Add / Mul reads does), so ORT runs QLinearMul / QLinearAdd; with ``c`` a float initializer it ran the op
    float between DequantizeLinear and QuantizeLinear (MobileNetV4's and EfficientViT-M's ``q * scale``).
    True if anything changed."""
    graph, changed, count = gm.graph, False, 0
    ops = {**dict.fromkeys(_ADD, "add"), **dict.fromkeys(_MUL, "mul"), operator.truediv: "div", operator.sub: "sub"}
    for node in list(graph.nodes):
        op = ops.get(node.target) if node.op == "call_function" else None
        if op is None or len(node.args) != 2 or node.kwargs or is_float(node):
            continue
        x, c = node.args
        if op in ("add", "mul") and isinstance(x, (int, float)):
            x, c = c, x  # c + x, c * x
        meta = x.meta.get("tensor_meta") if isinstance(x, fx.Node) else None
        if not (isinstance(c, (int, float)) and not isinstance(c, bool) and isinstance(meta, TensorMetadata)
                and meta.dtype.is_floating_point) or c == 0:  # a zero: no range to quantize on
            continue
        value = 1.0 / c if op == "div" else -c if op == "sub" else c
        while hasattr(gm, f"_scalar_{count}"):
            count += 1
        name = f"_scalar_{count}"
        gm.register_buffer(name, torch.tensor(float(value), dtype=meta.dtype), persistent=False)
        with graph.inserting_before(node):
            const = graph.get_attr(name)
            new = graph.call_function(operator.mul if op in ("mul", "div") else operator.add, (x, const))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        changed = True
    gm.recompile()
    return changed


_MAX_SUM_TERMS = 4  # a sum over a dimension this short becomes adds (each add one QLinearAdd)


def _sums_to_adds(gm: fx.GraphModule, is_float: Callable[[fx.Node], bool], image_size: int) -> bool:
    """``torch.stack(xs, dim)`` -> ``torch.cat([x.unsqueeze(dim) ...], dim)``, and ``x.sum(dim)`` over a dimension
    of 2 to ``_MAX_SUM_TERMS`` -> ``x.unbind(dim)[0] + x.unbind(dim)[1] + ...`` (``split(1, dim)`` with
    ``keepdim``); returns whether any changed. Needs the shapes (``_shapes``)."""
    graph, changed = gm.graph, False
    for node in list(graph.nodes):  # torch.stack -> unsqueezes concatenated: QLinearConcat (SKNet's branches)
        if node.op == "call_function" and node.target is torch.stack and not node.kwargs.keys() - {"dim"} and \
                isinstance(node.args[0], (list, tuple)) and all(isinstance(t, fx.Node) for t in node.args[0]) and \
                not is_float(node):
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            with graph.inserting_before(node):
                parts = [graph.call_method("unsqueeze", (t, dim)) for t in node.args[0]]
                cat = graph.call_function(torch.cat, (parts, dim))
            node.replace_all_uses_with(cat)
            graph.erase_node(node)
            changed = True
    gm.recompile()
    if changed:
        _shapes(gm, image_size)
    for node in list(graph.nodes):
        if not _calls(node, {torch.sum}, "sum") or is_float(node) or not isinstance(node.args[0], fx.Node):
            continue
        x, kw = node.args[0], dict(node.kwargs)
        dim = node.args[1] if len(node.args) > 1 else kw.pop("dim", None)
        keepdim = node.args[2] if len(node.args) > 2 else kw.pop("keepdim", False)
        meta = x.meta.get("tensor_meta")
        if isinstance(dim, (list, tuple)) and len(dim) == 1:
            dim = dim[0]
        if kw or not isinstance(dim, int) or not isinstance(meta, TensorMetadata) or not \
                meta.dtype.is_floating_point or not 2 <= meta.shape[dim] <= _MAX_SUM_TERMS:
            continue
        with graph.inserting_before(node):
            parts = graph.call_method("split", (x, 1, dim)) if keepdim else graph.call_method("unbind", (x, dim))
            out = graph.call_function(operator.getitem, (parts, 0))
            for i in range(1, meta.shape[dim]):
                out = graph.call_function(operator.add, (out, graph.call_function(operator.getitem, (parts, i))))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        changed = True
    gm.recompile()
    return changed


def _drop_broadcast_expands(gm: fx.GraphModule) -> bool:
    """``x * y.expand_as(x)`` -> ``x * y`` where the Add / Mul broadcasts to the same shape anyway (ECA's gate):
    a float Expand of a whole feature map between DequantizeLinear and QuantizeLinear saved. Needs the shapes."""
    changed = False
    for node in list(gm.graph.nodes):
        if not (node.op == "call_method" and node.target in ("expand_as", "expand")) or \
                not isinstance(src := node.args[0], fx.Node) or not node.users:
            continue
        shape = getattr(node.meta.get("tensor_meta"), "shape", None)
        ok = shape is not None
        for u in node.users:
            others = [a for a in u.args if a is not node]
            ok &= (_calls(u, _ADD, "add") or _calls(u, _MUL, "mul")) and not u.kwargs and len(u.args) == 2 and \
                len(others) == 1 and isinstance(others[0], fx.Node) and \
                getattr(others[0].meta.get("tensor_meta"), "shape", None) == shape
        if ok:
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            changed = True
    gm.recompile()
    return changed


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_act(node: fx.Node | None, gm: fx.GraphModule) -> bool:
    if node is None:
        return False
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _ACTS)
    return node.op == "call_function" and node.target in (F.relu, torch.relu)


def _is_hard(node: fx.Node | None, gm: fx.GraphModule) -> str | None:
    """"Hardswish" / "Hardsigmoid" for those activations (module or function), else None."""
    if node is None:
        return None
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return "Hardswish" if isinstance(mod, nn.Hardswish) else "Hardsigmoid" if isinstance(mod, nn.Hardsigmoid) \
            else None
    if node.op == "call_function":
        return {F.hardswish: "Hardswish", F.hardsigmoid: "Hardsigmoid"}.get(node.target)
    return None


def _default_args(model: nn.Module) -> dict | None:
    """The root forward's optional arguments at their defaults (timm's ``attn_mask=None``, ``is_causal=False``),
    so tracing sees constants rather than inputs."""
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())[1:]
    except (TypeError, ValueError):  # no Python signature: trace it as it is
        return None
    out = {p.name: p.default for p in params
           if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not p.empty
           and isinstance(p.default, (type(None), bool, int, float, str))}
    return out or None


def _warm_up(model: nn.Module, x: torch.Tensor) -> None:
    """One forward pass before tracing on ``x``: code that fills a cache on its first call (ConViT's relative
    positions, sized to the token count) then takes the branch every later call takes."""
    with torch.no_grad():
        try:
            model(x)
        except Exception:
            pass  # a model that does not run on this input: tracing says where


def _differs_at_batch_2(model: nn.Module, gm: fx.GraphModule, image_size: int) -> str:
    """Why the size-specialised trace ``gm`` does not compute ``model`` at another batch size ('' if it does)."""
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        try:
            want = model(x)
        except Exception:
            return ""  # the model itself does not run on this input: the shape check after tracing says so
        try:
            got = gm(x)
        except Exception as e:
            return f"{type(e).__name__}: {first_line(e)}"
    if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor) or want.shape != got.shape:
        return "other outputs"
    if not torch.equal(want.isnan(), got.isnan()):  # weights not loaded yet (a checkpoint's model) may give NaN
        return "NaN elsewhere"
    want, got = want.nan_to_num(), got.nan_to_num()
    err = (want - got).abs().max().item()
    return "" if err <= 1e-4 * (1.0 + want.abs().max().item()) else f"max |difference| {err:.2g}"


def _shapes(gm: fx.GraphModule, image_size: int) -> None:
    """Record every node's tensor shape (``ShapeProp``); a graph that does not run on the input size is one
    line naming the layer that fails (ShapeProp would print its traceback first)."""
    class Prop(ShapeProp):
        node: fx.Node | None = None

        def run_node(self, n: fx.Node):
            self.node = n
            return super().run_node(n)

    prop = Prop(gm)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            prop.propagate(torch.zeros(1, 3, image_size, image_size))
    except Exception as e:
        cause, node = e.__cause__ or e, prop.node
        stack = list((node.meta.get("nn_module_stack") or {}).values()) if node is not None else []
        where = node.target if node is not None and node.op == "call_module" else stack[-1][0] if stack else ""
        raise PipelineError(f"the traced model does not run on a {image_size}x{image_size} input"
                            f"{f' in {where!r}' if where else ''} ({type(cause).__name__}: {first_line(cause)}); "
                            "check data.image_size") from None


def _float_test(prefixes: tuple[str, ...]):
    """node -> True when it lies inside one of the modules named in ``prefixes`` (kept in FP32)."""

    def is_float(node: fx.Node) -> bool:
        if node.meta.get("float"):
            return True
        names = list(node.meta.get("nn_module_stack", {}))
        if node.op == "call_module":
            names.append(str(node.target))
        return any(inside(n, prefixes) for n in names)

    return is_float


def prepare_qat(model: nn.Module, spec: QuantSpec, image_size: int = 32) -> fx.GraphModule:
    """Rewrite a float model into its QAT form (see module docstring); raises on unknown layers.

    Layers named in ``spec.float_layers`` stay as they are (FP32 in ONNX Runtime); tensors crossing
    from them into the quantized part get an ``ActQuant`` for their quantized users only. The steps, in order:
    trace, ops rewritten into ops ONNX Runtime has INT8 kernels for, conv (+ BN) (+ activation) fused into
    ``QConvBn`` / linears into ``QLinear``, every op classified, observers placed.
    """
    model = model.cpu().eval()
    model = _unroll_attention(plain_layers(model, spec.float_layers), spec.float_layers, image_size)
    gm, untraceable = _trace(model, image_size)
    _split_norm_act(gm)
    _softmax_modules_as_calls(gm)
    is_float = _float_test(spec.float_layers)
    _shapes(gm, image_size)  # tensor shapes on every node: only tensors are quantized
    if _static_same_padding(gm) | _functional_convs(gm) | _parameter_matmuls(gm) | _fold_zero_pads(gm):
        _shapes(gm, image_size)
    _mark_float_modules(gm, untraceable)
    _mark_constants(gm)
    if _constants_at_batch_1(gm, image_size):
        _shapes(gm, image_size)
    _linear_batchnorms(gm, is_float)
    _silu_as_sigmoid_mul(gm, is_float)
    _square_as_mul(gm, is_float)
    # a sum over a short dimension (ResNeSt's / SKNet's radix splits) -> slices added: QLinearAdds on slices of
    # the quantized tensor, where ORT has no INT8 ReduceSum (and left the Mul before it float); a stack -> a
    # concatenation of unsqueezes (QLinearConcat)
    if _sums_to_adds(gm, is_float, image_size) | _drop_broadcast_expands(gm) | _scalar_operands(gm, is_float):
        _shapes(gm, image_size)
    _fuse_convs(gm, spec, is_float)
    _lone_batchnorms(gm, spec, is_float)
    _hard_activations(gm, spec, is_float)
    kind, float_ops = _classify(gm, untraceable, is_float)
    _place_quants(gm, kind, spec)
    gm.meta["float_ops"] = float_ops
    _one_module_per_call(gm)
    _norm_grads(gm)
    gm.recompile()
    _link_input_quants(gm)
    return gm


def _trace(model: nn.Module, image_size: int) -> tuple[fx.GraphModule, dict[str, str]]:
    """``torch.fx`` trace of ``model``, and the modules it could not trace (kept FP32, called whole) with why.
    A failed trace is retried with an example input (branches on tensor sizes followed), then with the failing
    module called whole; a trace specialised on sizes must reproduce the model at batch 2."""
    untraceable: dict[str, str] = {}  # module -> why fx cannot trace it
    example = None  # after a failed trace: an input, so branches on tensor sizes can be followed
    while True:
        tracer = _Tracer(set(untraceable), example)
        try:
            gm = fx.GraphModule(model, tracer.trace(model, concrete_args=_default_args(model)))
        except Exception as e:
            first = first_line(e)
            name = tracer.failed_in[0] if tracer.failed_in else ""
            if example is None:
                example = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
                _warm_up(model, example)
                continue
            if name and name not in untraceable and len(untraceable) < _MAX_UNTRACEABLE:
                untraceable[name] = f"{type(e).__name__}: {first}"  # a branch on tensor values
                continue
            where = f" in module {name!r} ({tracer.failed_in[1]})" if tracer.failed_in else ""
            raise PipelineError(f"cannot trace the model for quantization{where} ({type(e).__name__}: {first}); "
                                "models with data-dependent control flow need another qat.source, or that module "
                                "rewritten without Python branches on tensor values") from None
        wrong = tracer.specialized and _differs_at_batch_2(model, gm, image_size)
        if not wrong:
            break
        if "" in tracer.specialized or len(untraceable) + len(tracer.specialized) > _MAX_UNTRACEABLE:
            raise PipelineError(f"the model's forward branches on tensor sizes in a way its traced form does not "
                                f"reproduce at batch 2 ({wrong}); keep it out of qat (pipeline without qat)")
        untraceable.update({m: f"its size-specialised trace differs at batch 2 ({wrong})" for m in tracer.specialized})
    if (said := (type(model).__name__, tuple(untraceable), tuple(tracer.specialized))) not in _SAID_UNTRACEABLE:
        _SAID_UNTRACEABLE.add(said)  # once per process: prepare_qat runs in qat, export and placement
        if tracer.specialized:
            where = [f"{m or 'the model'} ({c})" for m, c in tracer.specialized.items()]
            log.info("qat: traced for %dx%d inputs (their code branches on tensor sizes): %s", image_size,
                     image_size, ", ".join(where[:6]) + (f" and {len(where) - 6} more" if len(where) > 6 else ""))
        if untraceable:
            log.info("qat: torch.fx cannot trace these modules; kept FP32, called whole: %s",
                     grouped_reasons(untraceable))
    return gm, untraceable


def _mark_float_modules(gm: fx.GraphModule, untraceable: dict[str, str]) -> None:
    """A layer whose parameters the forward code also reads (EdgeNeXt's positional encoding takes its conv's
    weight dtype) stays float: its quantized replacement has other parameters; so does a module fx cannot
    trace."""
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for node in gm.graph.nodes:
        if node.op == "call_module" and (node.target in untraceable or
                                         any(r.startswith(f"{node.target}.") for r in read)):
            node.meta["float"] = True


def _mark_constants(gm: fx.GraphModule) -> None:
    """Tensors the model computes from its parameters and buffers alone (at most expanded to the input's size)
    stay float: ConViT's positional attention ``softmax(pos_proj(rel_indices))`` and its gates, a class token
    expanded to the batch. Quantized, ConViT's relative positions at 224 px (-13 to 338) shared one scale of 1.38,
    and offsets 1 and 2 became the same value; float, they are exact, and ONNX Runtime folds them into
    initializers where no input size enters. A quantized op reads them through a quantizer, as a parameter."""
    data: set[fx.Node] = set()  # nodes whose value depends on the input's values (not only on its size)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            data.add(node)
        elif (node.op == "call_method" and node.target in _SHAPE_METHODS) or \
                (node.op == "call_function" and node.target is getattr and node.args[1] in _SHAPE_ATTRS):
            continue  # x.size(0), x.shape: sizes, not data
        elif any(a in data for a in _flat((node.args, node.kwargs)) if isinstance(a, fx.Node)):
            data.add(node)
        elif node.op in ("call_module", "call_function", "call_method") and _is_tensor(node):
            node.meta["float"] = node.meta["constant"] = True


def _constants_at_batch_1(gm: fx.GraphModule, image_size: int) -> bool:
    """A constant expanded to the batch and computed on further (ConViT: ``pos_proj(rel_indices.expand(B, ...))``
    and a softmax) is computed at batch 1 and broadcast where it meets the input instead, so ONNX Runtime folds
    the chain into an initializer; it ran it on every call (10 float MatMuls of the batch's size in ConViT).
    Kept as it was where that changes the model's outputs (checked on weights of its own, so a model rebuilt
    from a checkpoint, before its weights are loaded, gets the same graph). True if anything changed."""
    expands = [n for n in gm.graph.nodes if n.meta.get("constant") and _calls(n, set(), "expand") and n.users
               and isinstance(src := n.args[0], fx.Node) and (src.op == "get_attr" or src.meta.get("constant"))
               and all(u.meta.get("constant") for u in n.users)]
    if not expands:
        return False
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))

    def outputs() -> object:  # on weights of the check's own (a rebuilt model's may be uninitialised yet)
        probe, g = copy.deepcopy(gm), torch.Generator().manual_seed(2)
        with torch.no_grad():
            for t in (*probe.parameters(), *probe.buffers()):
                if t.is_floating_point():
                    t.uniform_(0.5, 1.5, generator=g)
            return probe(x)

    want = outputs()
    users = {n: list(n.users) for n in expands}
    for n in expands:
        n.replace_all_uses_with(n.args[0])
    gm.recompile()
    try:
        got = outputs()
        same = isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor) and got.shape == want.shape and \
            torch.allclose(got, want, rtol=1e-4, atol=1e-5 * (1.0 + want.abs().max().item()))
    except Exception:
        same = False
    for n in expands:
        if same:
            gm.graph.erase_node(n)
        else:
            for u in users[n]:
                u.replace_input_with(n.args[0], n)
    gm.recompile()
    return same


_RESHAPES = {"flatten", "reshape", "view", "contiguous"}  # keep the last dimension when it keeps its size


def _one_data_user(node: fx.Node) -> fx.Node | None:
    """The one user of ``node`` that reads its values; others may read its size only (LeViT's
    ``bn(x.flatten(0, 1)).reshape_as(x)``)."""
    data = [u for u in node.users if not (u.op == "call_method" and (
        u.target in _SHAPE_METHODS or (u.target in ("reshape_as", "view_as", "expand_as") and u.args[0] is not node)))]
    return data[0] if len(data) == 1 else None


def _linear_batchnorms(gm: fx.GraphModule, is_float: Callable[[fx.Node], bool]) -> bool:
    """A BatchNorm1d over a linear layer's output features (LeViT's ``bn(linear(x).flatten(0, 1))``) or over its
    input features (LeViT's and EfficientViT-M's heads: ``linear(drop(bn(x)))``) folds into that linear layer,
    as a BN folds into a conv: one INT8 kernel instead of a float BatchNormalization between DequantizeLinear
    and QuantizeLinear. The folded layer is a new module (the float model keeps its own); QAT fine-tunes it with
    the statistics frozen. True if anything changed."""
    graph, changed = gm.graph, False
    calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")

    def linear(n: object) -> nn.Linear | None:  # a linear layer called here only
        ok = isinstance(n, fx.Node) and n.op == "call_module" and calls[n.target] == 1 and not is_float(n)
        return m if ok and type(m := gm.get_submodule(n.target)) is nn.Linear else None

    def replace(n: fx.Node, weight: torch.Tensor, bias: torch.Tensor) -> None:
        new = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            new.weight.copy_(weight)
            new.bias.copy_(bias)
        gm.add_submodule(n.target, new)

    for node in list(graph.nodes):
        if node.op != "call_module" or is_float(node) or type(bn := gm.get_submodule(node.target)) is not \
                nn.BatchNorm1d or bn.running_mean is None or not isinstance(node.args[0], fx.Node):
            continue
        shape = getattr(node.args[0].meta.get("tensor_meta"), "shape", None)
        if shape is None or len(shape) != 2:  # (N, C): the features are the last dimension
            continue
        with torch.no_grad():
            scale = torch.rsqrt(bn.running_var + bn.eps) * (bn.weight if bn.affine else 1.0)
            shift = (bn.bias if bn.affine else 0.0) - bn.running_mean * scale
        src, nxt = node.args[0], node  # after a linear layer, through reshapes that keep its features last
        while src.op == "call_method" and src.target in _RESHAPES and _one_data_user(src) is nxt and \
                isinstance(src.args[0], fx.Node) and \
                getattr(src.args[0].meta.get("tensor_meta"), "shape", [None])[-1] == shape[-1]:
            src, nxt = src.args[0], src
        after = linear(src) if _one_data_user(src) is nxt else None
        before = []  # or before linear layers, through dropouts
        for u in node.users:
            while u.op == "call_module" and isinstance(gm.get_submodule(u.target), (nn.Dropout, nn.Identity)) and \
                    len(u.users) == 1:
                u = next(iter(u.users))
            before.append((u, linear(u)))
        with torch.no_grad():
            if after is not None and after.out_features == shape[-1]:
                b = after.bias if after.bias is not None else torch.zeros_like(shift)
                replace(src, after.weight * scale[:, None], b * scale + shift)
            elif before and all(m is not None and m.in_features == shape[-1] for _, m in before):
                for u, m in before:
                    b = m.bias if m.bias is not None else torch.zeros(m.out_features)
                    replace(u, m.weight * scale[None, :], b + m.weight @ shift)
            else:
                continue
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
        changed = True
    if changed:
        gm.recompile()
    return changed


def _silu_as_sigmoid_mul(gm: fx.GraphModule, is_float: Callable[[fx.Node], bool]) -> None:
    """SiLU/Swish -> ``x * sigmoid(x)``: ORT runs both as INT8 kernels (QLinearSigmoid, QLinearMul), as its own
    quantizer does with the exported Sigmoid + Mul; left whole, SiLU would run float between DQ and Q."""
    graph = gm.graph
    for node in list(graph.nodes):
        is_silu = (node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.SiLU)) or \
                  (node.op == "call_function" and node.target is F.silu)
        if is_silu and not is_float(node):
            x = node.args[0]
            with graph.inserting_after(node):
                sig = graph.call_function(torch.sigmoid, (x,))
            with graph.inserting_after(sig):
                mul = graph.call_function(operator.mul, (x, sig))
            for n in (sig, mul):
                n.meta = dict(node.meta)
            node.replace_all_uses_with(mul)
            graph.erase_node(node)
    gm.recompile()


def _square_as_mul(gm: fx.GraphModule, is_float: Callable[[fx.Node], bool]) -> None:
    """``x ** 2`` -> ``x * x`` (MetaFormer's StarReLU): QLinearMul instead of a float Pow."""
    graph = gm.graph
    for node in list(graph.nodes):
        squared = (_calls(node, {operator.pow, torch.pow}, "pow") and node.args[1:] in ((2,), (2.0,))) or \
            _calls(node, {torch.square}, "square")
        if squared and isinstance(node.args[0], fx.Node) and not node.kwargs and not is_float(node):
            with graph.inserting_after(node):
                mul = graph.call_function(operator.mul, (node.args[0], node.args[0]))
            mul.meta = dict(node.meta)
            node.replace_all_uses_with(mul)
            graph.erase_node(node)
    gm.recompile()


def _fuse_convs(gm: fx.GraphModule, spec: QuantSpec, is_float: Callable[[fx.Node], bool]) -> None:
    """conv (+ BN) (+ ReLU / ReLU6 / a Hardsigmoid gate) -> ``QConvBn``; Conv1d -> ``QConvBn`` (no BN folding);
    linear -> ``QLinear``. A conv in ``float_layers`` keeps its BN and activation FP32 with it."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.Conv1d) and isinstance(mod.padding, tuple) and not is_float(node):
            gm.add_submodule(node.target, QConvBn(mod, None, None, spec))  # no BN folding in 1-D
        elif isinstance(mod, nn.Conv2d):
            last, bn, act = node, None, None
            nxt = _only_user(last)
            if nxt is not None and nxt.op == "call_module" and isinstance(gm.get_submodule(nxt.target), nn.BatchNorm2d):
                bn, last = gm.get_submodule(nxt.target), nxt
                nxt = _only_user(last)
            shift = 0.0
            if _is_act(nxt, gm):
                act = gm.get_submodule(nxt.target) if nxt.op == "call_module" else nn.ReLU()
                last = nxt
            elif _is_hard(nxt, gm) == "Hardsigmoid" and not is_float(node):
                act, shift, last = nn.ReLU6(), 3.0, nxt  # ReLU6(y + 3) / 6: the 3 in the bias, /6 in the scale
                node.meta["fixed_quant"] = (6.0, 1.0 / 6.0)
            if is_float(node):  # its BN and activation stay FP32 with it
                cur = last
                while cur is not node:
                    cur.meta["float"] = True
                    cur = cur.args[0]
                continue
            q = QConvBn(mod, bn, act, spec, shift)
            gm.add_submodule(node.target, q)
            if last is not node:
                last.replace_all_uses_with(node)
                cur = last
                while cur is not node:  # erase the absorbed bn / act nodes
                    prev = cur.args[0]
                    graph.erase_node(cur)
                    cur = prev
        elif isinstance(mod, nn.Linear) and not is_float(node):
            gm.add_submodule(node.target, QLinear(mod, spec))
    gm.recompile()


def _lone_batchnorms(gm: fx.GraphModule, spec: QuantSpec, is_float: Callable[[fx.Node], bool]) -> None:
    """A BatchNorm that follows no conv (DenseNet's pre-activation BN -> ReLU) -> a depthwise 1x1 ``QConvBn``
    (unit weights, the BN folded in, the ReLU fused): one QLinearConv instead of float BN between DQ and Q."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(bn := gm.get_submodule(node.target), nn.BatchNorm2d) \
                or is_float(node):
            continue
        conv = nn.Conv2d(bn.num_features, bn.num_features, 1, groups=bn.num_features, bias=False)
        nn.init.ones_(conv.weight)
        conv.weight.requires_grad_(False)
        act, nxt = None, _only_user(node)
        if _is_act(nxt, gm):
            act = gm.get_submodule(nxt.target) if nxt.op == "call_module" else nn.ReLU()
            nxt.replace_all_uses_with(node)
            graph.erase_node(nxt)
        gm.add_submodule(node.target, QConvBn(conv, bn, act, spec))
    gm.recompile()


def _hard_activations(gm: fx.GraphModule, spec: QuantSpec, is_float: Callable[[fx.Node], bool]) -> None:
    """Hardswish / Hardsigmoid not folded into a conv -> ``QHardSwish`` (QLinearAdd + QLinearMul in ORT)."""
    graph = gm.graph
    for node in list(graph.nodes):
        hard = _is_hard(node, gm)
        if hard is None or is_float(node):
            continue
        q = QHardSwish(spec, gate_only=hard == "Hardsigmoid")
        if node.op == "call_module":
            gm.add_submodule(node.target, q)
        else:
            name = f"{node.name}_q"
            gm.add_submodule(name, q)
            with graph.inserting_after(node):
                new = graph.call_module(name, (node.args[0],))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
    gm.recompile()


# what _classify says of each node: "input" (placeholder or parameter: quantized for its quantized users),
# "quant_after" (an ActQuant follows), "shared" (on its source's grid: SharedQuant), "pass" (no quantizer: an
# identity, a shape, or its users take float), "float" (no INT8 kernel: runs float between DQ and Q)
_Kind = Literal["input", "quant_after", "shared", "pass", "float"]


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("tensor_meta"), TensorMetadata)


def _op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    return node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))


def _same_dtype(node: fx.Node) -> bool:
    src = node.args[0] if node.args else None
    return isinstance(src, fx.Node) and _is_tensor(node) and _is_tensor(src) and \
        node.meta["tensor_meta"].dtype == src.meta["tensor_meta"].dtype


def _sliced_from(node: fx.Node) -> fx.Node | None:
    """The tensor a getitem cuts from (``x[i]``, or ``x.chunk(...)[i]`` and the like), or a move reads."""
    src = node.args[0]
    if not isinstance(src, fx.Node):
        return None
    if (src.op == "call_method" and src.target in _SPLIT_METHODS) or \
            (src.op == "call_function" and src.target in _SPLIT_FUNCS):
        src = src.args[0]
    return src if isinstance(src, fx.Node) else None


def _moves(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Data movement only: the output holds input values (reshape, transpose, max pool, ...)."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _MOVE_MODULES)
    if node.op == "call_function" and node.target is F.pad:  # reflect / replicate: copies of input values
        return node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant") in ("reflect", "replicate")
    return (node.op == "call_method" and node.target in _MOVE_METHODS) or \
        (node.op == "call_function" and node.target in _MOVE_FUNCS)


def _classify(gm: fx.GraphModule, untraceable: dict[str, str], is_float: Callable[[fx.Node], bool]
              ) -> tuple[dict[fx.Node, _Kind], list[tuple[str, str, str]]]:
    """Every op by the table above (``_Kind``), and the ops that stay float as (node, op, why)."""
    def on_grid(src: object) -> bool:  # quantized with a read-back of 1: a slice or move may share its quantizer
        return isinstance(src, fx.Node) and kind.get(src) in ("quant_after", "shared") and \
            src.meta.get("fixed_quant", (1.0, 1.0))[1] == 1.0

    kind: dict[fx.Node, _Kind] = {}
    float_ops: list[tuple[str, str, str]] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            kind[node] = "input"
        elif node.op == "get_attr" and _is_tensor(node) and node.meta["tensor_meta"].dtype.is_floating_point:
            kind[node] = "input"  # a parameter an op reads (layer scale, StarReLU's scale): quantized for it
        elif node.op not in ("call_module", "call_function", "call_method"):
            continue
        elif node.op == "call_module" and node.target in untraceable:
            kind[node] = "float"
            float_ops.append((node.name, _op_name(gm, node), "torch.fx cannot trace it"))
            continue
        elif is_float(node):
            kind[node] = "float"
            layer = node.op == "call_module" and isinstance(gm.get_submodule(node.target), (nn.Conv2d, nn.Linear))
            if node.meta.get("constant") and (layer or any(not u.meta.get("constant") for u in node.users)):
                float_ops.append((node.name, _op_name(gm, node), "input-independent: a constant of the model"))
            elif layer:
                float_ops.append((node.name, _op_name(gm, node), "qat.float_layers"))
            continue
        elif _moves(gm, node) and _is_tensor(node) and on_grid(node.args[0]):
            # a reshape, transpose or max pool of a quantized tensor keeps its grid (SharedQuant), as ORT's own
            # quantizer does: an own observer sees the fake-quantized values, whose range differs by up to half
            # a step, and ORT runs the op float between DQ and Q when the two scales differ (SKNet's unsqueezes,
            # a softmax's 1/256 grid reshaped in ResNeSt)
            kind[node] = "shared"
        elif node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, QConvBn):
                kind[node] = "quant_after"
            elif isinstance(mod, QHardSwish):  # the gate is quantized inside; x * gate needs its own
                kind[node] = "pass" if mod.gate_only else "quant_after"
                src = node.args[0]
                if src.op == "call_module" and isinstance(gm.get_submodule(src.target), QLinear):
                    kind[src] = "quant_after"  # QLinearAdd needs a quantized input (a head's Linear)
            elif isinstance(mod, (QLinear, *_PASS_MODULES)):
                kind[node] = "pass"
            elif isinstance(mod, _QUANT_AFTER_MODULES):
                kind[node] = "quant_after"
            else:
                kind[node] = "float"
        elif node.target is operator.getitem and _is_tensor(node) and on_grid(_sliced_from(node)):
            kind[node] = "shared"  # a slice of a quantized tensor keeps its scale (SharedQuant)
        elif node.target in (_PASS_FUNCS if node.op == "call_function" else _PASS_METHODS) or \
                (node.op == "call_method" and node.target in _CAST_METHODS and _same_dtype(node)):
            kind[node] = "pass"
        elif node.target in (_QUANT_AFTER_FUNCS if node.op == "call_function" else _QUANT_AFTER_METHODS):
            kind[node] = "quant_after"
            if node.target in _ADD and _is_act(_only_user(node), gm):
                kind[node] = "pass"  # quantize after the activation that follows the add
            if _calls(node, _SOFTMAX, "softmax"):
                node.meta["fixed_quant"] = (255 / 256, 1.0)  # [0, 1) in steps of 1/256, as ORT's QLinearSoftmax
        else:
            kind[node] = "float"
        if kind.get(node) in ("quant_after", "input") and not _is_tensor(node):
            kind[node] = "pass"  # shapes and tuples (x.shape, chunk) are not quantized
        if kind[node] == "float" and _is_tensor(node):
            float_ops.append((node.name, _op_name(gm, node), "no INT8 kernel in ONNX Runtime"))
    # softmax takes float inputs (ORT's QLinearSoftmax is several times slower than its float Softmax), so an op
    # whose users all take float inputs is not quantized after: attention scores (q @ k^T into the softmax or
    # into Swin's float position bias) come out float from MatMulIntegerToFloat, an INT8 kernel all the same
    takes_float = {n for n in kind if (kind[n] == "float" and _is_tensor(n)) or _calls(n, _SOFTMAX, "softmax")}
    for node in reversed(list(kind)):
        if kind[node] == "quant_after" and node.op != "call_module" and node.users and \
                all(u in takes_float for u in node.users):
            kind[node] = "pass"
            if not _calls(node, _MATMUL, "matmul"):  # a matmul still takes INT8 inputs
                takes_float.add(node)
    return kind, float_ops


_INPLACE_FUNCS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, torch.relu_}


def _writes_into(user: fx.Node, node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``user`` writes into ``node``'s tensor in place (``x.mul_(2)``, ``x[i] = y``, ``ReLU(inplace=True)``)."""
    if not user.args or user.args[0] is not node:
        return False
    if user.op == "call_method":
        return user.target.endswith("_") and not user.target.startswith("_")
    if user.op == "call_function":
        return user.target in _INPLACE_FUNCS or user.kwargs.get("inplace") is True
    return user.op == "call_module" and getattr(gm.get_submodule(user.target), "inplace", False) is True


def _place_quants(gm: fx.GraphModule, kind: dict[fx.Node, _Kind], spec: QuantSpec) -> None:
    """An ``ActQuant`` (``FixedQuant`` for a fixed range) after every "quant_after" node, a ``SharedQuant`` of
    its source's after every "shared" one, and one for the quantized users of every float or input tensor
    (the FP32 -> INT8 boundary)."""
    graph = gm.graph
    count = 0

    def quantized(a: object) -> bool:  # a tensor that reaches its users through an ActQuant (placed or to come)
        while isinstance(a, fx.Node) and kind.get(a) == "pass" and a.args and (  # identities, dropout, casts
                a.op != "call_module" or isinstance(gm.get_submodule(a.target), _PASS_MODULES)):
            a = a.args[0]
        return isinstance(a, fx.Node) and (kind.get(a) in ("quant_after", "shared", "input") or (
            a.op == "call_module" and isinstance(gm.get_submodule(a.target), (ActQuant, SharedQuant))))

    def insert_after(node: fx.Node, only_quantized_users: bool = False, module: nn.Module | None = None) -> None:
        nonlocal count
        users = [u for u in node.users
                 if not (only_quantized_users and (kind.get(u) == "float" or u.op == "output" or
                                                   _calls(u, _SOFTMAX, "softmax")))]
        if node.op == "get_attr":  # a parameter into an Add / Mul whose other input is INT8: QLinearAdd / QLinearMul
            users = [u for u in users if (_calls(u, _ADD, "add") or _calls(u, _MUL, "mul")) and
                     kind.get(u) == "quant_after" and
                     all(quantized(a) for a in _flat(u.args) if isinstance(a, fx.Node) and a is not node)]
        writes = [u for u in node.users if _writes_into(u, node, gm)]
        order = {n: i for i, n in enumerate(graph.nodes)} if writes else {}
        # an in-place write that other users follow (not `x = act_(x)`, the last use) writes the unquantized
        # tensor, and the users after it read the written one through a quantizer placed after the write
        writes = [w for w in writes if any(order[u] > order[w] for u in node.users)]
        users = [u for u in users if u not in writes]
        if not users:
            return
        fixed = node.meta.get("fixed_quant")
        first = module or (FixedQuant(spec, *fixed) if fixed else ActQuant(spec))
        points = [node, *sorted(writes, key=order.get)]
        for i, point in enumerate(points):
            last = order[points[i + 1]] if i + 1 < len(points) else math.inf
            part = [u for u in users if not writes or order[point] < order[u] < last]
            if not part:
                continue
            name = f"act_quant_{count}"
            count += 1
            gm.add_submodule(name, first if point is node else ActQuant(spec))
            with graph.inserting_after(point):
                q = graph.call_module(name, (node,))
            for u in part:
                u.replace_input_with(node, q)

    for node, k in list(kind.items()):
        if k == "quant_after":
            insert_after(node)
        elif k == "shared":  # its source's ActQuant is in place by now (sources come first)
            source = gm.get_submodule(_sliced_from(node).target)
            insert_after(node, module=SharedQuant(source.source if isinstance(source, SharedQuant) else source))
        elif k in ("float", "input") and _is_tensor(node):
            insert_after(node, only_quantized_users=True)  # FP32 -> INT8 boundary


_NORM_FUNCS = {F.layer_norm, F.group_norm, torch.layer_norm, torch.group_norm}


def _norm_grads(gm: fx.GraphModule) -> None:
    """Each LayerNorm / GroupNorm reading a fake-quantized tensor also runs on the unquantized one, for its
    gradient only (``NormGrad``)."""
    count = 0
    for node in list(gm.graph.nodes):
        is_norm = (node.op == "call_function" and node.target in _NORM_FUNCS) or (
            node.op == "call_module" and isinstance(gm.get_submodule(node.target), (nn.LayerNorm, nn.GroupNorm)))
        src = node.args[0] if is_norm and node.args else None
        if not (isinstance(src, fx.Node) and src.op == "call_module" and
                isinstance(gm.get_submodule(src.target), (ActQuant, SharedQuant))):
            continue
        name = f"norm_grad_{count}"
        count += 1
        gm.add_submodule(name, NormGrad())
        with gm.graph.inserting_after(node):
            unquantized = gm.graph.create_node(node.op, node.target, (src.args[0], *node.args[1:]), node.kwargs)
        with gm.graph.inserting_after(unquantized):
            grad = gm.graph.call_module(name, (node, unquantized))
        node.replace_all_uses_with(grad, delete_user_cb=lambda u, g=grad: u is not g)


def _one_module_per_call(gm: fx.GraphModule) -> None:
    """A conv / linear called in several places (CoaT's shared position encodings) gets a module per call, with
    the same weights: its INT32 bias is quantized on the scale of its input, which differs between the calls."""
    seen: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(m := gm.get_submodule(node.target), (QConvBn, QLinear)):
            continue
        if node.target not in seen:
            seen.add(node.target)
            continue
        i = 2
        while f"{node.target}_call{i}" in seen:
            i += 1
        call = copy.copy(m)  # the same weights, BatchNorm and activation: only `in_quant` is its own
        call._parameters, call._buffers, call._modules = dict(m._parameters), dict(m._buffers), dict(m._modules)
        node.target = f"{node.target}_call{i}"
        seen.add(node.target)
        gm.add_submodule(node.target, call)


def _behind_identities(node: fx.Node, gm: fx.GraphModule) -> fx.Node:
    """The tensor ``node`` passes on unchanged in the exported graph: through Dropout / Identity modules and
    ``F.dropout`` calls."""
    while (node.op == "call_module" and isinstance(gm.get_submodule(node.target), _PASS_MODULES)) or \
            (node.op == "call_function" and node.target in _IDENTITY_FUNCS):
        node = node.args[0]
    return node


def _link_input_quants(gm: fx.GraphModule) -> None:
    """Tell each conv / linear which observer quantizes its input (its bias is quantized on that scale)."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(m := gm.get_submodule(node.target), (QConvBn, QLinear)):
            src = _behind_identities(node.args[0], gm)  # GhostNet's F.dropout keeps the quantized input
            aq = gm.get_submodule(src.target) if src.op == "call_module" else None
            if isinstance(aq, SharedQuant):
                aq = aq.source
            if isinstance(aq, ActQuant):
                object.__setattr__(m, "in_quant", aq)


def float_ops(gm: fx.GraphModule) -> dict[str, list[str]]:
    """What stays float in a prepared model, by op type: {"Hardswish": [node names], ...}."""
    out: dict[str, list[str]] = {}
    for name, op, why in gm.meta.get("float_ops", []):
        out.setdefault(f"{op} ({why})", []).append(name)
    return out


def quantized_layers(model: nn.Module, calls: bool = False) -> list[str]:
    """Names of the convs/linears that run in INT8 (QAT or export form); a layer called in several places once,
    or (``calls``) once per call, as the ONNX graph has it."""
    names = [n for n, m in model.named_modules() if isinstance(m, (QConvBn, QLinear, DeployConv))]
    return names if calls else [n for n in names if not ((c := re.fullmatch(r"(.+)_call\d+", n)) and c[1] in names)]


def activation_matmuls(model: nn.Module) -> int:
    """Matmuls of two quantized activations (attention's q @ k^T and attn @ v): INT8 kernels in ORT
    (MatMulIntegerToFloat, QLinearMatMul) that are not layers."""
    graph = getattr(model, "graph", None)
    if graph is None:
        return 0

    def quantized(a) -> bool:
        a = _behind_identities(a, model) if isinstance(a, fx.Node) else a  # attn_drop(attn) @ v
        return isinstance(a, fx.Node) and a.op == "call_module" and \
            isinstance(model.get_submodule(a.target), (ActQuant, SharedQuant))

    return sum(1 for n in graph.nodes
               if _calls(n, _MATMUL, "matmul") and len(n.args) >= 2 and all(map(quantized, n.args[:2])))


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


def freeze_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, QConvBn):
            m.bn_frozen = True


def freeze_observers(model: nn.Module) -> None:
    for a in act_quants(model):
        a.observe = False


def load_quantized(ckpt: dict, source: str, trusted_target: str | None) -> fx.GraphModule:
    """Rebuild a QAT model from a checkpoint: float model + shapes -> prepare_qat -> state dict."""
    from pipeline.artifacts import CKPT_EXTRA, CKPT_MODEL_CFG, CKPT_SHAPES, CKPT_STATE
    from pipeline.models import apply_shapes, build_model, check_trusted

    check_trusted(ckpt[CKPT_MODEL_CFG], trusted_target, source)
    spec = QuantSpec(**ckpt[CKPT_EXTRA]["quant"])
    model = apply_shapes(build_model(ckpt[CKPT_MODEL_CFG]), ckpt[CKPT_SHAPES])
    gm = prepare_qat(model, spec, ckpt[CKPT_MODEL_CFG].get("image_size", 32))
    try:
        gm.load_state_dict(ckpt[CKPT_STATE])
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise PipelineError(f"{source}: quantized checkpoint does not fit its model ({first}); a pipeline version "
                            "that quantized some layers differently wrote it: delete its folder to run qat again") \
            from None
    for a in act_quants(gm):
        a.enabled, a.observe = True, False
    return gm.eval()


def to_deploy(gm: fx.GraphModule) -> fx.GraphModule:
    """Export form of a QAT model: INT8 weight buffers and constant activation scales."""
    dep = copy.deepcopy(gm).eval()
    for node in list(dep.graph.nodes):  # the norms' gradient path: training only
        if node.op == "call_module" and isinstance(dep.get_submodule(node.target), NormGrad):
            quantized, unquantized = node.args
            node.replace_all_uses_with(quantized)
            dep.graph.erase_node(node)
            dep.graph.erase_node(unquantized)
            dep.delete_submodule(node.target)
    dep.recompile()
    for name, m in list(dep.named_modules()):
        if isinstance(m, (QConvBn, QLinear)):
            dep.add_submodule(name, DeployConv(m))
    for m in dep.modules():
        if isinstance(m, ActQuant):  # Python constants: baked into the graph as initializers
            m.export_mode, m.const_scale, m.const_zero_point = True, float(m.scale), int(m.zero_point)
        elif isinstance(m, QHardSwish):
            m.export_mode = True
    return dep
