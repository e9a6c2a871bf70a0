"""torch.fx tracing for the rewrite: ``_Tracer`` (timm's fused and per-call layers kept whole; with an example input,
Python branches on tensor sizes followed for that size through ``_SizedProxy``), ``_trace`` (retries; modules fx
cannot trace called whole), and ``_shapes`` (every node's tensor shape)."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import operator
from collections.abc import Callable

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from pipeline import families
from pipeline.errors import PipelineError, first_line
from pipeline.pruning import grouped_reasons
from pipeline.quant.graph import _flat

log = logging.getLogger(__name__)


_NORM_ACT = ("BatchNormAct2d",)  # timm: BatchNorm2d + activation in one module (split so conv-BN folds)
_MAX_UNTRACEABLE = 64  # modules fx cannot trace that are kept FP32 before giving up
_SAID_UNTRACEABLE: set[tuple[str, tuple[str, ...], tuple[str, ...]]] = set()  # (model, untraceable, size-traced)
_SAME = ("Conv2dSame", "MaxPool2dSame", "AvgPool2dSame")  # timm's TensorFlow 'SAME' padding, computed per call


def _whole_functions() -> tuple[Callable, ...]:
    """The library functions the families register as traced whole (``pipeline.families.whole_function``: they
    write into a tensor in place, which fx cannot trace), one float op in the graph, where the library is
    installed."""
    import importlib

    found = []
    for module, name in families.whole_functions():
        with contextlib.suppress(ImportError):
            if callable(fn := getattr(importlib.import_module(module), name, None)):
                found.append(fn)
    return tuple(found)


_SHAPE_ATTRS = {"shape", "ndim", "device", "dtype", "is_cuda"}  # what a tensor says about itself, not its data
_SHAPE_METHODS = {"size", "dim", "numel", "get_device"}
_UNKNOWN = object()  # a concrete value the tracer could not compute


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping timm's BatchNormAct2d (split later into BN + activation) and Linear whole;
    ``failed_in`` names the innermost module whose tracing raised (for the error message).

    Given an ``example`` input, every traced value is also computed on it, so a Python branch on a tensor's
    *size* (``if new_h != H``, ``if H == ws``) takes the branch this input size takes,
    as a size-specialised export does; ``specialized`` lists where. A branch on tensor *values* still raises.
    """

    failed_in: tuple[str, str] | None = None  # (qualified name, class name)

    def __init__(self, untraceable: set[str] = frozenset(), example: torch.Tensor | None = None):
        super().__init__(autowrap_functions=_whole_functions())
        self.untraceable = untraceable  # modules called whole (they stay FP32)
        self.example = example
        self.values: dict[fx.Node, object] = {}  # node -> its value on the example input
        self.static: set[fx.Node] = set()  # nodes whose value follows from tensor sizes only
        self.specialized: dict[str, str] = {}  # module -> the class whose code branched on a size
        self.evaluating = False  # inside a leaf module's concrete call (fx's patches must stand aside)
        # with an example, buffers are graph values too, so code on their sizes is followed like code on any
        # tensor's (``self.rel_indices.expand(B, -1, -1, -1)``)
        self.proxy_buffer_attributes = example is not None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:  # nn.Linear subclasses (timm's) -> QLinear
        return type(m).__name__ in _NORM_ACT + _SAME or isinstance(m, nn.Linear) or \
            qualname in self.untraceable or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        if self.evaluating:  # computing a leaf module's value: run it, do not trace it
            return forward(*args, **kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = (self.path_of_module(m), type(m).__name__)
            raise

    def getattr(self, attr: str, attr_val, parameter_proxy_cache: dict):
        return attr_val if self.evaluating else super().getattr(attr, attr_val, parameter_proxy_cache)

    # ---- concrete values (only with an example input)
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _SizedProxy(node, self) if self.example is not None else super().proxy(node)

    def value(self, a):
        """``a`` with every proxy replaced by its value on the example (``_UNKNOWN`` where there is none)."""
        if isinstance(a, fx.proxy.Attribute) and a._node is None:
            root = self.value(a.root)
            return _UNKNOWN if root is _UNKNOWN else getattr(root, a.attr, _UNKNOWN)
        if isinstance(a, fx.Proxy):
            return self.values.get(a.node, _UNKNOWN)
        if isinstance(a, (tuple, list)):
            return type(a)(self.value(x) for x in a)
        if isinstance(a, dict):
            return {k: self.value(v) for k, v in a.items()}
        if isinstance(a, slice):
            return slice(self.value(a.start), self.value(a.stop), self.value(a.step))
        return a

    def is_static(self, a) -> bool:
        """Whether ``a`` follows from tensor sizes and constants only (safe to specialise on)."""
        if isinstance(a, fx.proxy.Attribute) and a._node is None:
            return a.attr in _SHAPE_ATTRS or self.is_static(a.root)
        if isinstance(a, fx.Proxy):
            return a.node in self.static
        if isinstance(a, (tuple, list)):
            return all(self.is_static(x) for x in a)
        if isinstance(a, dict):
            return all(self.is_static(x) for x in a.values())
        return not isinstance(a, torch.Tensor)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if self.example is None:
            return proxy
        node = proxy.node
        self.evaluating = True
        try:
            with torch.no_grad():
                if kind == "placeholder":
                    val = self.example if not any(n.op == "placeholder" for n in self.values) else _UNKNOWN
                elif kind == "get_attr":
                    val = operator.attrgetter(target)(self.root)
                else:
                    a, kw = self.value(args), self.value(kwargs)
                    if any(v is _UNKNOWN for v in _flat((a, kw))):
                        val = _UNKNOWN
                    elif kind == "call_function":
                        val = target(*a, **kw)
                    elif kind == "call_method":
                        val = getattr(a[0], target)(*a[1:], **kw)
                    else:
                        val = self.root.get_submodule(target)(*a, **kw)
        except Exception:
            val = _UNKNOWN
        finally:
            self.evaluating = False
        self.values[node] = val
        if val is not _UNKNOWN and not isinstance(val, torch.Tensor) and kind in ("call_function", "call_method"):
            shape_query = (kind == "call_method" and target in _SHAPE_METHODS) or \
                (target is getattr and args[1] in _SHAPE_ATTRS)
            if shape_query or self.is_static((args, kwargs)):
                self.static.add(node)
        return proxy

    def concrete(self, obj: fx.Proxy, what: str):
        """The value of ``obj`` on the example input, where it follows from sizes only; else fx's error."""
        if self.example is None or not self.is_static(obj) or (val := self.value(obj)) is _UNKNOWN:
            raise fx.proxy.TraceError(f"symbolically traced variables cannot be used as inputs to {what}")
        self.specialized.setdefault(self.scope.module_path, (self.scope.module_type or type(self.root)).__name__)
        return val

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.concrete(obj, "control flow"))

    def iter(self, obj: fx.Proxy):
        n = len(self.concrete(obj, "iteration"))  # a size: iterate its elements as graph values (batch stays dynamic)
        return iter([obj[i] for i in range(n)])


