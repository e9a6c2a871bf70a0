"""Model registry: CIFAR ResNets, torchvision classifiers with a small-input stem, user models.

``build_model(cfg)`` takes a plain dict (the ``model`` config section) so that a checkpoint can
store it and rebuild the same architecture later. Structurally pruned models are rebuilt by
``apply_shapes``: the recorded per-layer shapes are applied to a fresh model before the state
dict is loaded, so no module is ever pickled.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from pipeline.config import not_in_key
from pipeline.errors import PipelineError

CIFAR_RESNET_DEPTHS = {"resnet8": 8, "resnet14": 14, "resnet20": 20, "resnet32": 32,
                       "resnet44": 44, "resnet56": 56, "resnet110": 110}


@dataclass
class ModelConfig:
    """``conf/model/*.yaml``. Either ``name`` from the registry, or ``target`` (+ ``kwargs``)."""

    name: str | None  # registry name (resnet20, resnet18, mobilenet_v2, ...)
    num_classes: int
    image_size: int  # input height = width (follows data.image_size); transformers are built for it
    width: float  # CIFAR ResNets: channel multiplier (1.0 = 16/32/64 channels)
    small_input: bool  # torchvision models: 3x3 stride-1 stem, no max-pool (32x32 inputs)
    target: str | None  # dotted path of a user nn.Module class (alternative to name)
    kwargs: dict | None  # extra constructor arguments (target, timm, torchvision builders); null = none
    family: Literal["auto", "timm"]  # auto: CIFAR ResNets, then torchvision; timm: timm.create_model(name)
    weights: str | None  # starting weights: a torchvision weights name (DEFAULT, ...), a file, or null
    download: bool = not_in_key()  # let torchvision / timm download named weights (never implicit)

    def __post_init__(self) -> None:
        # null in YAML (so that 'model.kwargs={...}' can replace it), {} in artifact keys as before
        self.kwargs = self.kwargs or {}

    def check(self) -> list[str]:
        if (self.name is None) == (self.target is None):
            return ["name: set exactly one of model.name (registry) or model.target (your class)"]
        if self.family == "timm":
            return _timm_check(self.name)
        if self.name is not None and self.name not in available_models():
            return [f"name: unknown model {self.name!r}; choose one of "
                    f"{', '.join(sorted(CIFAR_RESNET_DEPTHS))} or a torchvision classifier"]
        if self.width <= 0:
            return [f"width: {self.width} must be > 0"]
        if self.kwargs and self.name in CIFAR_RESNET_DEPTHS:
            return [f"kwargs: {self.kwargs}: the CIFAR ResNets take no constructor arguments; use model.width, "
                    "or drop model.kwargs"]
        return []


# ---------------------------------------------------------------- CIFAR ResNet (He et al. 2016)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:  # option B: 1x1 projection (prunable and ONNX friendly)
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs with three stages of 16/32/64 x ``width`` channels."""

    def __init__(self, depth: int, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        if (depth - 2) % 6:
            raise PipelineError(f"CIFAR ResNet depth {depth} must be 6n+2 (20, 32, 44, 56, ...)")
        n = (depth - 2) // 6
        chans = [max(1, round(c * width)) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(3, chans[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(chans[0])
        self.relu = nn.ReLU(inplace=True)
        layers, cin = [], chans[0]
        for i, c in enumerate(chans):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, c, 2 if (i > 0 and j == 0) else 1))
                cin = c
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


# ---------------------------------------------------------------- torchvision


def _torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def available_models() -> list[str]:
    return sorted(CIFAR_RESNET_DEPTHS) + _torchvision_names()


NEEDS_LARGE_INPUT = ("googlenet", "inception_v3")  # stems and aux heads built for >= 75 px
PATCH_LAYOUT = ("vit_", "swin_", "maxvit_")  # transformers: built for data.image_size, stems unchanged


def _small_input_stem(model: nn.Module, name: str) -> None:
    """Adapt an ImageNet stem to ~32 px inputs, by one rule for every torchvision CNN family.

    The first conv gets stride 1 (ResNet/ResNeXt/Wide ResNet: a 3x3 stride-1 conv instead of 7x7/2) and a
    max-pool between it and the next conv is removed (ResNet, ShuffleNet, DenseNet, SqueezeNet, AlexNet).
    Patchify stems (kernel == stride, ConvNeXt) stay: at 32 px they leave 8x8 maps, enough for the stages
    that follow. Transformers keep their patch layout (see ``PATCH_LAYOUT``); Inception/GoogLeNet need
    larger inputs and are an error.
    """
    if name.startswith(NEEDS_LARGE_INPUT):
        raise PipelineError(f"{name} needs inputs of at least 75x75 (its stem and auxiliary heads); set "
                            "model.small_input=false and data.image_size=299 (inception_v3) or >= 96 (googlenet)")
    if name.startswith(PATCH_LAYOUT):
        return
    if hasattr(model, "conv1") and hasattr(model, "maxpool") and isinstance(model.conv1, nn.Conv2d):
        old = model.conv1  # ResNet / ResNeXt / Wide ResNet
        model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
        return
    convs_seen = 0
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                convs_seen += 1
                if convs_seen == 1 and child.kernel_size != child.stride:
                    child.stride = (1, 1)
                elif convs_seen == 1:
                    return  # a patchify stem: kept
            elif isinstance(child, nn.MaxPool2d) and convs_seen == 1:
                setattr(parent, child_name, nn.Identity())  # the stem's max-pool
                return
            if convs_seen > 1:
                return
    if convs_seen == 0:
        raise PipelineError(f"no convolutional stem found in {name!r}; set model.small_input=false")


def _import(dotted: str) -> Any:
    import importlib

    module, _, attr = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise PipelineError(f"model.target={dotted!r} cannot be imported ({e}); give module.Class") from None


MODEL_DEFAULTS = {"image_size": 32, "width": 1.0, "small_input": True, "target": None, "kwargs": {}, "family": "auto",
                  "weights": None, "download": False}  # keys an older checkpoint's model dict may lack


def _timm_check(name: str | None) -> list[str]:
    try:
        import timm
    except ImportError:
        return ["family: timm is not installed; pip install -e '.[timm]'"]
    if not timm.list_models(name) and not timm.list_models(name, pretrained=True):
        return [f"name: {name!r} is not a timm model; see timm.list_models('*{name}*')"]
    return []


def _timm_model(mc: ModelConfig) -> nn.Module:
    import timm

    kw = {"pretrained": False, "num_classes": mc.num_classes, **mc.kwargs}
    try:  # transformers are built for the data's size; CNNs take no img_size
        return timm.create_model(mc.name, img_size=mc.image_size, **kw)
    except TypeError:
        return timm.create_model(mc.name, **kw)


def build_model(cfg: dict) -> nn.Module:
    """Build an untrained model from a ``model`` config dict (no weights are downloaded).

    ``cfg["target"]`` is imported and called: pass only a target the user configured (``load_model``
    checks checkpoints against it before calling this).
    """
    mc = ModelConfig(**{**MODEL_DEFAULTS, **cfg})
    if mc.target:
        cls = _import(mc.target)
        try:
            return cls(num_classes=mc.num_classes, **mc.kwargs)
        except Exception as e:  # the user's constructor rejected its arguments
            raise PipelineError(f"model.target={mc.target}(num_classes={mc.num_classes}, **{mc.kwargs}) failed "
                                f"({type(e).__name__}: {str(e)[:200]}); check model.kwargs") from None
    if mc.family == "timm":
        if problems := _timm_check(mc.name):
            raise PipelineError(f"model.{problems[0]}")
        return _timm_model(mc)
    if mc.name not in available_models():
        raise PipelineError(f"unknown model {mc.name!r}; choose one of {', '.join(sorted(CIFAR_RESNET_DEPTHS))} "
                            "or a torchvision classifier")
    if mc.name in CIFAR_RESNET_DEPTHS:
        return CifarResNet(CIFAR_RESNET_DEPTHS[mc.name], mc.num_classes, mc.width)
    import torchvision

    extra = ({"image_size": mc.image_size} if mc.name.startswith("vit_") else
             {"input_size": (mc.image_size, mc.image_size)} if mc.name.startswith("maxvit_") else {})
    try:
        model = torchvision.models.get_model(mc.name, weights=None, num_classes=mc.num_classes, **extra, **mc.kwargs)
    except TypeError as e:  # an argument the builder does not take
        raise PipelineError(f"model.kwargs={mc.kwargs}: torchvision's {mc.name} rejected them ({str(e)[:200]}); "
                            "check model.kwargs") from None
    except (ValueError, AssertionError) as e:  # a size it cannot take (ViT: patch multiples, MaxViT: 224 px's)
        raise PipelineError(f"{mc.name} cannot be built for data.image_size={mc.image_size} "
                            f"({str(e).splitlines()[0]}); choose another data.image_size") from None
    if mc.small_input:
        _small_input_stem(model, mc.name)
    return model


# ---------------------------------------------------------------- pruned shapes


class HeadAttention(nn.Module):
    """Self-attention with its own head count and width, in timm's ``Attention`` layout (one ``qkv`` linear,
    one ``proj``). ``nn.MultiheadAttention`` ties both to ``embed_dim``; channel pruning puts this in its place
    so heads can be narrowed or dropped. Called as the module it replaces: ``attn(x, x, x, need_weights=False)``
    returns ``(out, None)`` (self-attention only: other keys or values are an error)."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.attn_dim = num_heads, head_dim, num_heads * head_dim
        self.scale = head_dim**-0.5
        self.dropout = dropout
        self.fused_attn = True  # scaled_dot_product_attention; False: the explicit path quantization traces
        self.qkv = nn.Linear(embed_dim, 3 * self.attn_dim, bias=bias)
        self.proj = nn.Linear(self.attn_dim, embed_dim, bias=bias)

    @classmethod
    def of(cls, mha: nn.MultiheadAttention) -> HeadAttention:
        """The same function as ``mha`` used as self-attention (``is_plain_mha``)."""
        new = cls(mha.embed_dim, mha.num_heads, mha.head_dim, float(mha.dropout), mha.in_proj_bias is not None)
        with torch.no_grad():
            new.qkv.weight.copy_(mha.in_proj_weight)
            new.proj.weight.copy_(mha.out_proj.weight)
            if new.qkv.bias is not None:
                new.qkv.bias.copy_(mha.in_proj_bias)
                new.proj.bias.copy_(mha.out_proj.bias)
        return new

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                need_weights: bool = False, **_: Any) -> tuple[torch.Tensor, None]:
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise PipelineError("HeadAttention is self-attention: it was given other keys or values; exclude "
                                "this attention from pruning with prune.exclude")
        b, n, _ = query.shape
        q, k, v = self.qkv(query).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        drop = self.dropout if self.training else 0.0
        if self.fused_attn:
            x = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=drop, scale=self.scale)
        else:
            attn = (q * self.scale @ k.transpose(-2, -1)).softmax(dim=-1)
            if drop:  # no dropout node otherwise: it would sit float between the softmax and the matmul
                attn = nn.functional.dropout(attn, drop)
            x = attn @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, self.attn_dim)), None


def is_plain_mha(m: nn.Module) -> bool:
    """``nn.MultiheadAttention`` in the form self-attention uses (ViT): batch_first, one in-projection, no extra
    key/value biases or zero attention."""
    return (isinstance(m, nn.MultiheadAttention) and m.batch_first and m._qkv_same_embed_dim
            and m.in_proj_weight is not None and m.bias_k is None and not m.add_zero_attn)


STD_CONVS = ("StdConv2d", "ScaledStdConv2d", "StdConv2dSame", "ScaledStdConv2dSame")  # timm's weight-standardised
# convs (BiT, NFNet, NF-ResNet, ViT hybrids): the weight is standardised on every call (quant folds, pruning patches)


def is_attention(m: nn.Module) -> bool:
    """Attention with one fused q/k/v linear and ``num_heads`` / ``head_dim`` (timm's ``Attention``)."""
    return (isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int)
            and isinstance(getattr(m, "head_dim", None), int))


def module_shapes(model: nn.Module) -> dict[str, dict[str, int]]:
    """Channel counts of every conv / linear / norm layer (what structured pruning changes)."""
    shapes = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            shapes[name] = {"in": m.in_channels, "out": m.out_channels, "groups": m.groups}
            if extra := _own_tensors(m, skip=("weight", "bias")):  # a per-channel gain (timm's ScaledStdConv2d)
                shapes[name]["tensors"] = extra
        elif isinstance(m, nn.Linear):
            shapes[name] = {"in": m.in_features, "out": m.out_features}
        elif isinstance(m, nn.BatchNorm2d):
            shapes[name] = {"out": m.num_features}
        elif isinstance(m, nn.Identity) and name:
            shapes[name] = {"identity": 1}  # a block removed by depth pruning (or an Identity already)
        elif is_attention(m):  # timm-style attention: head count, width, softmax scale (pruned with the qkv linear)
            shapes[name] = {"heads": {"num_heads": m.num_heads, "head_dim": m.head_dim,
                                      **({"scale": float(m.scale)} if hasattr(m, "scale") else {})}}
        elif own := _own_tensors(m):  # any other layer with its own tensors (LayerNorm, layer scales): their shapes
            shapes[name] = {"tensors": own}
    return shapes


def _own_tensors(m: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, list[int]]:
    return {n: list(t.shape) for n, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]
            if t is not None and n not in skip}


def unknown_layer_errors(key: str, wanted: list[str], model: nn.Module, model_name: str) -> list[str]:
    """One config error per name in ``wanted`` that is not a submodule of ``model``."""
    names = [n for n, _ in model.named_modules() if n]
    known = set(names)
    return [f"{key}: no layer named {n!r} in {model_name}; layer names look like {', '.join(names[:4])}"
            for n in wanted if n not in known]


def inside(name: str, prefixes: Iterable[str]) -> bool:
    """``name`` is one of the modules named in ``prefixes`` or lies inside one."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in the place of the submodule ``name``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def replace_with_identity(model: nn.Module, name: str) -> None:
    """Replace the submodule ``name`` (e.g. a residual block) by ``nn.Identity``."""
    replace_module(model, name, nn.Identity())


def apply_shapes(model: nn.Module, shapes: dict[str, dict[str, int]]) -> nn.Module:
    """Resize layers of a freshly built model to recorded shapes (weights are then loaded)."""
    modules = dict(model.named_modules())
    for name, s in shapes.items():
        m = modules.get(name)
        if m is None:
            raise PipelineError(f"pruned shape for unknown layer {name!r}; the checkpoint is from another model")
        if "identity" in s:
            replace_with_identity(model, name)
        elif "heads" in s:
            if isinstance(m, nn.MultiheadAttention):  # pruning had put a HeadAttention in its place
                m = HeadAttention.of(m)
                replace_module(model, name, m)
                modules = dict(model.named_modules())
            m.num_heads, m.head_dim = s["heads"]["num_heads"], s["heads"]["head_dim"]
            if hasattr(m, "attn_dim"):
                m.attn_dim = m.num_heads * m.head_dim
            if "scale" in s["heads"]:  # absent in checkpoints from before it was recorded: the built scale
                m.scale = s["heads"]["scale"]
        elif isinstance(m, nn.Conv2d):
            m.in_channels, m.out_channels, m.groups = s["in"], s["out"], s["groups"]
            kh, kw = m.kernel_size
            m.weight = nn.Parameter(torch.empty(s["out"], s["in"] // s["groups"], kh, kw))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(s["out"]))
            _resize_tensors(m, s.get("tensors", {}))
        elif isinstance(m, nn.Linear):
            m.in_features, m.out_features = s["in"], s["out"]
            m.weight = nn.Parameter(torch.empty(s["out"], s["in"]))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(s["out"]))
        elif isinstance(m, nn.BatchNorm2d):
            m.num_features = s["out"]
            for attr in ("weight", "bias"):
                if getattr(m, attr) is not None:
                    setattr(m, attr, nn.Parameter(torch.empty(s["out"])))
            for attr in ("running_mean", "running_var"):
                if getattr(m, attr) is not None:
                    setattr(m, attr, torch.empty(s["out"]))
        elif "tensors" in s:
            _resize_tensors(m, s["tensors"])
            if isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.normalized_shape = tuple(m.weight.shape)
            elif isinstance(m, nn.GroupNorm) and m.weight is not None:
                m.num_channels = m.weight.shape[0]
            elif is_blur_pool(m):  # its filter is not in the state_dict (non-persistent): made for the width
                m.channels = m.filt.shape[0]
                m.init_non_persistent_buffers()
    return model


def is_blur_pool(m: nn.Module) -> bool:
    """timm's ``BlurPool2d`` with a filter per channel (TResNet, ResNet-blur; pruning narrows it)."""
    return type(m).__name__ == "BlurPool2d" and isinstance(getattr(m, "channels", None), int)


def _resize_tensors(m: nn.Module, shapes: dict[str, list[int]]) -> None:
    """Give ``m``'s own parameters and buffers named in ``shapes`` those shapes (empty; weights load next)."""
    params = dict(m.named_parameters(recurse=False))
    for attr, shape in shapes.items():
        t = getattr(m, attr, None)
        if t is not None and list(t.shape) != shape:
            setattr(m, attr, nn.Parameter(torch.empty(shape)) if attr in params else torch.empty(shape))


def check_trusted(model_cfg: dict, trusted_target: str | None, source: str) -> None:
    """A checkpoint never chooses code: it may name a registry model, or the ``model.target`` the user
    configured, nothing else. Raises before anything is imported."""
    target, name = model_cfg.get("target"), model_cfg.get("name")
    if target is not None and target != trusted_target:
        raise PipelineError(
            f"{source} names the model class {target!r}, but the configured model.target is {trusted_target!r}; "
            f"a checkpoint never chooses code: if you trust that class, run with model=custom model.target={target}"
        )
    if target is None and not isinstance(name, str):
        raise PipelineError(f"{source} names no model (model_cfg {model_cfg!r}); it was not written by this pipeline")


def load_model(ckpt: dict, source: str, trusted_target: str | None) -> nn.Module:
    """Rebuild the model stored in a checkpoint dict (see ``pipeline.artifacts``).

    ``trusted_target`` is the user's configured ``model.target`` (None when the model comes from the
    registry); a checkpoint that names any other class is refused before it is imported.
    """
    from pipeline.artifacts import CKPT_MODEL_CFG, CKPT_SHAPES, CKPT_STATE, detached_state

    check_trusted(ckpt[CKPT_MODEL_CFG], trusted_target, source)
    model = build_model(ckpt[CKPT_MODEL_CFG])
    apply_shapes(model, ckpt[CKPT_SHAPES])
    state = ckpt[CKPT_STATE]
    if not hasattr(state, "_metadata"):  # a checkpoint saved without module versions: this code's are right
        state = detached_state(state)
        state._metadata = model.state_dict()._metadata
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise PipelineError(
            f"{source} does not fit model {ckpt[CKPT_MODEL_CFG].get('name') or ckpt[CKPT_MODEL_CFG].get('target')} "
            f"({first}); use the model config it was trained with"
        ) from None
    return model


# ---------------------------------------------------------------- size


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, image_size: int) -> int:
    """Multiply-accumulates of one forward pass at batch 1: convs and linears, with the projections of
    ``nn.MultiheadAttention`` (it runs them as functions, so its Linear submodule is never called)."""
    total = 0

    def hook(m: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total += out.numel() * m.in_features
        elif isinstance(m, nn.MultiheadAttention):  # q and out projections per query, k / v per key / value
            q, k, v = (*inp, *[inp[0]] * 3)[:3]
            e = m.embed_dim
            total += q.numel() // e * 2 * e * e + k.numel() // m.kdim * m.kdim * e + v.numel() // m.vdim * m.vdim * e

    layers = (nn.Conv2d, nn.Linear, nn.MultiheadAttention)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, layers)]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return int(total)
