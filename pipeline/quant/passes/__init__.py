"""The rewrite of a float model into its QAT form as data: ``PASSES``, the ordered passes ``prepare_qat`` runs one
after the other on one ``Context``. Each is one function of the module for its group (``normalise``, ``constants``,
``arithmetic``, ``activations``, ``fold``, ``quantizers``, ``link``; tracing in ``quant.tracer``, attention in
``quant.attention``). A pass whose ``stale_shapes`` is set returns whether it changed the graph (and recompiled it);
then the next ``shapes_if_stale`` records the tensor shapes again. What the passes quantize where is versioned by
``REWRITE``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

from pipeline.quant.attention import _unroll_attention
from pipeline.quant.graph import _float_test
from pipeline.quant.passes.activations import _hard_activations, _silu_as_sigmoid_mul
from pipeline.quant.passes.arithmetic import _drop_broadcast_expands, _scalar_operands, _square_as_mul, _sums_to_adds
from pipeline.quant.passes.constants import _constants_at_batch_1, _mark_constants, _mark_float_modules
from pipeline.quant.passes.fold import _fuse_convs, _linear_batchnorms, _lone_batchnorms
from pipeline.quant.passes.link import _link_input_quants, _norm_grads, _one_module_per_call
from pipeline.quant.passes.normalise import (
    _fold_zero_pads,
    _functional_convs,
    _parameter_matmuls,
    _softmax_modules_as_calls,
    _split_norm_act,
    _static_same_padding,
    plain_layers,
)
from pipeline.quant.passes.quantizers import _classify, _Kind, _place_quants
from pipeline.quant.spec import QuantSpec
from pipeline.quant.target import OpTable, op_table
from pipeline.quant.tracer import _shapes, _trace

REWRITE = 8  # version of what prepare_qat quantizes where (in the qat stage's key: a change rebuilds QAT models)


@dataclass
class Context:
    """What the passes share: the float model until it is traced, then its graph, and what earlier passes found."""

    model: nn.Module
    spec: QuantSpec
    image_size: int
    gm: fx.GraphModule | None = None
    untraceable: dict[str, str] = field(default_factory=dict)  # module -> why fx cannot trace it (kept FP32, whole)
    kind: dict[fx.Node, _Kind] = field(default_factory=dict)  # what _classify says of each node
    stale_shapes: bool = False  # a pass changed the graph since the shapes were recorded
    is_float: Callable[[fx.Node], bool] = field(init=False)  # node -> kept FP32 (spec.float_layers, or marked)
    table: OpTable = field(init=False)  # the target runtime's placement rules (spec.target)

    def __post_init__(self) -> None:
        self.is_float = _float_test(self.spec.float_layers)
        self.table = op_table(self.spec.target)


@dataclass(frozen=True)
class Pass:
    """One step of ``prepare_qat``: ``run(ctx)``. With ``stale_shapes``, a True return ("changed") has the next
    ``shapes_if_stale`` record the shapes again; an ``int8_rewrite`` runs only for a target that wants ops
    rewritten into ops with INT8 kernels (``OpTable.int8_rewrites``)."""

    name: str
    run: Callable[[Context], object]
    stale_shapes: bool = False
    int8_rewrite: bool = False

    def __call__(self, ctx: Context) -> None:
        if self.int8_rewrite and not ctx.table.int8_rewrites:
            return
        if self.run(ctx) and self.stale_shapes:
            ctx.stale_shapes = True


def _plain_layers(ctx: Context) -> None:
    ctx.model = plain_layers(ctx.model, ctx.spec.float_layers)


def _attention(ctx: Context) -> None:
    ctx.model = _unroll_attention(ctx.model, ctx.spec.float_layers, ctx.image_size)


def _traced(ctx: Context) -> None:
    ctx.gm, ctx.untraceable = _trace(ctx.model, ctx.image_size)


def _record_shapes(ctx: Context) -> None:
    _shapes(ctx.gm, ctx.image_size)  # tensor shapes on every node: only tensors are quantized
    ctx.stale_shapes = False


def _record_shapes_if_stale(ctx: Context) -> None:
    if ctx.stale_shapes:
        _record_shapes(ctx)


def _classified(ctx: Context) -> None:
    ctx.kind, ctx.gm.meta["float_ops"] = _classify(ctx.gm, ctx.untraceable, ctx.is_float, ctx.table)


PASSES: tuple[Pass, ...] = (
    # the float model (a copy where anything changes), before tracing
    Pass("plain_layers", _plain_layers),
    Pass("unroll_attention", _attention),
    Pass("trace", _traced),
    # the traced graph in the forms the later passes know
    Pass("split_norm_act", lambda c: _split_norm_act(c.gm)),
    Pass("softmax_modules_as_calls", lambda c: _softmax_modules_as_calls(c.gm)),
    Pass("shapes", _record_shapes),
    Pass("static_same_padding", lambda c: _static_same_padding(c.gm), stale_shapes=True),
    Pass("functional_convs", lambda c: _functional_convs(c.gm), stale_shapes=True),
    Pass("parameter_matmuls", lambda c: _parameter_matmuls(c.gm), stale_shapes=True),
    Pass("fold_zero_pads", lambda c: _fold_zero_pads(c.gm), stale_shapes=True),
    Pass("shapes_if_stale", _record_shapes_if_stale),
    # what the model computes from its constants alone
    Pass("mark_float_modules", lambda c: _mark_float_modules(c.gm, c.untraceable)),
    Pass("mark_constants", lambda c: _mark_constants(c.gm)),
    Pass("constants_at_batch_1", lambda c: _constants_at_batch_1(c.gm, c.image_size), stale_shapes=True),
    Pass("shapes_if_stale", _record_shapes_if_stale),
    # folds, and ops rewritten into ops ONNX Runtime has INT8 kernels for
    Pass("linear_batchnorms", lambda c: _linear_batchnorms(c.gm, c.is_float)),
    Pass("silu_as_sigmoid_mul", lambda c: _silu_as_sigmoid_mul(c.gm, c.is_float), int8_rewrite=True),
    Pass("square_as_mul", lambda c: _square_as_mul(c.gm, c.is_float), int8_rewrite=True),
    # a sum over a short dimension (ResNeSt's radix splits, multi-path gates) -> slices added: QLinearAdds on slices of
    # the quantized tensor, where ORT has no INT8 ReduceSum (and left the Mul before it float); a stack -> a
    # concatenation of unsqueezes (QLinearConcat)
    Pass("sums_to_adds", lambda c: _sums_to_adds(c.gm, c.is_float, c.image_size), stale_shapes=True,
         int8_rewrite=True),
    Pass("drop_broadcast_expands", lambda c: _drop_broadcast_expands(c.gm), stale_shapes=True),
    Pass("scalar_operands", lambda c: _scalar_operands(c.gm, c.is_float), stale_shapes=True),
    Pass("shapes_if_stale", _record_shapes_if_stale),
    # layers into the QAT modules
    Pass("fuse_convs", lambda c: _fuse_convs(c.gm, c.spec, c.is_float, c.table.layer_output == "quant_after")),
    Pass("lone_batchnorms", lambda c: _lone_batchnorms(c.gm, c.spec, c.is_float)),
    Pass("hard_activations", lambda c: _hard_activations(c.gm, c.spec, c.is_float), int8_rewrite=True),
    # the quantizers, and what follows from where they are
    Pass("classify", _classified),
    Pass("place_quants", lambda c: _place_quants(c.gm, c.kind, c.spec)),
    Pass("one_module_per_call", lambda c: _one_module_per_call(c.gm)),
    Pass("norm_grads", lambda c: _norm_grads(c.gm)),
    Pass("recompile", lambda c: c.gm.recompile()),
    Pass("link_input_quants", lambda c: _link_input_quants(c.gm)),
)
