"""Attention in ops that fx traces and ONNX Runtime runs on INT8 kernels: ``SelfAttention`` (``nn.MultiheadAttention``,
a pruned ``HeadAttention``, and the attention modules the families register for it), and ``_unroll_attention``,
which puts it and the families' own unrolled forms (``pipeline.families.attentions``) into a copy of the model
before it is traced."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import families
from pipeline.errors import PipelineError
from pipeline.models import HeadAttention, inside, is_plain_mha, replace_module


class SelfAttention(nn.Module):
    """Self-attention (``nn.MultiheadAttention`` in a ViT, a pruned one's ``HeadAttention``, a family's attention
    called as ``attn(x) -> x`` with ``qkv`` / ``proj`` linears), written in ops that ``torch.fx`` traces, and
    called as the module it replaces.

    Left whole, ``nn.MultiheadAttention`` is one opaque float op between DequantizeLinear and QuantizeLinear.
    Unrolled, the q/k/v/out projections become ``QLinear`` (INT8 MatMul in ORT; q, k and v separate, so no
    float slicing of a fused qkv output), ``q @ k^T`` an INT8 matmul with float output (MatMulIntegerToFloat), the
    softmax float (ORT's QLinearSoftmax is several times slower) with its output quantized to [0, 1), and ``attn @
    v`` QLinearMatMul. The softmax scale is folded into q's weights. Same outputs as the module (``need_weights``
    is ignored: the weights are not returned).
    """

    def __init__(self, mod: nn.Module):
        super().__init__()
        self.timm = not isinstance(mod, (nn.MultiheadAttention, HeadAttention))  # called as attn(x) -> x
        if isinstance(mod, HeadAttention) or self.timm:
            weight, bias, scale, self.out_proj = mod.qkv.weight, mod.qkv.bias, mod.scale, mod.proj
        else:
            weight, bias, scale, self.out_proj = mod.in_proj_weight, mod.in_proj_bias, mod.head_dim**-0.5, mod.out_proj
        self.num_heads, self.head_dim = mod.num_heads, mod.head_dim
        self.dropout = float(mod.attn_drop.p if self.timm else mod.dropout)
        self.proj_drop = mod.proj_drop if self.timm else nn.Identity()
        self.q, self.k, self.v = families.split_qkv(weight, bias, scale)

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


def _unroll_attention(model: nn.Module, float_layers: tuple[str, ...], image_size: int) -> nn.Module:
    """A copy of ``model`` with its self-attention ``nn.MultiheadAttention`` modules (batch_first, no extra
    k/v) and pruned ones (``HeadAttention``) replaced by ``SelfAttention``, the attention modules the families
    register (``pipeline.families.attentions``) by their unrolled forms (for the input sizes an ``image_size``
    image gives them, where they need them) and other attention with a ``fused_attn`` switch on its explicit
    path (q @ k^T, softmax, @ v) instead of SDPA; ``model`` itself when there is none (the caller's float model
    is kept)."""
    rules = families.attentions()

    def rule(m: nn.Module) -> families.Attention | None:
        if is_plain_mha(m) or isinstance(m, HeadAttention):
            return _SELF
        return next((r for r in rules if r.matches(m)), None)

    names = [n for n, m in model.named_modules()
             if (getattr(m, "fused_attn", False) is True or rule(m) is not None) and not inside(n, float_layers)]
    if not names:
        return model
    model = copy.deepcopy(model)
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: sizes.__setitem__(n, tuple(i[0].shape[1:3])))
        for n in names if (r := rule(model.get_submodule(n))) is not None and r.sized]
    if hooks:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
        for hook in hooks:
            hook.remove()
    for name in names:
        mod = model.get_submodule(name)
        if isinstance(mod, (nn.MultiheadAttention, HeadAttention)):
            replace_module(model, name, SelfAttention(mod))
        elif (r := rule(mod)) is not None:
            replace_module(model, name, r.unroll(mod, sizes.get(name)) if r.unroll else SelfAttention(mod))
        else:
            mod.fused_attn = False
    return model


_SELF = families.Attention(lambda m: True, None, False)  # the core's own: nn.MultiheadAttention, HeadAttention
