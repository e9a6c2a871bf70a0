"""Quantization backend: the only package that knows how fake-quantization is done.

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

Files: ``spec`` (``QuantSpec``, weight and activation fake-quant, calibration), ``modules`` (the QAT modules and
their export forms), ``attention`` (attention unrolled into traceable INT8-friendly ops), ``onnx_ops`` (the custom
ops and their ONNX translations), ``target`` (what ONNX Runtime runs on INT8 kernels, and the CPU rules, as data),
``tracer`` (tracing, shapes), ``graph`` (node queries the passes share), ``passes`` (the rewrite: the ordered
``PASSES`` list, one module per group of passes) and ``prepare`` (``prepare_qat``, ``load_quantized``,
``to_deploy`` and the reports). Everything the rest of the project uses is imported from here.
"""

from __future__ import annotations

from pipeline import families
from pipeline.quant.attention import SelfAttention
from pipeline.quant.modules import DeployConv, NormGrad, QConvBn, QHardSwish, QLinear, SamePadConv2d, freeze_bn
from pipeline.quant.onnx_ops import onnx_translations
from pipeline.quant.passes import PASSES, REWRITE
from pipeline.quant.passes.normalise import plain_layers
from pipeline.quant.prepare import (
    activation_matmuls,
    float_ops,
    load_quantized,
    prepare_qat,
    quantized_layers,
    to_deploy,
)
from pipeline.quant.spec import (
    ActQuant,
    FixedQuant,
    QuantSpec,
    SharedQuant,
    act_quants,
    calibrate,
    fake_quant_weight,
    freeze_observers,
    quantize_bias,
)
from pipeline.quant.target import NARROW_CONV, int8_dot_product, narrow_convs, resolve_weight_bits

__all__ = [
    "NARROW_CONV", "PASSES", "REWRITE", "ActQuant", "DeployConv", "FixedQuant", "NormGrad", "QConvBn", "QHardSwish",
    "QLinear", "QuantSpec", "SamePadConv2d", "SelfAttention", "SharedQuant", "act_quants",
    "activation_matmuls", "calibrate", "fake_quant_weight", "float_ops", "freeze_bn", "freeze_observers",
    "int8_dot_product", "load_quantized", "narrow_convs", "onnx_translations", "plain_layers", "prepare_qat",
    "quantize_bias", "quantized_layers", "resolve_weight_bits", "to_deploy",
]


def __getattr__(name: str):
    """The functions the families put into traced graphs (``pipeline.families.graph_function``), by the name
    traced graphs import them under (``pipeline.quant.<name>``)."""
    if (fn := families.graph_functions().get(name)) is not None:
        return fn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
