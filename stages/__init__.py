"""One module per pipeline stage, each ending with ``STAGE = Stage(...)`` (see ``pipeline.stage``).

``REGISTRY`` collects them by discovery, like timm's model registry: a new stage is a new module here,
its YAML in ``conf/stages/`` and its line in the defaults of ``conf/config.yaml``.
"""

from __future__ import annotations

import importlib
import pkgutil

from pipeline.stage import Stage


def _discover() -> dict[str, Stage]:
    found: dict[str, Stage] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        stage = getattr(importlib.import_module(f"{__name__}.{info.name}"), "STAGE", None)
        if isinstance(stage, Stage):
            if stage.name in found:
                raise RuntimeError(f"two stages are named {stage.name!r}")
            found[stage.name] = stage
    return found


REGISTRY: dict[str, Stage] = _discover()
