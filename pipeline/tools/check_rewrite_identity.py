"""Check that a change to the QAT rewrite leaves what it produces byte for byte as it was.

    python -m pipeline.tools.check_rewrite_identity --write before.json    # on the code before the change
    python -m pipeline.tools.check_rewrite_identity --compare before.json  # after it: "identical" per model
    [--models resnet8,timm_vit,...]

For a handful of models that between them take every pass of ``quant.prepare_qat`` (the project's CIFAR ResNets,
torchvision's MobileNets, EfficientNet, a shrunk ViT and Swin, small timm transformers and CNN layers, and a model
of odd layers: size branches, a module fx cannot trace, in-place writes, a conv called twice, ...), random weights
from a fixed seed, records sha256 of: the prepared graph (``str(gm.graph)`` + ``gm.code``) and its state dict
(names, dtypes, shapes, bytes); after calibration on fixed random images, the deploy form's graph and state dict
(``quant.to_deploy``); and the ONNX bytes the export stage writes for it (``onnxio.export_onnx`` with
``quant.onnx_translations()``). Exits 1 when a model differs (or fails where it did not). About 3 minutes on two
cores; timm models are skipped (and said) when timm is not installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import onnxio, quant
from pipeline.errors import first_line
from pipeline.models import build_model

SPEC = quant.QuantSpec("uint8", 8, 0.01, ())


class _Window(nn.Module):
    """EfficientViT-M's window padding: a branch on the input's size (traced for the configured size)."""

    def __init__(self, ws: int, c: int):
        super().__init__()
        self.ws, self.conv = ws, nn.Conv2d(c, c, 1)

    def forward(self, x):
        _, _, h, w = x.shape
        nh, nw = -(-h // self.ws) * self.ws, -(-w // self.ws) * self.ws
        if nh == h and nw == w:
            return self.conv(x)
        return self.conv(F.pad(x, (0, nw - w, 0, nh - h)))[:, :, :h, :w]


class _Untraceable(nn.Module):
    """``len()`` of a tensor: the batch size, which fx cannot make a number (called whole, FP32)."""

    def forward(self, x):
        return x.reshape(len(x), -1).reshape(x.shape) * 2


class _LinearNorm(nn.Module):
    """timm's LeViT ``LinearNorm``: a BatchNorm1d over a linear layer's output features."""

    def __init__(self, i: int, o: int):
        super().__init__()
        self.linear, self.bn = nn.Linear(i, o, bias=False), nn.BatchNorm1d(o)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class _Mixed(nn.Module):
    """Layers that take the passes the zoo models here do not: a BlurPool ``F.conv2d`` with a fixed filter and a
    reflect pad, ``x @ w`` with a parameter, a zero pad into a conv, Python numbers in Add / Mul / Div / Sub,
    ``x ** 2``, ``F.hardswish``, a lone BatchNorm -> ReLU, a stack and a sum over splits, ECA's Conv1d gate with
    ``expand_as``, a size branch, an untraceable module, an in-place write other users follow, a conv called
    twice, a layer whose weight the forward also reads, BatchNorm1d around linear layers, ``F.dropout``, a
    LayerNorm and a GroupNorm on quantized tensors, a softmax module."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.register_buffer("blur", (torch.tensor([1.0, 2.0, 1.0]).outer(torch.tensor([1.0, 2.0, 1.0])) / 16)
                             .repeat(16, 1, 1, 1), persistent=False)
        self.pad_conv = nn.Conv2d(16, 16, 3)
        self.shared = nn.Conv2d(16, 16, 1)  # called twice
        self.norm = nn.BatchNorm2d(32)
        self.after_norm = nn.Conv2d(32, 16, 1)
        self.b1, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 32, 1)
        self.eca = nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.window, self.untraceable = _Window(3, 16), _Untraceable()
        self.pos = nn.Conv2d(16, 16, 3, padding=1, groups=16)  # its weight's dtype is read too (EdgeNeXt)
        self.gn = nn.GroupNorm(4, 16)
        self.w = nn.Parameter(torch.randn(16, 24) * 0.2)
        self.mlp, self.mlp2 = _LinearNorm(24, 32), _LinearNorm(32, 24)
        self.ln, self.softmax = nn.LayerNorm(24), nn.Softmax(dim=-1)
        self.bn, self.head = nn.BatchNorm1d(24), nn.Linear(24, 10)
        for bn in (self.norm, self.mlp.bn, self.mlp2.bn, self.bn):
            with torch.no_grad():
                bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        b = x.shape[0]
        x = torch.relu(self.stem(x))
        x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.blur, stride=2, groups=16)  # BlurPool2d
        x = torch.relu(self.pad_conv(F.pad(x, (0, 2, 0, 2))))
        y = self.shared(x)
        x = F.hardswish(self.relu_cat(x, y))
        z = torch.stack([torch.relu(self.b1(x)), torch.relu(self.b2(x))], dim=1)  # SKNet
        gate = self.fc2(torch.relu(self.fc1(z.sum(dim=1).mean((2, 3), keepdim=True)))).view(b, 2, 16).softmax(dim=1)
        x = (z * gate.reshape(b, 2, 16, 1, 1)).sum(dim=1)
        e = self.eca(x.mean((2, 3)).view(b, 1, -1)).sigmoid().view(b, -1, 1, 1)  # ECA
        x = x * e.expand_as(x)
        x = self.untraceable(self.window(x))
        x = x + self.pos(x).to(self.pos.weight.dtype)
        x = self.shared(self.gn(x)) * 0.5 + x / 4 - 1
        t = x.flatten(2).transpose(1, 2) @ self.w  # SwiftFormer: a parameter matmul
        t = t + self.mlp2(F.hardsigmoid(self.mlp(t)) ** 2)
        t = self.ln(t)
        t = t * self.softmax(t)
        t.relu_()  # an in-place write the mean below follows
        return self.head(F.dropout(self.bn(t.mean(1)), 0.1, self.training))

    def relu_cat(self, x, y):
        return self.after_norm(torch.relu(self.norm(torch.cat([x, y], 1))))


