"""Which layers stay FP32 in an INT8 model: ``qat.float_layers`` resolved for this model and this CPU.

Besides module names, ``qat.float_layers`` takes two tokens:

- ``auto``: a rule from the CPU's flags (``quant.narrow_convs``: narrow convs on x86 without VNNI);
- ``measure``: a timed search. The model's leading blocks are the ones where INT8 can lose: full-resolution
  maps with few channels, where ONNX Runtime's DequantizeLinear/QuantizeLinear pairs, broadcast multiplies
  (squeeze-excitation gates) and narrow INT8 kernels cost more than they save. So the candidates keep the
  first k blocks FP32 (k = 0 .. half the blocks, until two in a row are far slower than the best; one
  QuantizeLinear at the boundary), each is prepared, calibrated and exported as the qat/export stages
  would, and the target runtime (``qat.target``) times them interleaved against each other and the float model
  on this CPU.
  One more candidate keeps FP32 every module whose own code runs an op ONNX Runtime has no INT8 kernel for
  (the parent of a LayerNorm or GELU: a transformer layer, an MLP): each such op costs a
  DequantizeLinear/QuantizeLinear pair, which on small token counts (MobileViT's attention) costs more than
  the INT8 matmuls save.
  The fastest wins, and of candidates within ``MARGIN`` of it the one with the fewest FP32 blocks (timing
  noise on a shared machine is of that size). Speed does not depend on the weights, so any weights do.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from pipeline import inference, onnxio, quant
from pipeline.models import inside

AUTO, MEASURE = "auto", "measure"
TOKENS = (AUTO, MEASURE)
MARGIN = 0.05  # candidates within this of the fastest count as equally fast: the fewest FP32 blocks wins
MIN_BLOCKS = 8  # blocks are module-path prefixes deep enough to give at least this many (or one per layer)
ROUNDS = 5  # interleaved timing: rounds over all candidates
STOP = 1.2  # export no more candidates after two in a row this much slower than the best so far
BLOCK_S = 0.3  # seconds per timed block (at least 3 runs; half as many warm-up runs before it)


def weight_bits(qat) -> tuple[int, str]:
    """``qat.weight_bits`` resolved for this CPU (``auto``: 8 with VNNI/AMX or on ARM, else 7), with the reason.
    The one place the setting is resolved: the qat stage publishes both (``QatResult``)."""
    return quant.resolve_weight_bits(qat.weight_bits)


def base_spec(qat, model: nn.Module) -> quant.QuantSpec:
    """The spec that the ``qat.*`` settings (the stage's config or its ``DictConfig``) give ``model`` (after
    pruning) on this CPU, before any ``measure`` search: the names in ``qat.float_layers`` plus ``auto``'s
    narrow convs kept FP32, the weight bits resolved."""
    names = [n for n in qat.float_layers if n not in TOKENS]
    if AUTO in qat.float_layers:
        names += [n for n in quant.narrow_convs(model) if n not in names]
    return quant.QuantSpec(qat.act_dtype, weight_bits(qat)[0], qat.observer_ema, tuple(names),
                           target=getattr(qat, "target", inference.DEFAULT))


@dataclass
class Placement:
    """The measured choice and every candidate's timing (ms per batch, on the target runtime on this CPU)."""

    float_layers: list[str]  # chosen FP32 blocks (on top of the fixed ones)
    batch: int
    fp32_ms: float  # the whole model in float (the runtime's fastest float precision: ``reference``)
    candidates: list[dict] = field(default_factory=list)  # {"float_blocks", "blocks", "label", "ms", "vs_fp32"}
    reference: str = "FP32"  # what "vs_fp32" compares with: FP32, or OpenVINO's bf16 where the CPU has it

    @property
    def chosen(self) -> dict:
        return next(c for c in self.candidates if c["blocks"] == self.float_layers)

    def summary(self) -> str:
        """One line: what was chosen, its speed against FP32 and against all-INT8."""
        all_int8, best = self.candidates[0], self.chosen
        return (f"{best['label']}: {best['vs_fp32']:.2f}x {self.reference}, {all_int8['ms'] / best['ms']:.2f}x "
                f"all-INT8 (batch {self.batch}, {len(self.candidates)} placements timed)")

    def advice(self) -> str | None:
        """What to do where even the fastest placement is slower than the FP32 model at this batch, else None."""
        fastest = max(c["vs_fp32"] for c in self.candidates)
        if fastest >= 1.0:
            return None
        return (f"no placement is faster than {self.reference} at batch {self.batch} on this CPU (the fastest: "
                f"{fastest:.2f}x {self.reference}): deploy the FP32 model"
                f"{' in ' + self.reference if self.reference != 'FP32' else ''} at this batch size, or set "
                "qat.measure_batch to the batch you deploy with")

    def lines(self) -> list[str]:
        """One line per candidate, for the log."""
        return [f"{c['label']:<40} {c['ms']:7.2f} ms at batch {self.batch} ({c['vs_fp32']:.2f}x {self.reference})"
                for c in self.candidates]

    def as_dict(self) -> dict:
        return {**asdict(self), "summary": self.summary()}


