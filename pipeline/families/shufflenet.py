"""torchvision's ShuffleNetV2 for channel pruning: the convs whose outputs are concatenated and channel-shuffled keep
their widths (the inside of each branch is pruned), and the channel shuffle (a 5-D view, where Torch-Pruning's
reshape analysis divides by zero) is analysed as the channel permutation it is."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import shufflenetv2

from pipeline import families


@families.kept_widths
def _kept(m: nn.Module) -> list[nn.Module]:
    if isinstance(m, shufflenetv2.InvertedResidual):
        return [c for c in m.branch1 if isinstance(c, nn.Conv2d)] + \
            [c for c in m.branch2 if isinstance(c, nn.Conv2d)][-1:]
    return []


@families.analysable
def _analysable() -> list[tuple[object, str, object]]:
    def shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
        c = x.shape[1]
        return x[:, torch.arange(c, device=x.device).view(groups, c // groups).t().reshape(-1)]

    return [(shufflenetv2, "channel_shuffle", shuffle)]
