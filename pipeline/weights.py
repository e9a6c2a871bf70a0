"""Starting weights for the baseline (``model.weights``): a torchvision weights name from the local torch
hub cache, a ``state_dict`` file (``.pt``, ``.pth``, ``.bin``, ``.safetensors``) or a checkpoint of this
pipeline. Nothing is downloaded unless ``model.download=true``.

When the file's classifier has another number of classes than ``data.num_classes`` the classifier is
left freshly initialised and everything else is loaded (transfer learning); any other mismatch is a
one-line error with the counts of missing, unexpected and differently shaped keys.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import PipelineError, first_line

log = logging.getLogger(__name__)
FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def is_file_ref(weights: str) -> bool:
    return "/" in weights or weights.endswith(FILE_SUFFIXES) or weights.startswith((".", "~"))


def torchvision_weights(name: str, weights: str):
    """The torchvision ``WeightsEnum`` member for model ``name`` (``DEFAULT``, ``IMAGENET1K_V1``, ...)."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        raise PipelineError(f"model.weights={weights}: {name!r} has no torchvision weights; give a state_dict "
                            "file (.pt, .pth, .safetensors) instead") from None
    try:
        return enum[weights]
    except KeyError:
        names = ", ".join(["DEFAULT", *(w.name for w in enum)])
        raise PipelineError(f"model.weights={weights}: not a weights name of {name}; choose one of {names}, "
                            "or give a file") from None


def cache_path(w) -> Path:
    """Where torch.hub keeps a torchvision weights file (``$TORCH_HOME/hub/checkpoints/<file>``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name


def fingerprint(model_cfg) -> str | None:
    """What the weights are, for artifact keys: a file's sha256 (not its path), or a torchvision weights URL
    (its file name carries the content hash, checked when loading)."""
    from pipeline.artifacts import file_sha256

    weights = model_cfg.weights
    if weights is None:
        return None
    if is_file_ref(weights):
        path = Path(weights).expanduser()
        return f"sha256:{file_sha256(path)}" if path.is_file() else f"missing:{weights}"
    if model_cfg.family == "timm":
        return f"timm:{model_cfg.name}:{weights}"
    return f"url:{torchvision_weights(model_cfg.name, weights).url}"


def _read_file(path: Path) -> dict:
    if not path.is_file():
        raise PipelineError(f"model.weights={path}: no such file; give a state_dict file (.pt, .pth, .safetensors), "
                            "a pipeline model.pt or a torchvision weights name such as DEFAULT")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise PipelineError(f"model.weights={path}: reading .safetensors needs the safetensors package; "
                                "pip install safetensors") from None
        try:
            return load_file(str(path))
        except Exception as e:  # truncated, not safetensors, damaged header ...
            raise PipelineError(f"model.weights={path} cannot be read as safetensors ({type(e).__name__}: "
                                f"{first_line(e, 80)}); give a complete .safetensors file") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PipelineError(f"model.weights={path} cannot be read as weights ({type(e).__name__}); give a state_dict "
                            "saved with torch.save(model.state_dict(), path)") from None
    if not isinstance(obj, dict):
        raise PipelineError(f"model.weights={path} holds a {type(obj).__name__}, not a state_dict")
    return obj


def read_state_dict(model_cfg, trusted_target: str | None) -> tuple[dict, dict]:
    """The state dict the config names, and pruned shapes when it is a pipeline checkpoint (else {})."""
    from pipeline.artifacts import CKPT_MODEL_CFG, CKPT_SHAPES, CKPT_STATE
    from pipeline.models import check_trusted

    weights = model_cfg.weights
    if is_file_ref(weights):
        path = Path(weights).expanduser()
        obj = _read_file(path)
        if CKPT_STATE in obj and CKPT_MODEL_CFG in obj:  # a checkpoint of this pipeline
            check_trusted(obj[CKPT_MODEL_CFG], trusted_target, f"model.weights={weights}")
            return obj[CKPT_STATE], obj.get(CKPT_SHAPES) or {}
        for key in ("state_dict", "model", "model_state_dict"):  # common training-script wrappers
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        state = OrderedDict((k.removeprefix("module."), v) for k, v in obj.items() if isinstance(v, torch.Tensor))
        if (meta := getattr(obj, "_metadata", None)) is not None:  # module versions, as saved
            state._metadata = OrderedDict(("" if k == "module" else k.removeprefix("module."), v)
                                          for k, v in meta.items())
        return state, {}
    w = torchvision_weights(model_cfg.name, weights)
    path = cache_path(w)
    if path.is_file():
        return _read_file(path), {}
    if not model_cfg.download:
        raise PipelineError(f"model.weights={weights}: {model_cfg.name} weights are not in the local cache {path}; "
                            f"put the file there (from {w.url}) or set model.download=true")
    return w.get_state_dict(progress=True, check_hash=True), {}


def classifier_name(model: nn.Module) -> str | None:
    """Name of the final classifier layer (the last Linear, or a final 1x1 conv as in SqueezeNet)."""
    last = None
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            last = (name, m)
    return last[0] if last else None


def load_weights(model: nn.Module, model_cfg, trusted_target: str | None) -> dict:
    """Load ``model.weights`` into ``model`` (in place); returns what was loaded and what was replaced."""
    from pipeline.artifacts import detached_state
    from pipeline.models import apply_shapes

    state, shapes = read_state_dict(model_cfg, trusted_target)
    if shapes:
        apply_shapes(model, shapes)
    own = model.state_dict()
    head = classifier_name(model)
    head_keys = {f"{head}.weight", f"{head}.bias"} if head else set()
    other_shape = [k for k in state if k in own and state[k].shape != own[k].shape]
    replaced = [k for k in other_shape if k in head_keys]
    other_shape = [k for k in other_shape if k not in head_keys]
    missing = [k for k in own if k not in state and k not in replaced]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected or other_shape:
        examples = ", ".join((missing + unexpected + [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                                                      for k in other_shape])[:3])
        hint = ""
        if model_cfg.small_input and any(k.split(".")[0] in ("conv1", "features", "stem") for k in other_shape):
            hint = " (model.small_input=true replaces the stem: set model.small_input=false to keep pretrained weights)"
        raise PipelineError(f"model.weights={model_cfg.weights} does not fit {model_cfg.name or model_cfg.target}: "
                            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(other_shape)} of another "
                            f"shape (e.g. {examples}){hint}; use weights of this architecture")
    kept = detached_state(state, keep=lambda k: k not in replaced)
    if not hasattr(state, "_metadata"):  # .safetensors keep no module versions: this code's are the right ones
        kept._metadata = own._metadata
    model.load_state_dict(kept, strict=False)
    info = {"weights": model_cfg.weights, "loaded_tensors": len(state) - len(replaced),
            "replaced_classifier": replaced, "pruned": bool(shapes)}
    if replaced:
        log.info("model.weights: %d tensors loaded; classifier %s re-initialised for %d classes (was %s)",
                 info["loaded_tensors"], head, own[f"{head}.weight"].shape[0], tuple(state[replaced[0]].shape))
    else:
        log.info("model.weights: %d tensors loaded from %s", info["loaded_tensors"], model_cfg.weights)
    return info