class _SizedProxy(fx.Proxy):
    """A proxy that converts to a Python number where its value follows from tensor sizes (see ``_Tracer``)."""

    def __getattr__(self, k: str):
        return _SizedAttribute(self, k)

    def __len__(self) -> int:
        return len(self.tracer.concrete(self, "len()"))

    def __int__(self) -> int:
        return int(self.tracer.concrete(self, "int()"))

    def __index__(self) -> int:
        return operator.index(self.tracer.concrete(self, "an index"))

    def __float__(self) -> float:
        return float(self.tracer.concrete(self, "float()"))

    def __ceil__(self) -> int:
        return math.ceil(self.tracer.concrete(self, "math.ceil"))

    def __floor__(self) -> int:
        return math.floor(self.tracer.concrete(self, "math.floor"))


class _SizedAttribute(fx.proxy.Attribute, _SizedProxy):
    """``x.device.type`` and the like: a string where the code needs one (``torch.autocast(device_type=...)``)."""

    def __getattr__(self, k: str):
        if k == "type" and isinstance(val := self.tracer.value(self), torch.device):
            return val.type
        return _SizedAttribute(self, k)


def _default_args(model: nn.Module) -> dict | None:
    """The root forward's optional arguments at their defaults (timm's ``attn_mask=None``, ``is_causal=False``),
    so tracing sees constants rather than inputs."""
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())[1:]
    except (TypeError, ValueError):  # no Python signature: trace it as it is
        return None
    out = {p.name: p.default for p in params
           if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not p.empty
           and isinstance(p.default, (type(None), bool, int, float, str))}
    return out or None


def _warm_up(model: nn.Module, x: torch.Tensor) -> None:
    """One forward pass before tracing on ``x``: code that fills a cache on its first call (relative positions
    sized to the token count) then takes the branch every later call takes."""
    with torch.no_grad():
        try:
            model(x)
        except Exception:
            pass  # a model that does not run on this input: tracing says where


