"""Check that channel pruning removes the channels it names, group by group, on any model.

    python -m pipeline.tools.check_prune [--models resnet18,timm:cspresnet50,...] [--size 32] [--layers 40]

For each sampled conv / linear layer: Torch-Pruning's group for two of its output channels (built as channel
pruning builds it, with the same analysable forms), those channels zeroed in every layer of the group, the
model run, the group pruned, the model run again. Where the group names the right channels the outputs are
equal (the zeroed channels contributed nothing); where it maps a layer onto other channels they differ, or
the group indexes past a layer's channels: ``bad``. ``kept``: layers channel pruning keeps whole (its trial
prune, which runs this check on every group it removes, found them unprunable), not checked. ``breaks``:
the pruned model no longer runs (the trial prune keeps such layers). ``skipped``: a group through a norm
over channels (LayerNorm, GroupNorm), a weight-standardised conv's inputs or a grouped conv, whose removal
changes the other channels by design or follows Torch-Pruning's own rule, through a layer this check does
not know, or to the model's outputs (a second classifier head). Exits 1 when any group is bad.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from pipeline.errors import first_line
from pipeline.models import build_model
from pipeline.pruning import (
    _analysable,
    _copy,
    _dependency_graph,
    _quiet_warnings,
    _same_outputs,
    _zero_group,
    classifier,
    kept_layers,
    unprunable_layers,
)


@dataclass
class Checked:
    kept: int = 0  # layers channel pruning keeps whole (Torch-Pruning cannot prune them correctly): not checked
    ok: int = 0
    skipped: int = 0
    breaks: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)  # "layer (why)"

    def line(self) -> str:
        line = f"kept {self.kept}, ok {self.ok}, breaks {len(self.breaks)}, skipped {self.skipped}, bad {len(self.bad)}"
        if self.bad:
            line += f": {', '.join(self.bad[:4])}" + (f" (+{len(self.bad) - 4} more)" if len(self.bad) > 4 else "")
        return line


def check_model(model: nn.Module, image_size: int, layers: int = 40, seed: int = 0,
                skip_kept: bool = True) -> Checked:
    """Check up to ``layers`` evenly spaced conv / linear layers of ``model`` (left unchanged); with ``skip_kept``
    not those channel pruning keeps (``unprunable_layers`` at ratio 0.3)."""
    torch.manual_seed(seed)
    x = torch.randn(2, 3, image_size, image_size)
    head = classifier(model)  # its outputs are the classes
    names = [n for n, m in model.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.shape[0] > 4 and m is not head]
    kept = set(unprunable_layers(model, image_size, kept_layers(model, [], False), 0.3)) if skip_kept else set()
    result = Checked()
    for name in tqdm(names[:: max(1, len(names) // layers)], desc="check_prune", unit="layer", leave=False):
        if name in kept:
            result.kept += 1
            continue
        m = _copy(model).eval()
        layer = m.get_submodule(name)
        try:
            with _quiet_warnings(), _analysable():
                graph = _dependency_graph(m, image_size)
                prune = graph.get_pruner_of_module(layer).prune_out_channels
                group = graph.get_pruning_group(layer, prune, idxs=[1, layer.weight.shape[0] // 2])
        except Exception as e:  # a graph Torch-Pruning cannot analyse: nothing to check
            result.breaks.append(f"{name} ({type(e).__name__})")
            continue
        try:
            if not _zero_group(group):
                result.skipped += 1
                continue
        except IndexError:  # the group names channels a layer does not have
            result.bad.append(f"{name} (index past a layer)")
            continue
        try:
            with torch.no_grad():
                before = m(x)
            with _quiet_warnings(), _analysable():
                group.prune()
            with torch.no_grad():
                after = m(x)
        except Exception as e:
            result.breaks.append(f"{name} ({type(e).__name__})")
            continue
        if after.shape != before.shape:  # the group reaches the classes (a second head): never pruned
            result.skipped += 1
            continue
        if _same_outputs(before, after):
            result.ok += 1
        else:
            diff = float((after - before).abs().max() / before.abs().max().clamp_min(1e-12))
            result.bad.append(f"{name} (outputs differ by {diff:.2g})")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v3_small,timm:cspresnet50",
                    help="comma-separated torchvision names, or timm:<name>")
    ap.add_argument("--size", type=int, default=32, help="input size the graph is traced at")
    ap.add_argument("--layers", type=int, default=40, help="layers checked per model (evenly spaced)")
    args = ap.parse_args()
    any_bad = False
    for name in args.models.split(","):
        family = "timm" if name.startswith("timm:") else "auto"
        torch.manual_seed(0)
        try:
            model = build_model({"name": name.removeprefix("timm:"), "num_classes": 10, "image_size": args.size,
                                 "family": family, "small_input": args.size <= 64 and family == "auto"}).eval()
            checked = check_model(model, args.size, args.layers)
        except Exception as e:  # a model that cannot be built or run at this size: say so, check the others
            print(f"{name}: not checked ({type(e).__name__}: {first_line(e)})", flush=True)
            continue
        any_bad |= bool(checked.bad)
        print(f"{name}: {checked.line()}", flush=True)
    sys.exit(1 if any_bad else 0)


if __name__ == "__main__":
    main()
