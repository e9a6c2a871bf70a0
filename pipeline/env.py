"""What a result depends on besides the config: package versions and the code's git commit."""

from __future__ import annotations

import importlib.metadata as md
import platform
import subprocess
from pathlib import Path

PACKAGES = ("torch", "torchvision", "onnx", "onnxruntime", "onnxscript", "hydra-core", "torch-pruning")


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
