"""The export form's custom ops (``qdq::fake_quant``, ``qdq::dequantize_per_channel``, ``qdq::requant``,
``qdq::dequantize``: the same math as in QAT) and their onnxscript translations to ONNX QuantizeLinear /
DequantizeLinear (``onnx_translations``), which ORT fuses into QLinearConv / QLinearAdd / QGemm kernels."""

from __future__ import annotations

import torch


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
