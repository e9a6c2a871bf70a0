"""timm's plain ``Attention`` (ViT, DeiT): unrolled into the core's ``SelfAttention`` for quantization."""

from __future__ import annotations

from torch import nn

from pipeline import families

_TIMM_ATTENTION = ("timm.layers.attention", "timm.models.vision_transformer")  # its module, now and in older timm


def is_timm_attention(mod: nn.Module) -> bool:
    """timm's plain ``Attention`` (ViT, DeiT): one ``qkv`` linear, no q/k norms, no gate. Other timm classes named
    Attention (BEiT's position bias, LeViT, EfficientFormer, PVT) compute more and keep their explicit path."""
    return type(mod).__name__ == "Attention" and type(mod).__module__ in _TIMM_ATTENTION \
        and all(isinstance(getattr(mod, n, nn.Identity()), nn.Identity) for n in ("q_norm", "k_norm", "norm")) \
        and getattr(mod, "gate", None) is None and isinstance(getattr(mod, "qkv", None), nn.Linear)


families.attention(is_timm_attention)  # the core's SelfAttention