def _differs_at_batch_2(model: nn.Module, gm: fx.GraphModule, image_size: int) -> str:
    """Why the size-specialised trace ``gm`` does not compute ``model`` at another batch size ('' if it does)."""
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        try:
            want = model(x)
        except Exception:
            return ""  # the model itself does not run on this input: the shape check after tracing says so
        try:
            got = gm(x)
        except Exception as e:
            return f"{type(e).__name__}: {first_line(e)}"
    if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor) or want.shape != got.shape:
        return "other outputs"
    if not torch.equal(want.isnan(), got.isnan()):  # weights not loaded yet (a checkpoint's model) may give NaN
        return "NaN elsewhere"
    want, got = want.nan_to_num(), got.nan_to_num()
    err = (want - got).abs().max().item()
    return "" if err <= 1e-4 * (1.0 + want.abs().max().item()) else f"max |difference| {err:.2g}"


def _shapes(gm: fx.GraphModule, image_size: int) -> None:
    """Record every node's tensor shape (``ShapeProp``); a graph that does not run on the input size is one
    line naming the layer that fails (ShapeProp would print its traceback first)."""
    class Prop(ShapeProp):
        node: fx.Node | None = None

        def run_node(self, n: fx.Node):
            self.node = n
            return super().run_node(n)

    prop = Prop(gm)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            prop.propagate(torch.zeros(1, 3, image_size, image_size))
    except Exception as e:
        cause, node = e.__cause__ or e, prop.node
        stack = list((node.meta.get("nn_module_stack") or {}).values()) if node is not None else []
        where = node.target if node is not None and node.op == "call_module" else stack[-1][0] if stack else ""
        raise PipelineError(f"the traced model does not run on a {image_size}x{image_size} input"
                            f"{f' in {where!r}' if where else ''} ({type(cause).__name__}: {first_line(cause)}); "
                            "check data.image_size") from None


def _trace(model: nn.Module, image_size: int) -> tuple[fx.GraphModule, dict[str, str]]:
    """``torch.fx`` trace of ``model``, and the modules it could not trace (kept FP32, called whole) with why.
    A failed trace is retried with an example input (branches on tensor sizes followed), then with the failing
    module called whole; a trace specialised on sizes must reproduce the model at batch 2."""
    untraceable: dict[str, str] = {}  # module -> why fx cannot trace it
    example = None  # after a failed trace: an input, so branches on tensor sizes can be followed
    while True:
        tracer = _Tracer(set(untraceable), example)
        try:
            gm = fx.GraphModule(model, tracer.trace(model, concrete_args=_default_args(model)))
        except Exception as e:
            first = first_line(e)
            name = tracer.failed_in[0] if tracer.failed_in else ""
            if example is None:
                example = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
                _warm_up(model, example)
                continue
            if name and name not in untraceable and len(untraceable) < _MAX_UNTRACEABLE:
                untraceable[name] = f"{type(e).__name__}: {first}"  # a branch on tensor values
                continue
            where = f" in module {name!r} ({tracer.failed_in[1]})" if tracer.failed_in else ""
            raise PipelineError(f"cannot trace the model for quantization{where} ({type(e).__name__}: {first}); "
                                "models with data-dependent control flow need another qat.source, or that module "
                                "rewritten without Python branches on tensor values") from None
        wrong = tracer.specialized and _differs_at_batch_2(model, gm, image_size)
        if not wrong:
            break
        if "" in tracer.specialized or len(untraceable) + len(tracer.specialized) > _MAX_UNTRACEABLE:
            raise PipelineError(f"the model's forward branches on tensor sizes in a way its traced form does not "
                                f"reproduce at batch 2 ({wrong}); keep it out of qat (pipeline without qat)")
        untraceable.update({m: f"its size-specialised trace differs at batch 2 ({wrong})" for m in tracer.specialized})
    if (said := (type(model).__name__, tuple(untraceable), tuple(tracer.specialized))) not in _SAID_UNTRACEABLE:
        _SAID_UNTRACEABLE.add(said)  # once per process: prepare_qat runs in qat, export and placement
        if tracer.specialized:
            where = [f"{m or 'the model'} ({c})" for m, c in tracer.specialized.items()]
            log.info("qat: traced for %dx%d inputs (their code branches on tensor sizes): %s", image_size,
                     image_size, ", ".join(where[:6]) + (f" and {len(where) - 6} more" if len(where) > 6 else ""))
        if untraceable:
            log.info("qat: torch.fx cannot trace these modules; kept FP32, called whole: %s",
                     grouped_reasons(untraceable))
    return gm, untraceable
