"""torchvision's Swin: window attention unrolled for quantization (``WindowAttention``), and for channel pruning the
layers that write its token stream kept (their widths are fixed by its forward code) and its window attention and
patch merging in analysable forms."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import swin_transformer as swin

from pipeline import families


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
window_attention_bias.__module__ = "pipeline.quant"  # traced graphs name it as before (pipeline.quant re-exports it)
families.graph_function(window_attention_bias)


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
        self.q, self.k, self.v = families.split_qkv(swa.qkv.weight, swa.qkv.bias, (c // h) ** -0.5)
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


def is_window_attention(mod: nn.Module) -> bool:
    return type(mod) is swin.ShiftedWindowAttention  # not V2 (cosine attention, a position MLP)


families.attention(is_window_attention, WindowAttention, sized=True)


@families.kept_widths
def _kept(m: nn.Module) -> list[nn.Module]:
    """Everything that writes the token stream (attention qkv/proj, patch merging, the MLPs' second linear: its
    forward derives the head width from the stream width), so the MLPs are pruned."""
    if isinstance(m, swin.ShiftedWindowAttention):
        return [m.qkv, m.proj]
    if isinstance(m, (swin.PatchMerging, swin.PatchMergingV2)):
        return [m.reduction]
    if isinstance(m, swin.SwinTransformerBlock):
        return [lin for lin in m.mlp.modules() if isinstance(lin, nn.Linear)][-1:]
    return []


@families.analysable
def _analysable() -> list[tuple[object, str, object]]:
    """Window attention and patch merging (Torch-Pruning's analysis of them ran out of 24 GB) as the same layers on
    the same widths without the window bookkeeping; the layers around them keep their widths (``_kept``)."""

    def attention(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.qkv(x)[..., : x.shape[-1]])

    def merging(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = x[..., ::2, ::2, :]
        return self.reduction(self.norm(torch.cat([x, x, x, x], -1)))

    def merging_v2(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = x[..., ::2, ::2, :]
        return self.norm(self.reduction(torch.cat([x, x, x, x], -1)))

    return [(swin.ShiftedWindowAttention, "forward", attention), (swin.ShiftedWindowAttentionV2, "forward", attention),
            (swin.PatchMerging, "forward", merging), (swin.PatchMergingV2, "forward", merging_v2)]
