"""Attention in ops that fx traces and ONNX Runtime runs on INT8 kernels: ``SelfAttention`` (``nn.MultiheadAttention``,
a pruned ``HeadAttention``, timm's plain ``Attention``), ``WindowAttention`` (torchvision's Swin), and
``_unroll_attention``, which puts them into a copy of the model before it is traced."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import PipelineError
from pipeline.models import HeadAttention, inside, is_plain_mha, replace_module


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
window_attention_bias.__module__ = "pipeline.quant"  # so traced graphs name it as before the package (re-exported)


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
