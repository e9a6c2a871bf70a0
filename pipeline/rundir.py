"""``${unique_dir:<path>}``: the resolver that gives every run and sweep its own folder; ``${job_dirname:<text>}``
makes a sweep job's overrides one safe folder name.

Registered when the ``pipeline`` package is imported, so that a launcher's worker process (Submitit, Ray),
which composes no config but resolves the job's, finds it: there the value cached in the parent process
is returned, so a job never claims a folder of its own.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from omegaconf import OmegaConf


def unique_dir(base: str) -> str:
    """``${unique_dir:<path>}``: claim a new folder atomically (mkdir) at ``path``, or ``path_2``, ``path_3``, ...
    when another run started in the same second. An unwritable place is a one-line error."""
    path = Path(base)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for i in range(1, 10_000):
            candidate = path if i == 1 else path.with_name(f"{path.name}_{i}")
            try:
                candidate.mkdir()
                return str(candidate)
            except FileExistsError:
                continue
    except OSError as e:
        print(f"error: cannot create the run folder {path} ({e.strerror or e}); choose a writable place with "
              "paths.outputs=/some/writable/dir", file=sys.stderr)
        sys.exit(2)
    raise RuntimeError(f"no free run folder next to {path}")


MAX_NAME = 200  # bytes; file systems refuse names over 255


def job_dirname(text: str) -> str:
    """``${job_dirname:${hydra.job.override_dirname}}``: one folder level (a path in an override, e.g.
    ``search.compare=[/runs/grid]``, would nest folders) and short enough for the file system (long override
    lists are cut, ending in a hash of the whole so that two jobs never share a name)."""
    name = str(text).replace("/", "_")
    if len(name.encode()) <= MAX_NAME:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return name.encode()[: MAX_NAME - 12].decode(errors="ignore") + "~" + digest


def register() -> None:
    OmegaConf.register_new_resolver("unique_dir", unique_dir, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("job_dirname", job_dirname, replace=True)
