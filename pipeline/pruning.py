"""Pruning algorithms (no stage logic): depth pruning, channel pruning with Torch-Pruning, magnitude pruning.

``stages/prune.py`` is the recipe that calls these; benchmarks call them too. ``ratio`` is always the
fraction *removed*.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from pipeline import families
from pipeline.errors import PipelineError
from pipeline.models import (
    STD_CONVS,
    HeadAttention,
    apply_shapes,
    count_macs,
    inside,
    is_attention,
    is_plain_mha,
    replace_module,
    replace_with_identity,
)

log = logging.getLogger(__name__)

# finetune(model, epochs, tag): fine-tunes between iterative steps (None: no fine-tuning)
Finetune = Callable[[nn.Module, int, str], None] | None


@dataclass
class ChannelPlan:
    """What channel pruning needs to know: the ``prune.*`` keys of the same names (no defaults here)."""

    ratio: float  # fraction of each layer's output channels removed
    target_macs: float | None  # remove channels until MACs <= this instead (overrides ratio)
    importance: str  # l1 | l2 | bn_scale | taylor
    global_pruning: bool
    keep_first_conv: bool
    exclude: list[str]
    steps: int
    step_epochs: int
    round_to: int | None
    whole_heads: bool  # attention: remove whole heads instead of narrowing every head

    @classmethod
    def of(cls, settings: object) -> ChannelPlan:
        """The plan from any object with these attributes (the prune stage's bound config)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


def block_shapes(model: nn.Module, names: list[str], size: int) -> dict[str, tuple[list, list]]:
    """Input and output shapes of the named modules, from one forward pass at ``size``."""
    shapes, hooks = {}, []
    for n in names:
        hooks.append(model.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: shapes.__setitem__(n, (list(i[0].shape), list(o.shape)))))
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return shapes


def drop_blocks(model: nn.Module, names: list[str]) -> nn.Module:
    """Depth pruning: each named residual block becomes ``nn.Identity`` (its branch removed).

    Exact for blocks whose output is ``relu(branch(x) + x)`` with a non-negative input ``x``
    (ResNets: the block input is the previous block's ReLU output); then fine-tuning/KD recovers.
    """
    for n in names:
        replace_with_identity(model, n)
    return model


def classifier(model: nn.Module) -> nn.Module | None:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def kept_layers(model: nn.Module, exclude: list[str], keep_first_conv: bool) -> list[nn.Module]:
    """Layers whose output channels are never pruned: ``exclude``, the classifier, optionally the stem.

    The stem (patch embedding) is always kept when the model has ``nn.MultiheadAttention``: its embedding
    width is fixed by the module's ``embed_dim`` / ``num_heads`` (torchvision's ViT also reads ``hidden_dim``).
    So it is for the families whose forward code fixes widths, with the layers ``_architecture_kept`` names.
    """
    named = dict(model.named_modules())
    kept = [named[n] for n in exclude]
    if (fc := classifier(model)) is not None:
        kept.append(fc)
    fixed = _architecture_kept(model)
    if keep_first_conv or fixed or any(isinstance(m, (nn.MultiheadAttention, HeadAttention)) for m in model.modules()):
        kept.append(next(m for m in model.modules() if isinstance(m, nn.Conv2d)))
    return kept + fixed


def _architecture_kept(model: nn.Module) -> list[nn.Module]:
    """Layers whose outputs must keep their width for the library's forward code (the families'
    ``pipeline.families.kept_widths`` rules, module by module)."""
    rules = families.kept_width_rules()
    out = []
    for m in model.modules():
        for rule in rules:
            out += rule(m)
    return out


