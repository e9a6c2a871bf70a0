"""The modules the rewrite puts into the graph: conv (+ BN) (+ activation) as ``QConvBn``, ``QLinear``, their export
form ``DeployConv`` (INT8 weights and INT32 bias behind DequantizeLinear), ``QHardSwish``, ``NormGrad``, and timm's
'SAME' layers with the fixed padding of one input size (``SamePadConv2d``, ``_SamePadPool``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import pipeline.quant.onnx_ops  # noqa: F401  (registers torch.ops.qdq.*, which the export forms call)
from pipeline.quant.spec import FixedQuant, QuantSpec, _weight_qparams, fake_quant_weight, quantize_bias


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


def _stamp(*tensors: torch.Tensor | None) -> tuple:
    """What identifies the values of ``tensors`` now: storage, device and version (an in-place update bumps it)."""
    return tuple((t.data_ptr(), t.device, t._version) if t is not None else None for t in tensors)


class _QuantizedWeights:
    """The fake-quantized weight and INT32-rounded bias of a layer, computed once per inference while nothing they
    are computed from changes (per forward they cost as much as the conv itself on small inputs); in training, or
    with autograd on, they are computed every call."""

    bits: int
    in_quant: object

    def _sources(self) -> tuple[torch.Tensor | None, ...]:
        raise NotImplementedError

    def float_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's float weight and bias (batch norm folded in)."""
        raise NotImplementedError

    def _quantize(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = self.float_weights()
        return fake_quant_weight(w, self.bits), quantize_bias(b, w, self.bits, self.in_quant)[0]

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias this layer computes with when quantized."""
        if torch.is_grad_enabled() or self.training:
            return self._quantize()
        q = self.in_quant
        key = (self.bits, getattr(self, "shift", 0.0), q is not None and q.enabled,
               *_stamp(*self._sources(), q.scale if q is not None else None))
        cached = self.__dict__.get("_quantized")
        if cached is None or cached[0] != key:
            cached = (key, self._quantize())
            self.__dict__["_quantized"] = cached
        return cached[1]


class QConvBn(_QuantizedWeights, nn.Module):
    """Conv2d or Conv1d (+ BatchNorm folded into the fake-quantized weight) (+ ReLU/ReLU6)."""

    def __init__(self, conv: nn.Conv2d | nn.Conv1d, bn: nn.BatchNorm2d | None, act: nn.Module | None, spec: QuantSpec,
                 shift: float = 0.0):
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, act
        self.shift = shift  # added to the output before the activation (Hardsigmoid = ReLU6(y + 3) / 6)
        self.bits = spec.weight_bits
        self.bn_frozen = False
        self.quantize_weight = True  # False: float weights (post-training quantization's float reference)
        object.__setattr__(self, "in_quant", None)  # the ActQuant feeding it (not a submodule)
        object.__setattr__(self, "tap", None)  # called with the output before the activation (PTQ's statistics)

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

    def float_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.folded()

    def _sources(self) -> tuple[torch.Tensor | None, ...]:
        bn = self.bn
        return (self.conv.weight, self.conv.bias) + ((bn.weight, bn.bias, bn.running_mean, bn.running_var)
                                                     if bn is not None else ())

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
        elif not self.quantize_weight:
            y = self._conv(x, *self.folded())
        else:
            y = self._conv(x, *self.quantized())
        if self.tap is not None:
            self.tap(y)
        return self.act(y) if self.act is not None else y


class QLinear(_QuantizedWeights, nn.Module):
    def __init__(self, linear: nn.Linear, spec: QuantSpec):
        super().__init__()
        self.linear, self.bits = linear, spec.weight_bits
        self.quantize_weight = True  # False: float weights (post-training quantization's float reference)
        object.__setattr__(self, "in_quant", None)
        object.__setattr__(self, "tap", None)  # called with the output (PTQ's statistics)

    def float_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.linear.weight, self.linear.bias

    def _sources(self) -> tuple[torch.Tensor | None, ...]:
        return self.linear.weight, self.linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.quantized() if self.quantize_weight else (self.linear.weight, self.linear.bias)
        y = F.linear(x, w, b)
        if self.tap is not None:
            self.tap(y)
        return y


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


def freeze_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, QConvBn):
            m.bn_frozen = True
