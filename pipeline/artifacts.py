"""Artifact storage: atomic writes, checkpoints, manifests, content hashes and locks.

Every stage writes into ``<paths.artifacts>/<stage>/<key>/`` where ``key`` is a hash of the
config that matters to the stage and of its inputs' keys. The folder is first built under a
temporary name and renamed into place, so a reader never sees a half-written artifact.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError

# Checkpoint keys (named once, used by every stage).
CKPT_MODEL_CFG = "model_cfg"  # dict that rebuilds the architecture (pipeline.models.build_model)
CKPT_SHAPES = "shapes"  # per-module shapes after structured pruning ({} when unpruned)
CKPT_STATE = "state_dict"
CKPT_EXTRA = "extra"  # stage-specific plain data (e.g. quantization settings)

MANIFEST = "manifest.json"
METRICS = "metrics.json"
CONFIG = "config.yaml"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    """Parse a JSON file; a missing or damaged one is a one-line error naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path} does not exist; run the stage that writes it") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path} is damaged ({type(e).__name__}: {e}); delete it and run the same "
                            "command again (the stage that wrote it rebuilds it)") from None


def detached_state(state_dict: dict, keep=None, clone: bool = False) -> OrderedDict:
    """A detached CPU view of a state dict (``clone``: a copy on the tensors' own device; ``keep``: only the
    keys it accepts) that keeps its ``_metadata``:
    the per-module versions ``load_state_dict`` hands to ``_load_from_state_dict`` (torchvision's MNASNet,
    for one, refuses a state dict without them). A dict comprehension would drop them."""
    def copy(v):
        if not isinstance(v, torch.Tensor):
            return v
        return v.detach().clone() if clone else v.detach().cpu()

    out = OrderedDict((k, copy(v)) for k, v in state_dict.items() if keep is None or keep(k))
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        out._metadata = OrderedDict((k, dict(v)) for k, v in meta.items())  # type: ignore[attr-defined]
    return out


def save_checkpoint(path: Path, state_dict: dict, model_cfg: dict, shapes: dict | None = None,
                    extra: dict | None = None) -> None:
    """Save a plain-data checkpoint that ``torch.load(weights_only=True)`` accepts."""
    import io

    buf = io.BytesIO()
    torch.save(
        {
            CKPT_MODEL_CFG: model_cfg,
            CKPT_SHAPES: shapes or {},
            CKPT_STATE: detached_state(state_dict),  # with its module versions (_metadata)
            CKPT_EXTRA: extra or {},
        },
        buf,
    )
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint safely; a missing, truncated or foreign file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"checkpoint {path} does not exist; run the stage that makes it first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle of code, random bytes ...
        raise PipelineError(
            f"checkpoint {path} is corrupt or not a pipeline checkpoint ({type(e).__name__}); replace it, "
            "or if it is an artifact's model.pt delete it and run the same command again (it is rebuilt)"
        ) from None
    if not isinstance(ckpt, dict) or CKPT_STATE not in ckpt or CKPT_MODEL_CFG not in ckpt:
        raise PipelineError(
            f"checkpoint {path} lacks '{CKPT_STATE}'/'{CKPT_MODEL_CFG}'; "
            "it was not written by this pipeline"
        )
    return ckpt


def stable_hash(obj: Any, length: int = 12) -> str:
    """Hash of a JSON-able object, independent of dict order."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def file_sha256(path: Path, length: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


_VERIFIED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, once per process


def _cached_sha256(path: Path) -> str:
    st = path.stat()
    k = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if k not in _VERIFIED:
        _VERIFIED[k] = file_sha256(path)
    return _VERIFIED[k]


def verify_artifact(folder: Path) -> str | None:
    """None when every file listed in the folder's manifest is there with its size and sha256; else
    what is wrong (a damaged manifest, a missing, truncated or modified file)."""
    folder = Path(folder)
    try:
        outputs = json.loads((folder / MANIFEST).read_text())["outputs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} unreadable: {type(e).__name__}"
    if not isinstance(outputs, dict) or METRICS not in outputs:
        return f"{MANIFEST} lists no {METRICS}"
    for name, want in outputs.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if not isinstance(want, dict) or path.stat().st_size != want.get("bytes"):
            return f"{name} has another size than when it was written"
        if _cached_sha256(path) != want.get("sha256"):
            return f"{name} differs from its sha256 in the manifest"
    return None


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock (``fcntl.flock``) so two jobs never build one artifact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it is renamed to ``final`` atomically."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial"))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def shown(path: Path) -> str:
    """A path as a user would type it: relative when below the current folder, else absolute."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def check_writable(folder: Path) -> None:
    """Fail early, in one line, when outputs cannot be written to ``folder``."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test"):
            pass
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            reason = "permission denied"
        raise PipelineError(
            f"output folder {folder} is not writable ({reason}); "
            "choose another with paths.outputs=/some/writable/dir"
        ) from None
