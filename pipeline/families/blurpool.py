"""timm's ``BlurPool2d`` (anti-aliased downsampling: TResNet, ResNet-blur), a fixed depthwise filter held as a
per-channel buffer, which Torch-Pruning does not know: without a pruning function its width stayed fixed while the
layers around it shrank, so they were kept unpruned."""

from __future__ import annotations

from torch import nn

from pipeline import families


@families.pruner
def _pruners() -> dict[type, object]:
    try:
        from timm.layers.blur_pool import BlurPool2d
    except ImportError:  # timm is an optional extra
        return {}

    class ChannelwisePruner(families.pruning_function_base()):
        """A layer whose output channel i is a function of its input channel i alone (in and out prune
        together): its per-channel buffer ``filt`` and ``channels`` follow the kept channels."""

        def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
            keep = sorted(set(range(layer.filt.shape[0])) - set(idxs))
            layer.filt = layer.filt[keep].clone()
            layer.channels = len(keep)
            return layer

        prune_in_channels = prune_out_channels  # one function: Torch-Pruning couples in and out through it

        def get_out_channels(self, layer: nn.Module) -> int:
            return layer.filt.shape[0]

        get_in_channels = get_out_channels

    return {BlurPool2d: ChannelwisePruner()}