def _tv_vit() -> nn.Module:  # torchvision's ViT, ViT-B/16's layout shrunk as tests/test_zoo does
    return build_model({"name": "vit", "target": "torchvision.models.VisionTransformer", "num_classes": 10,
                        "kwargs": {"image_size": 32, "patch_size": 8, "num_layers": 2, "num_heads": 4,
                                   "hidden_dim": 64, "mlp_dim": 128}})


def _tv_swin() -> nn.Module:  # torchvision's Swin, shrunk: padded + shifted windows, then one window
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer([4, 4], 32, [2, 2], [2, 4], [7, 7], num_classes=10)


def _timm_vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)


def _timm_convit() -> nn.Module:  # as tests/test_zoo.py
    from timm.models.convit import ConVit

    return ConVit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, local_up_to_layer=1, num_classes=10)


def _timm_mvitv2() -> nn.Module:  # as tests/test_zoo.py
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    cfg = MultiScaleVitCfg(depths=(1, 1), embed_dim=(16, 32), num_heads=(1, 2), stride_q=((1, 1), (2, 2)))
    return MultiScaleVit(cfg, img_size=(32, 32), num_classes=10)


def _timm_beit() -> nn.Module:  # as tests/test_zoo.py: q / v biases folded into the qkv linear
    from timm.models.beit import Beit

    model = Beit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10,
                 use_rel_pos_bias=True)
    for p in model.parameters():
        nn.init.normal_(p, std=0.1)
    return model


def _timm_nfnet() -> nn.Module:  # as tests/test_zoo.py: weight-standardised convs
    from timm.models.nfnet import NfCfg, NormFreeNet

    return NormFreeNet(NfCfg(depths=(1, 1, 1, 1), channels=(32, 64, 128, 256), stem_chs=16, stem_type="3x3",
                             group_size=None, bottle_ratio=0.25, extra_conv=False, attn_layer=None), 10)


def _timm(name: str) -> Callable[[], nn.Module]:
    return lambda: build_model({"name": name, "family": "timm", "num_classes": 10, "image_size": 32})