def leading_blocks(gm: fx.GraphModule, model: nn.Module) -> list[str]:
    """Blocks of ``model`` holding the quantized layers of its QAT form ``gm``, in execution order.

    A block is a module-path prefix of the quantized layers (``features.3``, ``layer1.0``), at the smallest
    depth that gives ``MIN_BLOCKS`` blocks (or one per layer); only prefixes that are modules of ``model``.
    """
    kinds = (quant.QConvBn, quant.QLinear)
    layers = [str(n.target) for n in gm.graph.nodes
              if n.op == "call_module" and isinstance(gm.get_submodule(n.target), kinds)]
    modules = dict(model.named_modules())
    want = min(MIN_BLOCKS, len(layers))
    depth_max = max((len(n.split(".")) for n in layers), default=0)
    for depth in range(1, depth_max + 1):
        blocks: list[str] = []
        for name in layers:
            prefix = ".".join(name.split(".")[:depth])
            while prefix not in modules and "." in prefix:
                prefix = prefix.rsplit(".", 1)[0]
            if prefix in modules and prefix not in blocks:
                blocks.append(prefix)
        if len(blocks) >= want:
            return blocks
    return []


def float_islands(gm: fx.GraphModule, model: nn.Module) -> list[str]:
    """The modules of ``model`` whose own code runs an op the QAT form ``gm`` leaves float between
    DequantizeLinear and QuantizeLinear (a LayerNorm's or GELU's parent: a transformer layer, an MLP), outermost
    first; ops kept FP32 on purpose (``qat.float_layers``) do not count."""
    nodes = {n.name: n for n in gm.graph.nodes}
    modules = dict(model.named_modules())
    found: list[str] = []
    for name, _, why in gm.meta.get("float_ops", []):
        node = nodes.get(name)
        if node is None or why == "qat.float_layers":
            continue
        if node.op == "call_module":  # a LayerNorm module: its parent
            path = str(node.target).rpartition(".")[0]
        else:  # F.gelu in a module's forward: that module
            stack = [k.split("@")[0] for k in node.meta.get("nn_module_stack") or {}]
            path = stack[-1] if stack else ""
        while path and path not in modules:
            path = path.rpartition(".")[0]
        if path and path not in found:
            found.append(path)
    return [p for p in found if not inside(p, tuple(q for q in found if q != p))]


def export_quantized(gm: fx.GraphModule, example: torch.Tensor, path: Path, opset: int = 18) -> None:
    """A QAT model (prepared, calibrated or trained) exported as INT8 QDQ ONNX: what the export stage writes."""
    onnxio.export_onnx(quant.to_deploy(gm.eval()), example, path, opset, quant.onnx_translations())


