"""The target runtimes as data: the CPU rules (which CPUs have INT8 dot-product kernels, where narrow convs are
faster in FP32, which weight bits avoid saturation) and, per runtime, the op table the quantizers are placed by
(``OpTable``: ``ONNXRUNTIME``, ``OPENVINO``; ``op_table(name)``)."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth, stochastic_depth

from pipeline.models import inside

NARROW_CONV = 16  # x86 ORT runs INT8 convs with fewer output channels on im2col + GEMM, slower than FP32


def int8_dot_product() -> str | None:
    """Why this CPU has INT8 dot-product kernels (ARM, or x86 with VNNI/AMX), or None (x86 without them)."""
    import platform

    from pipeline.env import cpu_info

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


# Coverage is a table, as in ONNX Runtime's quantizer registry: the ops below get an ActQuant on their output
# (ORT fuses DequantizeLinear -> op -> QuantizeLinear into an INT8 kernel, or moves the QDQ pair through
# shape-only ops); Hardswish/Hardsigmoid become Add + Mul on quantized tensors (QHardSwish), SiLU Sigmoid * x, a
# BatchNorm after no conv a depthwise QConvBn, a sum over a short dimension adds of its slices, a stack a concat.
# Every other op (GELU, LayerNorm, a position bias, anything unknown) stays float between DequantizeLinear
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


@dataclass(frozen=True)
class OpTable:
    """Where one runtime wants quantizers (``qat.target``): which op outputs get an ``ActQuant`` and whether ops
    with no INT8 kernel are rewritten into ops that have one. Ops in neither table run float between
    DequantizeLinear and QuantizeLinear; a tensor that feeds a quantized op is quantized for it all the same."""

    runtime: str
    layer_output: Literal["quant_after", "boundary"]  # a conv's output: always quantized, or for quantized users only
    quant_after_modules: tuple[type[nn.Module], ...]
    quant_after_funcs: frozenset
    quant_after_methods: frozenset
    quantized_input_funcs: frozenset  # INT8 inputs, float output (OpenVINO's activation MatMul and Add)
    quantized_input_methods: frozenset
    int8_rewrites: bool  # SiLU as Sigmoid * x, Hardswish as QHardSwish, sums as adds (ORT's QLinear* kernels)
    float_why: str  # what the report says of an op that runs float


# ONNX Runtime fuses DequantizeLinear -> op -> QuantizeLinear into an INT8 kernel (QLinearConv, QLinearAdd, ...):
# every op with such a kernel gets an ActQuant on its output, so the next op reads INT8 too
ONNXRUNTIME = OpTable(
    "onnxruntime", "quant_after", _QUANT_AFTER_MODULES, frozenset(_QUANT_AFTER_FUNCS),
    frozenset(_QUANT_AFTER_METHODS), frozenset(), frozenset(), True, "no INT8 kernel in ONNX Runtime")

# OpenVINO's low-precision transformations quantize the inputs of convolutions, MatMuls and Adds and fold the
# activation after a convolution (ReLU, Swish, HSwish, Sigmoid) into it as a post-op: quantizers go only where
# such an op reads, and everything else (activations, SE gates and their pools) runs in the runtime's float
# precision (bf16 on CPUs with native bf16) without QuantizeLinear/DequantizeLinear around it. Measured on
# EfficientNet-B0 (224 px, batch 8, Xeon with AMX): INT8 residual adds 1.42x float ones, INT8 SE gates 0.62x.
OPENVINO = OpTable(
    "openvino", "boundary", (), frozenset(), frozenset(), frozenset(_MATMUL | _ADD), frozenset({"matmul", "add"}),
    False, "float in OpenVINO (fused into the conv before it where it can be)")

TARGETS = {t.runtime: t for t in (ONNXRUNTIME, OPENVINO)}


def op_table(runtime: str) -> OpTable:
    """The placement table of ``runtime`` (``qat.target``)."""
    return TARGETS[runtime]
