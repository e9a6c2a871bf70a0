"""What a result depends on besides the config: the CPU, package versions and the code's git commit."""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import os
import platform
import subprocess
from pathlib import Path

PACKAGES = ("torch", "torchvision", "onnx", "onnxruntime", "openvino", "onnxscript", "hydra-core", "torch-pruning")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # native bfloat16 (OpenVINO's bf16 precision); not INT8 speed


def versions() -> dict[str, str]:
    """Versions of Python and the packages that shape results (for manifests and reports)."""
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    """The commit of the checked-out code, or None outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip() or None
    except Exception:
        return None


def cpu_info() -> dict:
    """CPU model name, core count and the SIMD flags that decide INT8, bf16 and FP32 kernel speed."""
    info = {"cpu": "unknown", "cores": os.cpu_count(), "flags": []}
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name") and info["cpu"] == "unknown":
                info["cpu"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["flags"] = sorted(f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8",
                                                     *BF16_FLAGS) if f in flags)
                break
    return info