# name -> (builder, image size, spec)
MODELS: dict[str, tuple[Callable[[], nn.Module], int, quant.QuantSpec]] = {
    "resnet8": (lambda: build_model({"name": "resnet8", "num_classes": 10, "width": 0.5}), 32, SPEC),
    "resnet20_int8_fp32_block": (lambda: build_model({"name": "resnet20", "num_classes": 10, "width": 0.5}), 32,
                                 quant.QuantSpec("int8", 7, 0.01, ("layer1.1",))),
    "mobilenet_v2": (lambda: build_model({"name": "mobilenet_v2", "num_classes": 10}), 32, SPEC),
    "mobilenet_v3_small": (lambda: build_model({"name": "mobilenet_v3_small", "num_classes": 10}), 32, SPEC),
    "efficientnet_b0": (lambda: build_model({"name": "efficientnet_b0", "num_classes": 10}), 32, SPEC),
    "vit_shrunk": (_tv_vit, 32, SPEC),
    "swin_shrunk": (_tv_swin, 32, SPEC),
    "mixed_layers": (_Mixed, 24, SPEC),
    "timm_vit": (_timm_vit, 32, SPEC),
    "timm_tf_mobilenetv3_small_100": (_timm("tf_mobilenetv3_small_100"), 32, SPEC),  # 'SAME' pads, BatchNormAct
    "timm_convit": (_timm_convit, 32, SPEC),
    "timm_mvitv2": (_timm_mvitv2, 32, SPEC),
    "timm_beit": (_timm_beit, 32, SPEC),
    "timm_nfnet": (_timm_nfnet, 32, SPEC),
    "timm_levit_128s": (_timm("levit_128s"), 32, SPEC),
}


def _sha(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


def _state_sha(module: nn.Module) -> str:
    parts: list[bytes | str] = []
    for name, t in module.state_dict().items():
        if t is None:
            parts.append(f"{name}:None")
            continue
        t = t.detach().cpu().contiguous()
        parts += [f"{name}:{t.dtype}:{tuple(t.shape)}", t.reshape(-1).view(torch.uint8).numpy().tobytes()]
    return _sha(*parts)


def record(name: str, folder: Path) -> dict:
    """The hashes of one model's prepared form, deploy form and ONNX bytes."""
    build, size, spec = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    gm = quant.prepare_qat(model, spec, size)
    out = {"prepared_graph": _sha(str(gm.graph), gm.code), "prepared_state": _state_sha(gm),
           "quantized_layers": len(quant.quantized_layers(gm, calls=True)),
           "float_ops": {k: len(v) for k, v in quant.float_ops(gm).items()}}
    x = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(1))
    quant.calibrate(gm, [(x[:4], None), (x[4:], None)])
    dep = quant.to_deploy(gm.eval())
    out["deploy_graph"], out["deploy_state"] = _sha(str(dep.graph), dep.code), _state_sha(dep)
    path = folder / f"{name}.onnx"
    onnxio.export_onnx(dep, x[:2], path, 18, quant.onnx_translations())
    out["onnx"] = _sha(path.read_bytes())
    return out


def _timm_installed() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", type=Path, help="record the hashes into this JSON file")
    mode.add_argument("--compare", type=Path, help="compare against the hashes in this JSON file")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated, from: " + ", ".join(MODELS))
    a = p.parse_args(argv)
    names = [n for n in a.models.split(",") if n]
    if unknown := [n for n in names if n not in MODELS]:
        p.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    if not _timm_installed():
        print("timm is not installed: its models are skipped")
        names = [n for n in names if not n.startswith("timm_")]
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))  # thread count can change float rounding
    before = json.loads(a.compare.read_text()) if a.compare else {}
    results: dict[str, dict] = {}
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            t0 = time.perf_counter()
            try:
                results[name] = record(name, Path(tmp))
            except Exception as e:  # said, and compared like any other result
                results[name] = {"error": f"{type(e).__name__}: {first_line(e)}"}
            took = time.perf_counter() - t0
            got = results[name]
            if a.compare:
                want = before.get(name)
                if want is None:
                    verdict = "not in the recorded file"
                elif want == got:
                    verdict = "identical"
                else:
                    verdict = "DIFFERS in " + ", ".join(k for k in sorted({*want, *got}) if want.get(k) != got.get(k))
                    bad += 1
            else:
                verdict = "error: " + got["error"] if "error" in got else f"onnx {got['onnx'][:12]}"
            print(f"{name}: {verdict} ({took:.0f} s)", flush=True)
    if a.write:
        a.write.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        print(f"wrote {len(results)} models to {a.write}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
