"""The target runtime, ONNX Runtime on CPUs, as data: the CPU rules (which CPUs have INT8 dot-product kernels, where
narrow convs are faster in FP32, which weight bits avoid saturation) and the op tables the quantizers are placed by
(which ops ORT runs on INT8 kernels). Another runtime would bring its own file with these names."""

from __future__ import annotations

import operator

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
