"""timm's BEiT / EVA attention: a bias-free ``qkv`` linear and q / v biases concatenated on every call (``F.linear``
on its weight, which fx would trace and leave float). Before tracing, the biases become the ``qkv`` linear's."""

from __future__ import annotations

import torch
from torch import nn

from pipeline import families


def is_split_qkv_bias(m: nn.Module) -> bool:
    """A bias-free ``qkv`` linear and q / v biases concatenated on every call."""
    return (isinstance(getattr(m, "qkv", None), nn.Linear) and m.qkv.bias is None
            and isinstance(getattr(m, "q_bias", None), torch.Tensor) and isinstance(getattr(m, "v_bias", None),
                                                                                    torch.Tensor))


def fold_qkv_bias(mod: nn.Module) -> None:
    k_bias = mod.k_bias if isinstance(getattr(mod, "k_bias", None), torch.Tensor) else torch.zeros_like(mod.v_bias)
    mod.qkv.bias = nn.Parameter(torch.cat((mod.q_bias, k_bias, mod.v_bias)).detach().clone())
    mod.q_bias = mod.k_bias = mod.v_bias = None  # its forward then calls the qkv linear


families.plain_layer(is_split_qkv_bias, fold_qkv_bias)
