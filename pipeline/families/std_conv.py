"""timm's weight-standardised convs (``StdConv2d`` family: BiT, NFNet, NF-ResNet, ViT hybrids): the weight is
standardised on every call. For quantization they are folded into plain convs holding the standardised weights
(as BN folds into a conv; fx would trace the arithmetic and leave the conv float); while Torch-Pruning analyses the
model they run as plain convs (through the standardisation it loses the channel dependencies). Their per-channel
``gain`` is pruned by the core's conv pruning functions (``pipeline.pruning._std_convs``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import families
from pipeline.families import STD_CONVS


def is_std_conv(m: nn.Module) -> bool:
    return type(m).__name__ in STD_CONVS


def plain_conv(mod: nn.Module) -> nn.Module:
    """The plain conv holding ``mod``'s standardised weights (same outputs)."""
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
    return conv


families.plain_layer(is_std_conv, plain_conv)


@families.analysable
def _analysable() -> list[tuple[object, str, object]]:
    try:
        from timm.layers import std_conv
    except ImportError:  # timm is an optional extra
        return []

    def plain(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "same_pad", False):
            x = std_conv.pad_same(x, self.kernel_size, self.stride, self.dilation)
        return self._conv_forward(x, self.weight, self.bias)

    return [(getattr(std_conv, n), "forward", plain) for n in STD_CONVS if hasattr(std_conv, n)]
