"""Datasets decoded once into uint8 tensors, and a batch iterator that augments on tensors.

Three sources (``data.source``):
- ``embedded``: the class-balanced CIFAR-10 subset shipped in ``pipeline/assets``;
- ``cifar10``: torchvision's CIFAR-10 binary format at ``data.root``;
- ``imagefolder``: any ``train/`` + ``test/`` tree of class folders (RGB or grayscale, any size),
  decoded once in parallel into a store in ``paths.cache`` (``pipeline.imagestore``) and read by
  rows, so a data set larger than memory trains too.
A stratified validation split is held out from train for model selection; the test split is only
used for the final report.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import imagestore
from pipeline.artifacts import file_sha256, stable_hash
from pipeline.config import key_neutral, not_in_key, setting
from pipeline.errors import PipelineError
from pipeline.imagestore import ImageStore, center_crop

log = logging.getLogger(__name__)

EMBEDDED = Path(__file__).resolve().parent / "assets" / "cifar10_subset.npz"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


@dataclass
class DataConfig:
    """``conf/data/*.yaml``."""

    source: Literal["embedded", "cifar10", "imagefolder"]
    root: str | None  # folder for cifar10 / imagefolder; ignored for embedded
    download: bool = not_in_key()  # cifar10 only: let torchvision download when root is empty
    # images are resized to this square size (imagefolder)
    image_size: int = setting(ge=8, le=4096, msg="{value} must be {range} pixels")
    # must match the data; checked after loading
    num_classes: int = setting(ge=2, msg="{value}; a classifier needs at least 2 classes")
    val_fraction: float = setting(ge=0, lt=1)  # held out from train for model selection
    mean: list[float]  # per-channel normalisation
    std: list[float] = setting(gt=0, each=True, msg="{value} must all be {range}")
    augment: bool  # random crop + horizontal flip on training batches
    crop_padding: int = setting(ge=0)
    # keep only the first N training images (quick runs)
    train_subset: int | None = setting(ge=1, msg="{value} must be a positive number of images (or null: all)")
    resize: Literal["squash", "shorter"]  # imagefolder: squash to a square, or shorter side + center crop
    # resize=shorter: image_size is this fraction of the stored square (224 of 256)
    crop_fraction: float = setting(gt=0, le=1)
    train_crop: Literal["pad", "resized"]  # pad: CIFAR pad + random crop; resized: RandomResizedCrop
    rrc_scale: list[float]  # train_crop=resized: range of the crop's share of the image area
    cutout: int  # side of a square set to the mean in every augmented training image (0: off)
    # processes decoding an image folder the first time (0: one per core)
    decode_workers: int = not_in_key(ge=0, msg="{value} must be {range} (0: one per core)")
    # largest decoded data set in GB (image store on disk, embedded/CIFAR images in memory); null: no limit
    max_cache_gb: float | None = not_in_key(gt=0, msg="{value} must be {range} (or null: no limit)")
    # what the data fingerprint (artifact keys, the image store) reads: stat (path, size, mtime) | content
    fingerprint: Literal["stat", "content"] = key_neutral("stat")

    def check(self) -> list[str]:
        errs = []
        if self.source != "embedded" and not self.root:
            errs.append(f"root: data.source={self.source} needs data.root=/path/to/data")
        if len(self.mean) != 3 or len(self.std) != 3:
            errs.append("mean/std: give three values (images are RGB)")
        if len(self.rrc_scale) != 2 or not 0.0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1.0:
            errs.append(f"rrc_scale: {self.rrc_scale} must be [low, high] with 0 < low <= high <= 1")
        if not 0 <= self.cutout < self.image_size:
            errs.append(f"cutout: {self.cutout} must be in [0, image_size) pixels (0: off)")
        return errs


@dataclass
class Splits:
    """uint8 images (N, 3, H, W) (a tensor, or ``Images`` read from a store) and int64 labels per split."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]


# ---------------------------------------------------------------- loading


def _decode_jpegs(blob: np.ndarray, offsets: np.ndarray) -> torch.Tensor:
    from PIL import Image

    raw = blob.tobytes()
    images = np.stack([
        np.asarray(Image.open(io.BytesIO(raw[offsets[i] : offsets[i + 1]])).convert("RGB"))
        for i in range(len(offsets) - 1)
    ])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _load_embedded() -> tuple[torch.Tensor, ...]:
    with np.load(EMBEDDED) as z:
        out = []
        for split in ("train", "test"):
            out.append(_decode_jpegs(z[f"{split}_jpeg"], z[f"{split}_offsets"]))
            out.append(torch.from_numpy(z[f"{split}_labels"]))
        classes = [str(c) for c in z["classes"]]
    return (*out, classes)


def _load_cifar10(cfg: DataConfig) -> tuple[torch.Tensor, ...]:
    from torchvision.datasets import CIFAR10

    root = Path(cfg.root)
    out = []
    for train in (True, False):
        try:
            ds = CIFAR10(str(root), train=train, download=cfg.download)
        except RuntimeError as e:
            raise PipelineError(
                f"no CIFAR-10 data at {root} ({e}); put cifar-10-batches-py there or set "
                "data.download=true (needs network)"
            ) from None
        out.append(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous())
        out.append(torch.tensor(ds.targets, dtype=torch.int64))
    return (*out, list(ds.classes))


def _list_imagefolder(split_dir: Path, classes: list[str] | None) -> tuple[list[Path], list[int], list[str]]:
    if not split_dir.is_dir():
        raise PipelineError(
            f"{split_dir} does not exist; data.root must hold train/ and test/ class folders"
        )
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if not found:
        raise PipelineError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<image>")
    classes = classes or found
    if found != classes:
        raise PipelineError(
            f"{split_dir} has classes {found} but train/ has {classes}; make both splits match"
        )
    files, labels = [], []
    for label, cls in enumerate(classes):
        imgs = sorted(p for p in (split_dir / cls).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not imgs:
            raise PipelineError(
                f"class folder {split_dir / cls} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                "add images or remove the folder"
            )
        files += imgs
        labels += [label] * len(imgs)
    return files, labels, classes


class Images:
    """uint8 images (N, 3, S, S) of an ``ImageStore``, by row: what ``Splits`` hold for image folders.

    Stands in for the uint8 tensor where the pipeline uses one: ``len``, ``.shape``, ``.nbytes``;
    indexing (tensor, list, slice or int) reads those rows from disk and returns a tensor, center-cropped
    to S when the store keeps a larger square (``data.resize=shorter``); ``full`` returns the whole
    stored square for random resized crops; ``subset`` is a lazy view; ``.to(device)`` reads everything.
    """

    def __init__(self, store: ImageStore, rows: np.ndarray, size: int):
        self.store, self.rows, self.size = store, np.asarray(rows, dtype=np.int64), size

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), 3, self.size, self.size))

    @property
    def nbytes(self) -> int:
        return len(self.rows) * 3 * self.size * self.size

    def _rows(self, key) -> np.ndarray:
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        return self.rows[key]

    def subset(self, key) -> Images:
        return Images(self.store, self._rows(key), self.size)

    def full(self, key) -> torch.Tensor:
        return torch.from_numpy(self.store.rows(np.atleast_1d(self._rows(key))))

    def __getitem__(self, key) -> torch.Tensor:
        rows = self._rows(key)
        out = self.store.rows(np.atleast_1d(rows))
        if self.store.side != self.size:
            out = np.ascontiguousarray(center_crop(out, self.size))
        t = torch.from_numpy(out)
        return t[0] if np.ndim(rows) == 0 else t

    def to(self, device: torch.device | str) -> torch.Tensor:
        out = torch.empty(tuple(self.shape), dtype=torch.uint8, device=device)
        for s in range(0, len(self), 1024):
            out[s : s + 1024] = self[s : s + 1024].to(device)
        return out


def _take(x: torch.Tensor | Images, idx: torch.Tensor) -> torch.Tensor | Images:
    return x.subset(idx) if isinstance(x, Images) else x[idx]


@functools.cache
def _scratch_cache() -> Path:
    """A cache folder for callers that gave none (one per process), removed when the process exits."""
    import atexit
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="pipeline-images-")
    atexit.register(shutil.rmtree, path, True)
    return Path(path)


_SCANS: dict[tuple[str, str], tuple] = {}  # (root, fingerprint mode) -> the last scan (see _scan_imagefolder)


def check_root(root: Path) -> None:
    """``data.root`` is an existing folder, or a one-line error saying what it is instead."""
    if root.is_file():
        raise PipelineError(f"data.root={root} is a file, not a folder; point it at the folder that holds train/ "
                            "and test/")
    if not root.is_dir():
        raise PipelineError(f"data.root={root} does not exist; point it at a folder with train/ and test/")


def _scan_imagefolder(root: Path, reuse: bool = False, mode: str = "stat", cache_dir: Path | None = None) -> tuple:
    """(train files, train labels, test files, test labels, classes, manifest hash) of an image folder.

    ``fingerprint`` always scans (artifact keys follow the files on disk) and leaves its scan here; loading
    the splits right after reuses it (``reuse``) instead of listing and stat-ing every image a second time.
    ``mode``: what the hash reads (``stat``: path, size, mtime; ``content``: every file's sha256).
    """
    check_root(root)
    if reuse and (str(root), mode) in _SCANS:
        return _SCANS[(str(root), mode)]
    train_files, train_labels, classes = _list_imagefolder(root / "train", None)
    test_files, test_labels, _ = _list_imagefolder(root / "test", classes)
    files, labels = train_files + test_files, train_labels + test_labels
    digest = (_content_hash(root, files, labels, classes, cache_dir) if mode == "content"
              else _manifest_hash(root, files, labels, classes))
    _SCANS[(str(root), mode)] = (train_files, train_labels, test_files, test_labels, classes, digest)
    return _SCANS[(str(root), mode)]


def _store_folder(cfg: DataConfig, digest: str, cache_dir: Path | None) -> Path:
    """The decoded store of an image folder: named by the files' hash and how images are resized."""
    how = [cfg.image_size, cfg.resize] + ([cfg.crop_fraction] if cfg.resize == "shorter" else [])
    return (cache_dir or _scratch_cache()) / f"imagefolder-{stable_hash([digest, *how])}"


def _load_imagefolder(cfg: DataConfig, cache_dir: Path | None, progress: bool) -> tuple:
    root = Path(cfg.root).expanduser()
    train_files, train_labels, test_files, test_labels, classes, digest = _scan_imagefolder(
        root, reuse=True, mode=cfg.fingerprint, cache_dir=cache_dir)
    files, labels = train_files + test_files, train_labels + test_labels
    folder = _store_folder(cfg, digest, cache_dir)
    store = None
    if (folder / imagestore.META_FILE).is_file():
        try:
            store = ImageStore(folder)
            log.info("data: decoded images from the store %s", folder)
        except (OSError, ValueError, KeyError) as e:
            log.warning("data: store %s unreadable (%s); decoding again", folder, e)
            shutil.rmtree(folder, ignore_errors=True)
    if store is None:
        check_size(cfg, cache_dir)
        imagestore.remove_partials(folder)
        workers = cfg.decode_workers or os.cpu_count() or 1
        try:
            imagestore.build(folder, files, {"classes": classes, "labels": labels, "n_train": len(train_files)},
                             cfg.image_size, cfg.resize, cfg.crop_fraction, workers, progress)
        except ValueError as e:
            raise PipelineError(str(e)) from None
        store = ImageStore(folder)
    n = len(train_files)
    y = torch.tensor(store.meta["labels"], dtype=torch.int64)
    return (Images(store, np.arange(n), cfg.image_size), y[:n],
            Images(store, np.arange(n, store.n), cfg.image_size), y[n:], classes)


def _manifest_hash(root: Path, files: list[Path], labels: list[int], classes: list[str]) -> str:
    """Hash of (relative path, size, mtime, label) of every file: any added, removed, changed or moved image
    changes it."""
    h = hashlib.sha256(json.dumps(classes).encode())
    for f, y in zip(files, labels, strict=True):
        st = os.stat(f)
        h.update(f"{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\0{y}\n".encode())
    return h.hexdigest()[:16]


_FILE_HASHES: dict[str, list] = {}  # path -> [size, mtime_ns, inode, ctime_ns, sha256], in this process


def _signature(st: os.stat_result) -> list[int]:
    """What says a file is unchanged since it was hashed: size, mtime, inode, and ctime (which every write,
    and every ``touch -r`` that resets the mtime, moves on)."""
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def file_hashes(files: list[Path], cache_dir: Path | None = None, workers: int = 0) -> list[str]:
    """sha256 of every file, read in parallel threads (hashlib releases the GIL). A hash is reused while the
    file's path, size, mtime, inode and ctime are unchanged: in this process, and across runs in
    ``<cache_dir>/file-hashes.json``."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.artifacts import atomic_write_text

    store = Path(cache_dir) / "file-hashes.json" if cache_dir is not None else None
    known = dict(_FILE_HASHES)
    if store is not None and store.is_file():
        try:
            known.update(json.loads(store.read_text()))
        except (OSError, ValueError):
            pass  # a damaged cache of hashes is only slower
    sigs = [_signature(os.stat(f)) for f in files]
    keys = [str(Path(f).absolute()) for f in files]
    todo = [i for i, (k, sig) in enumerate(zip(keys, sigs, strict=True)) if known.get(k, [None])[:4] != sig]
    if todo:
        with ThreadPoolExecutor(workers or min(32, (os.cpu_count() or 1) + 4)) as pool:
            for i, digest in zip(todo, pool.map(lambda i: file_sha256(files[i], 64), todo), strict=True):
                known[keys[i]] = [*sigs[i], digest]
        if store is not None:
            with contextlib.suppress(OSError):
                store.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(store, json.dumps(known))
    _FILE_HASHES.update({k: known[k] for k in keys})
    return [known[k][4] for k in keys]


def _content_hash(root: Path, files: list[Path], labels: list[int], classes: list[str],
                  cache_dir: Path | None) -> str:
    """Hash of (relative path, sha256 of the bytes, label) of every file: a changed image changes it even when
    its size and mtime stay the same."""
    h = hashlib.sha256(json.dumps(classes).encode())
    for f, y, digest in zip(files, labels, file_hashes(files, cache_dir), strict=True):
        h.update(f"{f.relative_to(root)}\0{digest}\0{y}\n".encode())
    return "c" + h.hexdigest()[:15]


def fingerprint(cfg: DataConfig, cache_dir: Path | None = None) -> str:
    """A hash of the data files themselves (part of every artifact key, so changed data is never reused).

    embedded: the shipped file's content; imagefolder: every image's relative path, size, mtime and class
    (``data.fingerprint=content``: its sha256 instead of size and mtime); cifar10: the batch files' names,
    sizes and mtimes (``content``: their sha256).
    """
    if cfg.source == "embedded":
        return file_sha256(EMBEDDED)
    root = Path(cfg.root).expanduser()
    if cfg.source == "imagefolder":
        return _scan_imagefolder(root, mode=cfg.fingerprint, cache_dir=cache_dir)[-1]
    if root.is_file():
        check_root(root)
    batches_dir = root / "cifar-10-batches-py"
    files = sorted(p for p in batches_dir.glob("*") if p.is_file()) if batches_dir.is_dir() else []
    if not files and not cfg.download:
        raise PipelineError(f"no CIFAR-10 data at {root}; put cifar-10-batches-py there or set data.download=true "
                            "(needs network)")
    if cfg.fingerprint == "content":
        return stable_hash(list(zip([p.name for p in files], file_hashes(files, cache_dir), strict=True)))
    return stable_hash([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def image_files(folder: Path) -> list[Path]:
    """The image files (``IMAGE_SUFFIXES``) anywhere under ``folder``, in any layout, sorted by path."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def files_fingerprint(folder: Path, files: list[Path], mode: str, cache_dir: Path | None = None) -> str:
    """A hash of ``files`` under ``folder``, read as ``data.fingerprint`` reads data files (``stat``: relative
    path, size, mtime; ``content``: relative path, sha256)."""
    labels = [0] * len(files)
    return (_content_hash(folder, files, labels, [], cache_dir) if mode == "content"
            else _manifest_hash(folder, files, labels, []))


def read_images(files: Sequence[Path], cfg: DataConfig) -> torch.Tensor:
    """Image files -> uint8 (N, 3, S, S), S = ``data.image_size``: the pixels evaluation reads from an image
    folder (decoded and resized as its store is, by ``data.resize``, then center-cropped to S); ``batches``
    normalises them. An unreadable file is a one-line error."""
    out = torch.empty((len(files), 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    for i, f in enumerate(files):
        try:
            arr = imagestore.read_rgb(Path(f), cfg.image_size, cfg.resize, cfg.crop_fraction)
        except ValueError as e:
            raise PipelineError(str(e)) from None
        out[i] = torch.from_numpy(np.ascontiguousarray(center_crop(arr, cfg.image_size)))
    return out


def _gb(n: float) -> str:
    return f"{n / 1e12:.1f} TB" if n >= 1e12 else f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux: MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_size(cfg: DataConfig, cache_dir: Path | None) -> None:
    """Before decoding: the decoded images (images x L x L x 3 bytes) must fit ``data.max_cache_gb`` and the
    free disk space (an image folder's store) or the available memory (embedded and CIFAR-10 images, held in
    memory at ``image_size``). One line when they do not; nothing when the store is already there."""
    if cfg.source == "imagefolder":
        root = Path(cfg.root).expanduser()
        train, _, test, _, _, digest = _scan_imagefolder(root, reuse=True, mode=cfg.fingerprint, cache_dir=cache_dir)
        folder = _store_folder(cfg, digest, cache_dir)
        if (folder / imagestore.META_FILE).is_file():
            return
        n, side = len(train) + len(test), imagestore.stored_size(cfg.image_size, cfg.resize, cfg.crop_fraction)
        where = "cache"
        place = folder.parent
        while not place.exists() and place != place.parent:
            place = place.parent
        room = shutil.disk_usage(place).free
        short = f"{place} has {_gb(room)} free"
    else:
        if cfg.source == "embedded":
            with np.load(EMBEDDED) as z:
                n = len(z["train_labels"]) + len(z["test_labels"])
        else:
            n = 60_000
        side, where = cfg.image_size, "memory"
        room = available_memory()
        short = f"this machine has {_gb(room or 0)} of memory available"
    need = n * 3 * side * side
    what = f"data: {n} images decoded at {side}x{side} need {_gb(need)} of {where}"
    if cfg.max_cache_gb is not None and need > cfg.max_cache_gb * 1e9:
        raise PipelineError(f"{what}, more than data.max_cache_gb={cfg.max_cache_gb:g}; lower data.image_size or "
                            f"raise data.max_cache_gb")
    if room is not None and need > room:
        fix = ", free space or move paths.cache elsewhere" if where == "cache" else ""
        raise PipelineError(f"{what}, but {short}; lower data.image_size{fix}")


def _stratified_split(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = int(round(len(idx) * fraction))
        val_idx.append(idx[:k])
        train_idx.append(idx[k:])
    return torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values


def _resized(x: torch.Tensor, size: int, chunk: int = 256) -> torch.Tensor:
    """uint8 images resized (bilinear) to ``size``, a chunk at a time: float copies of one chunk, not all."""
    out = torch.empty((len(x), x.shape[1], size, size), dtype=torch.uint8)
    for s in range(0, len(x), chunk):
        out[s : s + chunk] = F.interpolate(x[s : s + chunk].float(), size=size, mode="bilinear").round().to(torch.uint8)
    return out


_CACHE: dict[str, Splits] = {}


def load_splits(cfg: DataConfig, seed: int, cache_dir: Path | None = None, progress: bool = False) -> Splits:
    """Decode the data once per process and split off validation images (stratified, seeded)."""
    key = stable_hash([vars(cfg), seed])
    if key in _CACHE:
        return _CACHE[key]
    if cfg.source == "embedded":
        train_x, train_y, test_x, test_y, classes = _load_embedded()
    elif cfg.source == "cifar10":
        train_x, train_y, test_x, test_y, classes = _load_cifar10(cfg)
    else:
        train_x, train_y, test_x, test_y, classes = _load_imagefolder(cfg, cache_dir, progress)
    if not isinstance(train_x, Images) and train_x.shape[-1] != cfg.image_size:
        train_x, test_x = _resized(train_x, cfg.image_size), _resized(test_x, cfg.image_size)
    if len(classes) != cfg.num_classes:
        raise PipelineError(
            f"data has {len(classes)} classes but data.num_classes={cfg.num_classes}; "
            f"set data.num_classes={len(classes)}"
        )
    if cfg.train_subset:  # class-balanced: the first N/num_classes images of every class
        per_class = max(1, cfg.train_subset // len(classes))
        keep = torch.cat([torch.nonzero(train_y == c).flatten()[:per_class] for c in range(len(classes))])
        train_x, train_y = _take(train_x, keep), train_y[keep]
    tr, va = _stratified_split(train_y, cfg.val_fraction, seed)
    splits = Splits(_take(train_x, tr), train_y[tr], _take(train_x, va), train_y[va], test_x, test_y, classes)
    log.info("data: %s train / %s val / %s test images, %s classes, %sx%s",
             len(tr), len(va), len(test_y), len(classes), cfg.image_size, cfg.image_size)
    _CACHE[key] = splits
    return splits


# ---------------------------------------------------------------- batches


def random_crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample random crop (zero padding) and horizontal flip of a uint8 batch, as one gather."""
    b, c, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (padding, padding, padding, padding)).view(b, c, -1)
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(dev)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(dev)
    flip = (torch.rand(b, generator=generator) < 0.5).to(dev)
    cols = torch.arange(w, device=dev).expand(b, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]
    rows = dy[:, None] + torch.arange(h, device=dev)
    flat = (rows[:, :, None] * (w + 2 * padding) + cols[:, None, :]).view(b, 1, h * w)
    return padded.gather(2, flat.expand(b, c, h * w)).view(b, c, h, w)


def random_resized_crop_flip(x: torch.Tensor, size: int, scale: tuple[float, float],
                             generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample RandomResizedCrop to ``size`` + horizontal flip of a uint8 batch, as one ``roi_align``.

    torchvision's sampling: area share in ``scale``, aspect ratio in [3/4, 4/3] (log-uniform), ten tries
    per image, else the whole image. Returns float pixels (0-255), bilinear with adaptive averaging.
    """
    from torchvision.ops import roi_align

    b, _, h, w = x.shape
    tries = 10
    area = torch.empty(b, tries).uniform_(scale[0], scale[1], generator=generator) * (h * w)
    ratio = torch.exp(torch.empty(b, tries).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator))
    cw, ch = torch.sqrt(area * ratio).round(), torch.sqrt(area / ratio).round()
    ok = (cw >= 1) & (ch >= 1) & (cw <= w) & (ch <= h)
    pick = ok.float().argmax(1)  # the first try that fits
    rows = torch.arange(b)
    cw = torch.where(ok.any(1), cw[rows, pick], torch.full((b,), float(w)))
    ch = torch.where(ok.any(1), ch[rows, pick], torch.full((b,), float(h)))
    u = torch.rand(b, 2, generator=generator)
    x0, y0 = (u[:, 0] * (w - cw + 1)).floor(), (u[:, 1] * (h - ch + 1)).floor()
    flip = torch.rand(b, generator=generator) < 0.5
    boxes = torch.stack([rows.float(), x0, y0, x0 + cw, y0 + ch], 1).to(x.device)
    out = roi_align(x.float(), boxes, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return torch.where(flip.to(x.device)[:, None, None, None], out.flip(-1), out)


def cutout(x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Cutout (DeVries & Taylor, 2017): zero a ``size`` square at a random centre of every normalised
    image (zero = the mean colour); squares are clipped at the border, as in the paper."""
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b, 1), generator=generator).to(x.device)
    cx = torch.randint(0, w, (b, 1), generator=generator).to(x.device)
    ys, xs = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_y = ((ys - cy) >= -(size // 2)) & ((ys - cy) < size - size // 2)  # (b, h)
    in_x = ((xs - cx) >= -(size // 2)) & ((xs - cx) < size - size // 2)  # (b, w)
    keep = ~(in_y[:, :, None] & in_x[:, None, :])
    return x * keep[:, None].to(x.dtype)


class Batches:
    """Iterate normalised float batches from uint8 tensors; augmentation happens on tensors.

    With ``world_size > 1`` each rank sees its own shard of every epoch's permutation.
    """

    def __init__(self, x: torch.Tensor | Images, y: torch.Tensor, batch_size: int, mean: list[float],
                 std: list[float], *, shuffle: bool = False, augment: bool = False,
                 padding: int = 4, drop_last: bool = False, device: torch.device | str = "cpu",
                 channels_last: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                 train_crop: str = "pad", rrc_scale: tuple[float, float] = (0.08, 1.0), cutout: int = 0):
        self.x, self.y = x, y
        self.cutout = cutout if augment else 0
        self.batch_size, self.shuffle, self.augment, self.padding = batch_size, shuffle, augment, padding
        self.resized_crop, self.rrc_scale = augment and train_crop == "resized", tuple(rrc_scale)
        self._size = x.size if isinstance(x, Images) else x.shape[-1]  # output side of random resized crops
        self.drop_last, self.device, self.channels_last = drop_last, torch.device(device), channels_last
        self.rank, self.world_size = rank, world_size
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255
        self.inv_std = 1.0 / (torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255)
        self.seed = seed  # the shuffle: the same permutation on every rank, which then takes its shard
        self.generator = torch.Generator().manual_seed(seed + 1_000_003 * rank)  # augmentation: per rank
        self.epoch = 0
        self.pin = self.device.type == "cuda"  # page-locked batches copy asynchronously to the GPU
        whole = not (self.resized_crop and isinstance(x, Images) and x.store.side != x.size)  # crops need L x L
        if self.pin and whole and x.nbytes + y.nbytes < 0.25 * torch.cuda.mem_get_info(self.device)[0]:
            self.x, self.y, self.pin = x.to(self.device), y.to(self.device), False  # small sets live on the GPU

    def _indices(self) -> torch.Tensor:
        n = len(self.y)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        if self.world_size > 1:  # training (drop_last): equal shards, so every rank runs the same steps
            idx = idx[self.rank :: self.world_size]
            if self.drop_last:
                idx = idx[: n // self.world_size]
        return idx

    def __len__(self) -> int:
        n, w = len(self.y), self.world_size
        n = n // w if self.drop_last else len(range(self.rank, n, w))  # this rank's share (see _indices)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self._indices()
        self.epoch += 1
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            b = idx[start : start + self.batch_size]
            if isinstance(self.x, torch.Tensor):
                b = b.to(self.x.device)
            full = self.resized_crop and isinstance(self.x, Images)
            xb, yb = (self.x.full(b) if full else self.x[b]), self.y[b.to(self.y.device)]
            if self.pin:
                xb, yb = xb.pin_memory(), yb.pin_memory()
            xb, yb = xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)
            if self.resized_crop:
                xb = random_resized_crop_flip(xb, self._size, self.rrc_scale, self.generator)
            elif self.augment:
                xb = random_crop_flip(xb, self.padding, self.generator)
            xb = (xb.float() - self.mean) * self.inv_std
            if self.cutout:
                xb = cutout(xb, self.cutout, self.generator)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, yb


def batches(splits_x: torch.Tensor, splits_y: torch.Tensor, cfg: DataConfig, batch_size: int,
            **kw) -> Batches:
    """Shorthand that takes normalisation from the data config."""
    return Batches(splits_x, splits_y, batch_size, cfg.mean, cfg.std, padding=cfg.crop_padding,
                   train_crop=cfg.train_crop, rrc_scale=tuple(cfg.rrc_scale), cutout=cfg.cutout, **kw)