def export_int8(gm: fx.GraphModule, images: torch.Tensor, path: Path) -> None:
    """A prepared QAT model calibrated on ``images`` and exported as INT8 QDQ ONNX (what qat -> export make)."""
    quant.calibrate(gm, [(images, None)])
    export_quantized(gm, images[:2], path)


def measure(model: nn.Module, spec: quant.QuantSpec, size: int, images: torch.Tensor, batch: int,
            threads: int = 0, progress: bool = True) -> Placement:
    """Time all-INT8 and the FP32-prefix candidates of ``model`` (``spec.float_layers`` stay FP32 in all of
    them) against its float form on the target runtime (``spec.target``; OpenVINO's float is bf16 where the CPU
    has it) on this CPU; return the fastest placement."""
    from tqdm import tqdm

    model = model.cpu().eval()
    images = images[: max(2, min(len(images), 64))].cpu().float()
    all_int8 = quant.prepare_qat(model, spec, size)
    every = [b for b in leading_blocks(all_int8, model) if not inside(b, spec.float_layers)]
    blocks = every[: len(every) // 2]
    plans = [[]] + [blocks[:k] for k in range(1, len(blocks) + 1)]  # all-INT8, then FP32 prefixes
    labels = ["all INT8"] + [f"FP32 up to {b}" for b in blocks]
    islands = [m for m in float_islands(all_int8, model) if not inside(m, spec.float_layers)]
    island_k = None  # its candidate's index: not a prefix, so no part of the stopping rule
    if islands and islands not in plans:
        island_k = 1
        plans.insert(island_k, islands)
        labels.insert(island_k, f"FP32 where ops stay float ({len(islands)} modules)")
    x = np.ascontiguousarray(np.resize(images.numpy(), (batch, *images.shape[1:])))
    with tempfile.TemporaryDirectory(prefix="placement-") as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        onnxio.export_onnx(model, images[:2], fp32, 18)
        rt = inference.get(spec.target)
        reference = "bf16" if "bf16" in rt.float_precisions() else "FP32"
        sessions = {"fp32": rt.session(fp32, threads, options=rt.precision_options("bf16") if reference == "bf16"
                                       else None)}
        runs = inference.runs_for(sessions["fp32"], x, BLOCK_S)
        warmup = max(2, runs // 2)
        quick: list[float] = []  # one short timing per prefix, to stop exporting once FP32 blocks only cost
        for k in tqdm(range(len(plans)), desc="placement: export", disable=not progress, leave=False):
            path = Path(tmp) / f"int8-{k}.onnx"
            export_int8(quant.prepare_qat(model, spec.keeping_fp32(plans[k]), size) if k else all_int8, images,
                        path)
            sessions[k] = rt.session(path, threads)
            t = float(np.median(inference.time_runs(sessions[k], x, warmup, runs)))
            if k == island_k:
                continue
            quick.append(t)
            if len(quick) >= 3 and min(quick[-2:]) > STOP * min(quick):
                break  # two prefixes in a row far slower than the best: more FP32 blocks will not pay
        times: dict = {k: [] for k in sessions}
        for _ in tqdm(range(ROUNDS), desc="placement: timing", disable=not progress, leave=False):
            for k, sess in sessions.items():  # every session warmed up right before its timed block
                times[k].append(float(np.median(inference.time_runs(sess, x, warmup, runs))))
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    tried = [k for k in sessions if k != "fp32"]
    candidates = [{"float_blocks": len(plans[k]), "blocks": plans[k], "label": labels[k], "ms": ms[k],
                   "vs_fp32": ms["fp32"] / ms[k]} for k in tried]
    fastest = min(c["ms"] for c in candidates)
    best = min((c for c in candidates if c["ms"] <= fastest * (1 + MARGIN)),  # noise must not buy FP32 blocks
               key=lambda c: c["float_blocks"])
    return Placement(best["blocks"], batch, ms["fp32"], candidates, reference)
