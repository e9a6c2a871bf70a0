"""One home per model family: the registries the core (``pipeline.quant``, ``pipeline.pruning``) consults, so the
core names no family. Each module of this package is one family (or one library's layer kind) and registers its
hooks when imported; the registries import every module of ``FAMILIES`` once, the first time one is read.

Hooks (see docs/architecture.md, "Adding a model family"):

- ``whole_function(module, name)``: a library function fx cannot trace (it writes a tensor in place), called whole
  as one float op in the traced graph.
- ``attention(matches, unroll=None, sized=False)``: attention modules unrolled before tracing into ops fx traces
  and ONNX Runtime runs on INT8 kernels: ``unroll(module, hw)`` builds the replacement (``hw``: the (height, width)
  of its input on the model's input size, where ``sized``); ``None`` is the core's ``SelfAttention`` (a module
  called as ``attn(x) -> x`` with ``qkv``, ``proj``, ``num_heads``, ``head_dim``, ``scale``, ``attn_drop``,
  ``proj_drop``).
- ``plain_layer(matches, fold)``: layers computing their weights on every call; ``fold(module)`` returns the plain
  layer holding them, or None after changing ``module`` in place.
- ``graph_function(fn)``: a function a family's modules put into traced graphs, re-exported by ``pipeline.quant``.
- ``kept_widths(fn)``: ``fn(module)`` -> the layers under this one whose output width the library's forward code
  fixes (channel pruning keeps them).
- ``analysable(fn)``: ``fn()`` -> ``(owner, attribute, replacement)`` patches in force while Torch-Pruning traces
  and prunes the model: forms of code it cannot analyse with the same channel dependencies.
- ``pruner(fn)``: ``fn()`` -> ``{layer type: Torch-Pruning pruning function}`` for layers it does not know.
- ``split_kept(fn)``: ``fn(model)`` -> modules whose outputs' channel splits keep Torch-Pruning's own mapping
  (the core maps every other split's users to the parts they read).

Building blocks for the families: ``split_qkv``, ``pruning_function_base()`` and ``STD_CONVS`` (the names of
timm's weight-standardised convs, which the core's pruning also reads).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.models import STD_CONVS as STD_CONVS  # a building block: re-exported for the families

FAMILIES = ("beit", "blurpool", "mvit", "shufflenet", "sknet", "std_conv", "swin", "timm_attention")


@dataclass(frozen=True)
class Attention:
    matches: Callable[[nn.Module], bool]
    unroll: Callable[[nn.Module, tuple[int, int] | None], nn.Module] | None  # None: the core's SelfAttention
    sized: bool  # unroll needs the (height, width) its input has on the model's input size


@dataclass(frozen=True)
class PlainLayer:
    matches: Callable[[nn.Module], bool]
    fold: Callable[[nn.Module], nn.Module | None]  # the plain layer, or None: changed in place


_REG: dict[str, list] = {k: [] for k in ("whole_function", "attention", "plain_layer", "graph_function",
                                         "kept_widths", "analysable", "pruner", "split_kept")}
_BY_FAMILY: dict[str, dict[str, int]] = {}  # family module -> hook kind -> how many it registered
_loaded = False


def _add(kind: str, item: object) -> None:
    family = inspect.currentframe().f_back.f_back.f_globals.get("__name__", "?")
    _REG[kind].append(item)
    counts = _BY_FAMILY.setdefault(family, {})
    counts[kind] = counts.get(kind, 0) + 1


def _read(kind: str) -> tuple:
    global _loaded
    if not _loaded:
        _loaded = True
        for name in FAMILIES:
            importlib.import_module(f"{__name__}.{name}")
    return tuple(_REG[kind])


# ---- registering (a family module, on import)
def whole_function(module: str, name: str) -> None:
    _add("whole_function", (module, name))


def attention(matches: Callable[[nn.Module], bool], unroll=None, sized: bool = False) -> None:
    _add("attention", Attention(matches, unroll, sized))


def plain_layer(matches: Callable[[nn.Module], bool], fold: Callable[[nn.Module], nn.Module | None]) -> None:
    _add("plain_layer", PlainLayer(matches, fold))


def graph_function(fn: Callable) -> Callable:
    _add("graph_function", fn)
    return fn


def kept_widths(fn: Callable[[nn.Module], list[nn.Module]]) -> Callable:
    _add("kept_widths", fn)
    return fn


def analysable(fn: Callable[[], list[tuple[object, str, Callable]]]) -> Callable:
    _add("analysable", fn)
    return fn


def pruner(fn: Callable[[], dict[type, object]]) -> Callable:
    _add("pruner", fn)
    return fn


def split_kept(fn: Callable[[nn.Module], Iterable[nn.Module]]) -> Callable:
    _add("split_kept", fn)
    return fn


# ---- reading (the core)
def whole_functions() -> tuple[tuple[str, str], ...]:
    return _read("whole_function")


def attentions() -> tuple[Attention, ...]:
    return _read("attention")


def plain_layers() -> tuple[PlainLayer, ...]:
    return _read("plain_layer")


def graph_functions() -> dict[str, Callable]:
    return {fn.__name__: fn for fn in _read("graph_function")}


def kept_width_rules() -> tuple[Callable[[nn.Module], list[nn.Module]], ...]:
    return _read("kept_widths")


def analysable_forms() -> list[tuple[object, str, Callable]]:
    return [p for fn in _read("analysable") for p in fn()]


def pruners() -> dict[type, object]:
    out: dict[type, object] = {}
    for fn in _read("pruner"):
        out.update(fn())
    return out


def split_kept_sources(model: nn.Module) -> set[nn.Module]:
    return {m for fn in _read("split_kept") for m in fn(model)}


def registered() -> dict[str, dict[str, int]]:
    """What each family module registered: ``{module: {hook kind: count}}``."""
    _read("attention")
    return {k: dict(v) for k, v in _BY_FAMILY.items()}


# ---- building blocks
def split_qkv(weight: torch.Tensor, bias: torch.Tensor | None, q_scale: float) -> tuple[nn.Linear, ...]:
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


def pruning_function_base() -> type:
    """Torch-Pruning's base class of pruning functions (for ``pruner`` hooks)."""
    from torch_pruning.pruner.function import BasePruningFunc

    return BasePruningFunc