@contextlib.contextmanager
def _analysable() -> Iterator[None]:
    """Library code Torch-Pruning cannot analyse, in analysable forms while it traces the model: the families'
    forms (``pipeline.families.analysable``: the same layers on the same widths, the layers around them kept by
    ``_architecture_kept`` where the forms drop bookkeeping, so only the dependencies these forms show matter),
    bounded group searches, weight-standardised convs as plain convs and the split / concatenation mappings."""
    patches = families.analysable_forms()
    patches += _bounded_groups() + list(_std_convs()) + _split_and_concat_mapping()
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, form in patches:
        setattr(owner, name, form)
    try:
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def _split_and_concat_mapping() -> list[tuple[object, str, Callable]]:
    """Torch-Pruning maps a channel split's i-th user (in the order its trace met them) to its i-th part: where
    that order is not the parts' (multi-scale blocks splitting their width into groups) or a part has two users
    (a cross-stage partial stage's half feeding both a block's conv and its shortcut), users got another part's
    channels, and a split by one part size counted one part per user, which ended the analysis (``int +
    NoneType`` in its concat mapping). Here every user gets the part it reads (autograd's output number),
    except the splits of the modules the families name (``pipeline.families.split_kept``). Its split pruner
    updates the part sizes but not the offsets the mapping reads, so later groups of a step used the unpruned
    offsets: they are recomputed each time. In a concatenation, where its channel inference gives up (slices of
    concatenations of concatenations) the traced map's channels answer, and a concatenation of tokens (a class
    token: 3-D, dimension 1), which it took for one of channels and stopped on, gets no mapping: every input has
    the same channels."""
    from torch_pruning import ops
    from torch_pruning.dependency import index_mapping, shape_infer

    init, mapping = shape_infer.init_shape_information, index_mapping.update_split_index_mapping
    concat = index_mapping.update_concat_index_mapping
    between, out_channels = shape_infer.infer_channels_between, shape_infer.infer_out_channels_recursively

    def part(split, user) -> int | None:
        return getattr(split.module, "part_of", {}).get(user) if split.type == ops.OPTYPE.SPLIT else None

    def init_shape_information(graph) -> None:
        init(graph)
        own_mapping = families.split_kept_sources(graph.model)
        for node in graph.module2node.values():
            g = node.grad_fn
            if node.type != ops.OPTYPE.SPLIT or getattr(g, "_saved_dim", None) != 1 or \
                    any(src.module in own_mapping for src in node.inputs):
                continue
            if hasattr(g, "_saved_split_sizes"):
                sizes = list(g._saved_split_sizes)
            elif hasattr(g, "_saved_split_size") and hasattr(g, "_saved_self_sym_sizes"):
                total, size = int(g._saved_self_sym_sizes[1]), int(g._saved_split_size)
                sizes = [size] * (total // size) + ([total % size] if total % size else [])
            else:
                continue
            users = {u: {nr for fn, nr in getattr(u.grad_fn, "next_functions", ()) if fn is g} for u in node.outputs}
            if all(len(nrs) == 1 for nrs in users.values()):  # else a user reads two parts: Torch-Pruning's way
                node.module.split_sizes = sizes  # the offsets follow in update_split_index_mapping
                node.module.part_of = {u: nrs.pop() for u, nrs in users.items()}

    def update_split_index_mapping(graph, node) -> None:
        sizes = node.module.split_sizes
        if sizes is not None and None not in sizes:  # as pruned so far (its pruner updates the sizes only)
            node.module.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        if not getattr(node.module, "part_of", None):
            return mapping(graph, node)
        if not node.enable_index_mapping:
            return None
        offsets = node.module.offsets
        for user, i in node.module.part_of.items():  # the first dependency each way, as Torch-Pruning maps them
            dep = next((d for d in node.dependencies if d.target is user), None)
            if dep is not None:
                dep.index_mapping[0] = index_mapping._SplitIndexMapping(offsets[i:i + 2], reverse=False)
            dep = next((d for d in user.dependencies if d.target is node), None)
            if dep is not None:
                dep.index_mapping[0] = index_mapping._SplitIndexMapping(offsets[i:i + 2], reverse=True)
        return None

    def infer_channels_between(graph, node_1, node_2) -> int | None:
        if (i := part(node_1, node_2)) is not None:
            return node_1.module.split_sizes[i]
        ch = between(graph, node_1, node_2)
        meta = getattr(node_1.grad_fn, "_input_metadata", ())  # the traced output's shape
        if ch is None and node_1.type != ops.OPTYPE.SPLIT and len(meta) == 1 and len(meta[0].shape) == 4:
            ch = int(meta[0].shape[1])  # a map's channels, where Torch-Pruning's inference ends (a slice)
        return ch

    def infer_out_channels_recursively(graph, node, recursive_depth: list) -> int | None:
        if node.type != ops.OPTYPE.CONCAT and graph.get_out_channels(node) is None:
            for src in node.inputs:  # an element-wise op on a split part has the part's width
                if (i := part(src, node)) is not None:
                    return src.module.split_sizes[i]
        return out_channels(graph, node, recursive_depth)

    def update_concat_index_mapping(graph, node) -> None:
        meta = getattr(node.grad_fn, "_input_metadata", ())
        if len(meta) == 1 and len(meta[0].shape) == 3 and getattr(node.grad_fn, "_saved_dim", None) in (1, -2):
            return None  # tokens concatenated (a class token): every input has the same channels
        return concat(graph, node)

    return [(shape_infer, "init_shape_information", init_shape_information),
            (index_mapping, "update_split_index_mapping", update_split_index_mapping),
            (index_mapping, "update_concat_index_mapping", update_concat_index_mapping),
            (shape_infer, "infer_channels_between", infer_channels_between),
            (shape_infer, "infer_out_channels_recursively", infer_out_channels_recursively)]


@functools.cache  # the same functions every time: Torch-Pruning tells its pruning functions apart by identity
def _std_convs() -> list[tuple[object, str, Callable]]:
    """The per-output-channel ``gain`` of weight-standardised convs (timm's ``ScaledStdConv2d``), which
    Torch-Pruning does not know, pruned with the conv's output channels: the conv pruning functions wrapped, where
    Torch-Pruning binds them and where it compares them (``function.*``). (The convs themselves run as plain
    convs while it analyses them: a family's ``analysable`` form.)"""
    from types import MethodType

    from torch_pruning import ops
    from torch_pruning.pruner import function

    def gained(prune: Callable) -> Callable:
        def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
            n = layer.out_channels
            layer = prune(self, layer, idxs)
            gain = getattr(layer, "gain", None)
            if isinstance(gain, nn.Parameter) and gain.shape[0] == n:
                layer.gain = self._prune_parameter_and_grad(gain, sorted(set(range(n)) - set(idxs)), 0)
            return layer
        return prune_out_channels

    conv_box, dw_box = function.PrunerBox[ops.OPTYPE.CONV], function.PrunerBox[ops.OPTYPE.DEPTHWISE_CONV]
    conv, dw = gained(type(conv_box).prune_out_channels), gained(type(dw_box).prune_out_channels)
    return [(type(conv_box), "prune_out_channels", conv), (type(dw_box), "prune_out_channels", dw),
            (type(dw_box), "prune_in_channels", dw),  # one function for both, as Torch-Pruning has it
            (function, "prune_conv_out_channels", MethodType(conv, conv_box)),
            (function, "prune_depthwise_conv_out_channels", MethodType(dw, dw_box)),
            (function, "prune_depthwise_conv_in_channels", MethodType(dw, dw_box))]


@functools.cache  # one instance: Torch-Pruning tells its pruning functions apart by identity
def _customized_pruners() -> dict[type, object]:
    """Pruning functions for layers Torch-Pruning does not know (``pipeline.families.pruner``). Without one a
    layer's width stayed fixed while the layers around it shrank, so they were kept unpruned."""
    return families.pruners()


def _dependency_graph(model: nn.Module, image_size: int):
    """Torch-Pruning's dependency graph of ``model`` (call inside ``_analysable``)."""
    import torch_pruning as tp

    return tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 3, image_size, image_size),
                                                 customized_pruners=_customized_pruners())


