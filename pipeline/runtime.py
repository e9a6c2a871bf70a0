"""Where and how code runs: device, seeds, AMP, and torchrun/DDP (one object, passed around)."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch of all ranks.

    ``nn.SyncBatchNorm`` runs on GPUs only; this one reduces per-channel sums with a differentiable
    ``all_reduce`` and so works with gloo on CPU as well as with NCCL. Same parameters and buffers
    as BatchNorm2d (``fit`` swaps the class in and back, the state dict never changes).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xf = x.float()
        local = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)),
                           xf.new_full((1,), xf.numel() // c)])
        total = all_reduce(local)
        count = total[-1]
        mean = total[:c] / count
        var = (total[c : 2 * c] / count - mean * mean).clamp_min(0)
        with torch.no_grad():
            m = self.momentum if self.momentum is not None else 0.1
            self.running_mean.lerp_(mean.detach(), m)
            self.running_var.lerp_(var.detach() * count / (count - 1).clamp_min(1), m)
            self.num_batches_tracked += 1
        scale = torch.rsqrt(var + self.eps) * self.weight
        y = xf * scale.view(1, c, 1, 1) + (self.bias - mean * scale).view(1, c, 1, 1)
        return y.to(x.dtype)


@dataclass
class Runtime:
    device: torch.device
    seed: int
    amp: Literal["off", "bf16", "fp16"] = "off"
    channels_last: bool = False
    progress: bool = True
    rank: int = 0
    world_size: int = 1
    sync_bn: bool = True  # under torchrun: batch-norm statistics over the global batch
    _dist: bool = field(default=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp == "off":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")

    def wrap(self, model: nn.Module) -> nn.Module:
        if not self._dist:
            return model
        from torch.nn.parallel import DistributedDataParallel

        # DDP copies every gradient into its bucket (gradient_as_bucket_view is off), and warns when the
        # gradient's strides differ from the bucket's. With channels_last that happens for 1x1 kernels,
        # whose strides of size-1 dimensions differ ([C, 1, 1, 1] vs [C, 1, C, C]) in the same memory
        # order: the copy is the same either way, so the warning (every step, every rank) is silenced.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    @contextlib.contextmanager
    def global_batchnorm(self, model: nn.Module) -> Iterator[None]:
        """Under torchrun (and ``sync_bn``), BatchNorm2d layers use the statistics of all ranks."""
        swapped = [m for m in model.modules() if type(m) is nn.BatchNorm2d] if self._dist and self.sync_bn else []
        for m in swapped:
            m.__class__ = SyncBatchNorm2d
        try:
            yield
        finally:
            for m in swapped:
                m.__class__ = nn.BatchNorm2d

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self._dist:
            t = t.clone()
            torch.distributed.all_reduce(t)
        return t

    def broadcast_(self, module: nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers (for modules DDP does not wrap)."""
        if self._dist:
            for t in module.state_dict().values():
                torch.distributed.broadcast(t, 0)

    def average_grads_(self, params: list[nn.Parameter]) -> None:
        """Average gradients across ranks (what DDP does for the wrapped model)."""
        if self._dist:
            for p in params:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= self.world_size

    def agree(self, flag: bool) -> bool:
        """Rank 0's answer, on every rank (e.g. "does this artifact exist?")."""
        return bool(self.from_main(flag))

    def from_main(self, obj):
        """Rank 0's picklable ``obj`` on every rank (e.g. a choice that only rank 0 measured)."""
        if not self._dist:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, 0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def barrier(self) -> None:
        if self._dist:
            torch.distributed.barrier()


def resolve_device(device: str) -> str:
    """``auto|cpu|cuda`` -> the device type the run will use ("cpu" or "cuda")."""
    if device not in ("auto", "cpu", "cuda"):
        raise PipelineError(f"device={device!r} is not one of auto, cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise PipelineError("device=cuda but no CUDA GPU is visible; use device=auto or device=cpu")
    return "cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu"


def resolve_amp(device_type: str, amp: str) -> str:
    """``auto|off|bf16|fp16`` -> the autocast the run will use. On CPU only bf16 (asked for explicitly)."""
    if device_type == "cuda":
        if amp == "off":
            return "off"
        return "bf16" if (amp == "auto" and torch.cuda.is_bf16_supported()) or amp == "bf16" else "fp16"
    if amp == "fp16":
        raise PipelineError("amp=fp16 needs a CUDA GPU; on CPU use amp=bf16 or amp=off")
    return "bf16" if amp == "bf16" else "off"


def runtime_key(device: str, amp: str, channels_last: bool, deterministic: bool, world_size: int,
                sync_bn: bool) -> dict:
    """What of the runtime changes a trained model (part of training stages' artifact keys)."""
    dev = resolve_device(device)
    out = {"device": dev, "amp": resolve_amp(dev, amp), "channels_last": channels_last, "world_size": world_size}
    if dev == "cuda":
        out["deterministic"] = deterministic
    if world_size > 1:
        out["sync_bn"] = sync_bn
    return out


def make_runtime(device: str, seed: int, amp: str, channels_last: bool, progress: bool,
                 deterministic: bool, sync_bn: bool = True) -> Runtime:
    """Resolve ``device=auto|cpu|cuda``, seed everything and join torchrun's process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = resolve_device(device) == "cuda"
    dist = world_size > 1
    if dist and not torch.distributed.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        torch.distributed.init_process_group(backend)
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    amp_mode = resolve_amp(dev.type, amp)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return Runtime(dev, seed, amp_mode, channels_last, progress and rank == 0, rank, world_size, sync_bn, dist)
