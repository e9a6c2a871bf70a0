"""compress-pipeline: train -> prune -> distill -> qat -> export -> validate for image classifiers."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent
# The conf/ tree: inside the installed package (the wheel ships it as pipeline/conf), or the repository's
# top-level conf/ for a source checkout or an editable install (the one source of truth).
CONF_DIR: Path = _HERE / "conf" if (_HERE / "conf" / "config.yaml").is_file() else _HERE.parent / "conf"

from pipeline.rundir import register as _register  # noqa: E402 (after CONF_DIR: rundir imports nothing of ours)

_register()  # ${unique_dir:...} in run and sweep folders, also in a launcher's worker process
