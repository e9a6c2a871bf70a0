"""timm's Selective Kernel (SKNet) for channel pruning: its forward stacks the paths into a 5-D tensor and views the
attention's output as (paths, channels), which Torch-Pruning cannot map, so every path and ``fc_select`` kept their
channels. While it analyses the model the paths are summed (one width) and ``fc_select``'s output is split into one
gate per path (the same channels of each), a split whose mapping stays Torch-Pruning's own. Where the input is split
across the paths (``split_input``), the split is written as channel slices, which keep the layers writing that input
whole (the core's partial-channel-slice rule): the forward splits it into equal parts of a fixed width (a split with
two uses of a part is one Torch-Pruning maps wrongly)."""

from __future__ import annotations

import torch
from torch import nn

from pipeline import families


@families.analysable
def _analysable() -> list[tuple[object, str, object]]:
    try:
        from timm.layers.selective_kernel import SelectiveKernel
    except ImportError:  # timm is an optional extra
        return []

    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        n = self.num_paths
        if self.split_input:
            w = x.shape[1] // n
            parts = [x[:, i * w:(i + 1) * w] for i in range(n)]
        else:
            parts = [x] * n
        paths = [op(p) for op, p in zip(self.paths, parts, strict=True)]
        s = sum(paths[1:], paths[0])
        a = self.attn
        g = a.fc_select(a.act(a.bn(a.fc_reduce(s.mean((2, 3), keepdim=True)))))
        gates = torch.split(g, g.shape[1] // n, 1)
        gated = [p * w for p, w in zip(paths, gates, strict=True)]
        return sum(gated[1:], gated[0])

    return [(SelectiveKernel, "forward", forward)]


@families.split_kept
def _gate_convs(model: nn.Module) -> set[nn.Module]:
    """The gate conv's split: the same channels of every part (the analysable form's groups are written for
    Torch-Pruning's order mapping)."""
    return {m.attn.fc_select for m in model.modules() if type(m).__name__ == "SelectiveKernel"}