class _Unbounded(Exception):
    """A Torch-Pruning group that keeps growing: its dependency search is in a cycle."""


def _bounded_groups() -> list[tuple[object, str, Callable]]:
    """Patches under which Torch-Pruning's group search raises ``_Unbounded`` instead of looping forever.

    On some graphs (timm's RexNet: a residual added to a channel slice; Torch-Pruning issues #86, #456) its
    search revisits the same layers with ever new index sets; a real group holds each node a few times at
    most, so one with more items than two per graph node can only be such a cycle; on others (timm's
    EfficientViT-M) its index sets grow through reshapes to millions (a layer has thousands of channels).
    """
    from torch_pruning.dependency.graph import DependencyGraph
    from torch_pruning.dependency.group import Group

    search, add = DependencyGraph.get_pruning_group, Group.add_dep
    limit = [0]

    def get_pruning_group(self, *args, **kwargs):
        limit[0] = 2 * len(self.module2node) + 64
        return search(self, *args, **kwargs)

    def add_dep(self, dep, idxs) -> None:
        add(self, dep, idxs)
        if limit[0] and (len(self._group) > limit[0] or len(idxs) > 2**16):  # or its index sets explode
            raise _Unbounded
    return [(DependencyGraph, "get_pruning_group", get_pruning_group), (Group, "add_dep", add_dep)]


def _partial_channel_slice(node: nn.Module) -> bool:
    """A slice of part of the channels (``x[:, :c]``, not tokens or the whole width): Torch-Pruning keeps the
    slice's traced bounds, so after the layers before it shrink it cuts at the wrong channels."""
    import torch_pruning as tp

    if not isinstance(node, tp.ops._SliceOp):
        return False
    sizes = node.grad_fn._saved_self_sym_sizes
    rank, dim = len(sizes), node.dim % len(sizes)
    if dim != (1 if rank == 4 else rank - 1):
        return False
    start, end = (v - 2**64 if v >= 2**63 else v for v in (node.start, node.end))  # saved as unsigned
    return slice(start, end, node.step).indices(sizes[dim]) != (0, sizes[dim], 1)


_TRIALS = 48  # trial prunes before giving up on a model (each finds one more layer to keep)


def unprunable_layers(model: nn.Module, image_size: int, kept: list[nn.Module], ratio: float = 0.5,
                      round_to: int | None = None) -> dict[str, str]:
    """Layers (by name) whose output channels Torch-Pruning cannot prune correctly, and why: their group's
    search does not end, it runs through a partial channel slice, or pruning it by ``ratio`` (rounded to
    ``round_to`` channels) on a copy leaves a model that does not run. Channel pruning keeps them."""

    names = {m: n for n, m in model.named_modules()}
    out = {}
    with _quiet_warnings(), _analysable():
        graph = _dependency_graph(model, image_size)
        for m in graph.module2node:
            if m in kept or not isinstance(m, (nn.Conv2d, nn.Linear)) or m not in names:
                continue
            pruner = graph.get_pruner_of_module(m)
            if pruner is None or pruner.get_out_channels(m) is None:
                continue
            try:
                group = graph.get_pruning_group(m, pruner.prune_out_channels, list(range(pruner.get_out_channels(m))))
            except _Unbounded:
                out[names[m]] = "Torch-Pruning's dependency search does not end"
                continue
            except Exception as e:  # its index mapping fails on this graph (Hiera's head reshapes: a zero head size)
                out[names[m]] = f"Torch-Pruning's dependency search fails ({type(e).__name__})"
                continue
            if any(_partial_channel_slice(dep.target.module) for dep, _ in group):
                out[names[m]] = "a slice of part of its channels follows"
    kept_names = {names[m] for m in kept if m in names}
    for _ in range(_TRIALS):  # what else breaks shows when it is pruned: a trial on a copy, once per failure
        failed = _trial_prune(_copy(model), image_size, kept_names | set(out), ratio, round_to)
        if failed is None:
            return out
        out[failed[0]] = failed[1]
    raise PipelineError(f"channel pruning breaks this model at more than {_TRIALS} layers "
                        f"({grouped_reasons(out)}); use prune.method=magnitude")


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy, with tensors a forward pass cached on modules (attention biases cached per input size: not
    graph leaves, which ``deepcopy`` refuses) copied detached."""
    memo: dict[int, object] = {}
    for m in model.modules():
        for v in m.__dict__.values():
            for t in v.values() if isinstance(v, dict) else (v,):
                if isinstance(t, torch.Tensor) and not t.is_leaf:
                    memo[id(t)] = t.detach().clone()
    return copy.deepcopy(model, memo)


def _trial_prune(model: nn.Module, image_size: int, kept: set[str], ratio: float,
                 round_to: int | None) -> tuple[str, str] | None:
    """Prune every group by ``ratio`` in one step, running the model after each group; the first layer whose
    group fails (Torch-Pruning raises, the model no longer runs, or it computes something else although the
    channels the group names were zeroed first: the group removes other channels) and why, or None."""
    import torch_pruning as tp

    named = dict(model.named_modules())
    names = {m: n for n, m in named.items()}
    example = torch.zeros(1, 3, image_size, image_size)
    x = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))  # to compare outputs
    attention = {m.qkv: m for m in model.modules() if is_attention(m)}
    current: list = [None]
    magnitude = tp.importance.GroupMagnitudeImportance(p=1)

    def importance(group):  # remembers the group it scores
        current[0] = group
        return magnitude(group)

    def root(group) -> str | None:
        return next((names[d.target.module] for d, _ in group if isinstance(d.target.module, (nn.Conv2d, nn.Linear))
                     and d.target.module in names), None)

    model.eval()
    with _quiet_warnings(), _analysable():
        pruner = tp.pruner.BasePruner(
            model, example, importance=importance, pruning_ratio=ratio, iterative_steps=1, round_to=round_to,
            ignored_layers=[named[n] for n in kept], num_heads={qkv: a.num_heads for qkv, a in attention.items()},
            prune_head_dims=True, head_pruning_ratio=ratio, customized_pruners=_customized_pruners())
        try:
            for group in pruner.step(interactive=True):
                current[0] = group
                chosen = _chosen_group(group, pruner, round_to)
                if chosen is None:
                    continue
                if attention:  # heads are set after the step: the model runs then
                    chosen.prune()
                    continue
                checked = _zero_group(chosen)  # the chosen channels contribute nothing now
                with torch.no_grad():
                    before = model(x) if checked else None
                    chosen.prune()
                    after = model(x)
                if checked and not _same_outputs(before, after):
                    raise _WrongChannels
        except Exception as e:  # any failure of a group keeps its layer
            name = root(current[0]) if current[0] is not None else None
            if name is None:
                raise PipelineError(f"channel pruning fails on this model ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:150] if str(e) else ''}); use prune.method=magnitude"
                                    ) from None
            if isinstance(e, _WrongChannels):
                return name, "Torch-Pruning's group for it names other channels than it removes"
            why = "its dependency search does not end" if isinstance(e, _Unbounded) else type(e).__name__
            return name, f"pruning it breaks the model ({why})"
    return None


class _WrongChannels(Exception):
    """A trial-pruned group changed the outputs although the channels it names had been zeroed."""


def _same_outputs(before: torch.Tensor, after: torch.Tensor) -> bool:
    """Equal up to float noise (a deep random-weight model stays below 1e-3 of its largest output; a group
    naming other channels than it removes moves them by 1e-2 to 1)."""
    if before.shape != after.shape:
        return False
    return float((after - before).abs().max()) <= 1e-3 * float(before.abs().max()) + 1e-6


def _importance(name: str):
    import torch_pruning as tp

    return {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "bn_scale": lambda: tp.importance.BNScaleImportance(),
        "taylor": lambda: tp.importance.GroupTaylorImportance(),
    }[name]()


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    """Torch-Pruning warns that it will prune free parameters (a ViT's class token and position embedding)
    along their last dimension: that is their embedding dimension; and that its channel inference reached its
    depth limit, where the traced shapes answer instead (``_split_and_concat_mapping``): nothing to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*prune the last non-singleton dimension")
        warnings.filterwarnings("ignore", message="Maximum recursive depth reached")
        yield


def dependency_problem(model: nn.Module, image_size: int) -> str | None:
    """Why Torch-Pruning cannot build this model's dependency graph, or None when it can."""

    try:
        with _quiet_warnings(), _analysable():
            _dependency_graph(model, image_size)
    except Exception as e:  # a graph pattern Torch-Pruning does not handle
        return f"{type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else 'in its graph analysis'}"
    return None


def channel_prune(model: nn.Module, plan: ChannelPlan, image_size: int, finetune: Finetune = None,
                  grads: Callable[[nn.Module], None] | None = None,
                  kept_notes: dict[str, str] | None = None) -> nn.Module:
    """Remove output channels in place with Torch-Pruning's dependency graph; returns the model.

    ``grads(model)`` fills ``.grad`` before each step (needed by ``importance=taylor``). Layers Torch-Pruning
    cannot prune correctly (``unprunable_layers``) keep their channels; ``kept_notes`` receives them and why.
    """
    import torch_pruning as tp

    example = torch.zeros(1, 3, image_size, image_size)
    base_macs = count_macs(model, image_size)
    by_macs = plan.target_macs is not None
    kept = kept_layers(model, plan.exclude, plan.keep_first_conv)
    split_attention(model, plan.exclude)
    unprunable = unprunable_layers(model, image_size, kept, 0.5 if by_macs or plan.ratio <= 0 else plan.ratio,
                                   plan.round_to)
    if kept_notes is not None:
        kept_notes.update(unprunable)
    if unprunable:
        log.info("prune: %d layer(s) keep their channels, Torch-Pruning cannot prune them correctly: %s",
                 len(unprunable), grouped_reasons(unprunable))
    named = dict(model.named_modules())
    kept += [named[n] for n in unprunable]
    attention = {m.qkv: m for m in model.modules() if is_attention(m)}  # heads via the qkv linear
    with _quiet_warnings(), _analysable():
        pruner = tp.pruner.BasePruner(
            model, example, importance=_importance(plan.importance), global_pruning=plan.global_pruning,
            pruning_ratio=0.95 if by_macs else plan.ratio, iterative_steps=200 if by_macs else plan.steps,
            ignored_layers=kept, round_to=plan.round_to,
            num_heads={qkv: a.num_heads for qkv, a in attention.items()}, prune_num_heads=plan.whole_heads,
            prune_head_dims=not plan.whole_heads, head_pruning_ratio=0.95 if by_macs else plan.ratio,
            customized_pruners=_customized_pruners(),
        )

    def macs() -> float:
        try:
            return count_macs(model, image_size)
        except RuntimeError as e:  # a pattern Torch-Pruning rewired wrongly: the model no longer runs
            raise PipelineError(f"channel pruning left the model unable to run ({str(e).splitlines()[0][:150]}); "
                                "keep the layers around it with prune.exclude=[...], or use prune.method=magnitude"
                                ) from None

    def prune_step(goal: float | None = None) -> None:
        """One pruner step; with a MACs ``goal``, group by group until it is met (with round_to a whole step is
        coarse: the first one takes every layer down to the next multiple, 16 -> 8 channels)."""
        if grads is not None:
            grads(model)
        with _analysable():
            for group in pruner.step(interactive=True):
                if (chosen := _chosen_group(group, pruner, plan.round_to)) is not None:
                    chosen.prune()
                if goal is not None and macs() <= goal:
                    break
        for qkv, attn in attention.items():  # the forward pass reads the head count and width
            heads = pruner.num_heads[qkv]
            _set_heads(attn, heads, qkv.out_features // (3 * heads))

    for step in range(plan.steps):
        if by_macs:  # small increments until this step's share of the MACs budget is met
            goal = base_macs - (base_macs - plan.target_macs) * (step + 1) / plan.steps
            while macs() > goal and pruner.current_step < pruner.iterative_steps:
                prune_step(goal)
            if macs() > goal:
                raise PipelineError(f"prune.target_macs={plan.target_macs:.4g} cannot be reached with the kept "
                                    "layers; raise it or exclude fewer layers")
        else:
            prune_step()
        log.info("prune: step %d/%d, MACs %.3g -> %.3g", step + 1, plan.steps, base_macs, macs())
        if step < plan.steps - 1 and finetune is not None:
            finetune(model, plan.step_epochs, f"step{step + 1}")
    return model


def _chosen_group(group, pruner, round_to: int | None):
    """The group to prune: as many channels as Torch-Pruning chose, or None for none. Where its dependencies map
    each chosen channel of a conv onto more channels of that conv itself (a module whose cheap half copies its
    primary half's channels, both reaching the conv again through a residual, so every channel removes its
    twin), the group would lose a multiple of its share (one such model's stem 16 -> 2 channels at ratio 0.3);
    then only the least important fraction of the chosen channels is given, which removes the share the plan
    asked for."""
    item = group[0]  # the root: (dep, idxs, root_idxs)
    module, removed, chosen = item.dep.target.module, set(item.idxs), list(dict.fromkeys(item.root_idxs))
    if not isinstance(module, nn.Conv2d) or len(removed) <= len(chosen):
        return group
    per = len(removed) / len(chosen)  # channels removed per chosen channel
    k = max(0, round(len(chosen) / per))
    step = round(per)
    while round_to and k > 0 and (module.out_channels - k * step) % round_to:
        k -= 1  # the kept width stays a multiple of round_to
    if k == 0:
        return None
    imp = pruner.estimate_importance(group)
    if imp is not None and len(imp) == module.out_channels:
        chosen.sort(key=lambda i: float(imp[i]))
    return group._DG.get_pruning_group(module, item.dep.handler, chosen[:k])  # what group.prune(idxs) prunes


def _zero_group(group) -> bool:
    """Zero the channels ``group`` names in every layer it names (output channels, and input channels of the
    layers reading them), so that pruning it removes nothing the model uses; False, with nothing changed where
    that cannot be exact: a norm over channels (LayerNorm, GroupNorm) or a weight-standardised conv's inputs
    (removing channels changes the others), a grouped conv (Torch-Pruning removes its channels by a rule of
    its own: ResNeXt), or a layer or free parameter (a class token) this does not know."""
    todo = []
    for item in group._group:
        m, idxs, out = item.dep.target.module, list(item.idxs), "out" in item.dep.handler.__name__
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if type(m).__name__ in STD_CONVS and not out:
                return False
            depthwise = isinstance(m, nn.Conv2d) and m.groups == m.in_channels and m.groups > 1
            if isinstance(m, nn.Conv2d) and m.groups > 1 and not depthwise:
                return False  # Torch-Pruning removes a grouped conv's channels by its own rule
            if out or depthwise:
                todo += [(t, idxs, 0) for t in (m.weight, m.bias, getattr(m, "gain", None)) if t is not None]
            else:
                todo.append((m.weight, idxs, 1))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            todo += [(t, idxs, 0) for t in (m.weight, m.bias) if t is not None]
        elif isinstance(m, nn.Parameter) or (isinstance(m, nn.Module) and any(True for _ in m.parameters(False))
                                             and not type(m).__module__.startswith("torch_pruning")):
            return False
    if any(max(idxs, default=-1) >= t.shape[dim] for t, idxs, dim in todo):
        raise IndexError("the group names channels a layer does not have")
    with torch.no_grad():
        for t, idxs, dim in todo:
            t.index_fill_(dim, torch.tensor(idxs, dtype=torch.long), 0)
    return True


def grouped_reasons(reasons: dict[str, str]) -> str:
    """``{layer: reason}`` as "reason: a, b, c; other reason: d" (at most 8 names per reason), for logs and the
    report."""
    by: dict[str, list[str]] = {}
    for name, why in reasons.items():
        by.setdefault(why, []).append(name)
    return "; ".join(f"{why}: {', '.join(ns[:8])}{f' (+{len(ns) - 8} more)' if len(ns) > 8 else ''}"
                     for why, ns in by.items())


def split_attention(model: nn.Module, exclude: list[str]) -> None:
    """Self-attention ``nn.MultiheadAttention`` modules (torchvision's ViT) as ``HeadAttention``, whose heads can
    be pruned: the module ties their width to the embedding width. Those in, or with a part in, ``exclude`` stay."""
    for name, m in list(model.named_modules()):
        if is_plain_mha(m) and not inside(name, exclude) and not any(inside(p, [name]) for p in exclude):
            replace_module(model, name, HeadAttention.of(m))


def _set_heads(attn: nn.Module, heads: int, head_dim: int) -> None:
    """Tell pruned attention its head count and width. The softmax scale the weights were trained with is
    folded into the q rows of ``qkv``, so ``scale`` is 1/sqrt(head_dim) again: timm's fused path
    (scaled_dot_product_attention) uses that, its explicit path (quantization) ``scale``, and both agree."""
    if hasattr(attn, "scale") and attn.head_dim != head_dim:
        new_scale = head_dim**-0.5
        with torch.no_grad():
            attn.qkv.weight[: heads * head_dim] *= attn.scale / new_scale
            if attn.qkv.bias is not None:
                attn.qkv.bias[: heads * head_dim] *= attn.scale / new_scale
        attn.scale = new_scale
    apply_shapes(attn, {"": {"heads": {"num_heads": heads, "head_dim": head_dim}}})


def prune_architecture(model: nn.Module, prune: Any, image_size: int, finetune: Finetune = None,
                       grads: Callable[[nn.Module], None] | None = None,
                       kept_notes: dict[str, str] | None = None) -> nn.Module:
    """What the prune stage does to a model before its final fine-tune (``prune``: the stage's settings or their
    ``DictConfig``): drop the listed blocks, then channel or magnitude pruning. The search probe runs the same
    on an untrained model to time the architecture."""
    drop_blocks(model, list(prune.drop_blocks))
    if prune.method == "channel":
        return channel_prune(model, ChannelPlan.of(prune), image_size, finetune, grads, kept_notes)
    kept = kept_layers(model, list(prune.exclude), prune.keep_first_conv)
    return magnitude_prune(model, prune.ratio, prune.steps, prune.global_pruning, kept, prune.step_epochs, finetune)


def magnitude_prune(model: nn.Module, ratio: float, steps: int, global_pruning: bool, kept: list[nn.Module],
                    step_epochs: int = 0, finetune: Finetune = None) -> nn.Module:
    """Zero the smallest weights of every conv/linear not in ``kept`` (masks stay until ``make_permanent``)."""
    import torch.nn.utils.prune as tprune

    kept_ids = set(map(id, kept))
    targets = [(m, "weight") for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in kept_ids]
    for step in range(steps):
        # overall sparsity after this step: ratio * (step+1)/steps, applied to what is left
        total = ratio * (step + 1) / steps
        done = ratio * step / steps
        amount = (total - done) / (1 - done)
        if global_pruning:
            tprune.global_unstructured(targets, pruning_method=tprune.L1Unstructured, amount=amount)
        else:
            for m, p in targets:
                tprune.l1_unstructured(m, p, amount=amount)
        if step < steps - 1 and finetune is not None:
            finetune(model, step_epochs, f"step{step + 1}")
    return model


def make_permanent(model: nn.Module) -> None:
    """Fold magnitude-pruning masks into the weights (plain state dict again)."""
    import torch.nn.utils.prune as tprune

    for m in model.modules():
        if tprune.is_pruned(m) and hasattr(m, "weight_orig"):
            tprune.remove(m, "weight")


def layer_report(model: nn.Module) -> dict[str, dict]:
    """Shape and weight sparsity of every conv / linear."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight.detach()
            out[name] = {"shape": list(w.shape), "sparsity": float((w == 0).float().mean())}
    return out
