"""Decoded images on disk: written once in parallel, read by rows, never held whole in memory.

An image folder is decoded into one raw uint8 file (N, 3, L, L) plus ``meta.json``, in a folder of
``paths.cache`` named by the data key. Worker processes decode chunks of files and write their rows
straight into the file, so memory does not grow with the data set; an interrupted decode leaves only
a ``.partial`` folder, removed by the next run. Reads use ``os.pread`` into a batch buffer: the data
stays in the operating system's page cache and out of the process's resident memory.

How an image becomes ``L x L`` (``data.resize``):
- ``squash``: resized to ``image_size x image_size`` (L = image_size; CIFAR-style small images);
- ``shorter``: shorter side to ``L = round(image_size / crop_fraction)``, center crop ``L x L``; the
  evaluation view center-crops ``image_size`` from it (224 of 256: the ImageNet evaluation), training
  may draw random resized crops from the whole ``L x L``.

This module imports no torch at import time, so decode workers start quickly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DATA_FILE, META_FILE = "images.u8", "meta.json"


def stored_size(image_size: int, resize: str, crop_fraction: float) -> int:
    """Side of the stored square: the image size itself, or the larger square it is center-cropped from."""
    return image_size if resize == "squash" else int(round(image_size / crop_fraction))


def prepare(im, image_size: int, resize: str, crop_fraction: float):
    """A PIL image (RGB) -> the stored ``L x L`` PIL image (see the module docstring)."""
    from PIL import Image

    if resize == "squash":
        return im if im.size == (image_size, image_size) else im.resize((image_size, image_size), Image.BILINEAR)
    side = stored_size(image_size, resize, crop_fraction)
    w, h = im.size
    scale = side / min(w, h)
    nw, nh = max(side, int(round(w * scale))), max(side, int(round(h * scale)))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - side) // 2, (nh - side) // 2
    return im.crop((left, top, left + side, top + side))


def center_crop(a: np.ndarray, size: int) -> np.ndarray:
    """Center ``size x size`` of (..., H, W) (channels first) arrays."""
    h, w = a.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return a[..., top : top + size, left : left + size]


WIDE_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit gray PNGs/TIFFs (and 32-bit integer gray)


def to_rgb(im):
    """A PIL image in RGB. 16-bit gray (``I;16``, and ``I``, as which 16-bit PNGs open) is scaled to 8 bits
    (x * 255 / 65535, rounded); PIL's own ``convert("RGB")`` clips it at 255, so a mid-grey 16-bit image
    would come out white."""
    from PIL import Image

    if im.mode in WIDE_GRAY:
        a = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(a * (255.0 / 65535.0)), 0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def read_rgb(path: Path, image_size: int, resize: str, crop_fraction: float) -> np.ndarray:
    """One image file -> (3, L, L) uint8. Raises ValueError with the reason for unreadable files."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(prepare(to_rgb(im), image_size, resize, crop_fraction), dtype=np.uint8)
    except Exception as e:
        raise ValueError(f"cannot read image {path} ({type(e).__name__}: {e}); delete or replace the file") from None
    return arr.transpose(2, 0, 1)


def _decode_chunk(data_path: str, side: int, start: int, files: Sequence[str], image_size: int, resize: str,
                  crop_fraction: float) -> int:
    """Worker: decode ``files`` into rows ``start ...`` of the raw file (positioned writes, no memory map)."""
    row = 3 * side * side
    fd = os.open(data_path, os.O_WRONLY)
    try:
        for i, f in enumerate(files):
            arr = np.ascontiguousarray(read_rgb(Path(f), image_size, resize, crop_fraction))
            if os.pwrite(fd, memoryview(arr.reshape(-1)), (start + i) * row) != row:
                raise OSError(f"short write to {data_path}")
    finally:
        os.close(fd)
    return len(files)


def _decode_job(job: tuple) -> int:
    return _decode_chunk(*job)


def _worker_init() -> None:
    """Decode workers die on SIGTERM (the default) and leave Ctrl-C to the main process, which stops them."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Terminated(BaseException):
    """SIGTERM during a decode: unwinds like Ctrl-C, so the partial store is removed."""


@contextlib.contextmanager
def _sigterm_unwinds():
    """While decoding in the main thread: SIGTERM raises ``Terminated`` instead of killing the process on
    the spot, so the ``.partial`` folder is removed (the process then exits with 143, as a SIGTERM would)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Terminated

    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except Terminated:
        logging.getLogger(__name__).warning("data: decoding stopped by SIGTERM; the partial store was removed")
        raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        signal.signal(signal.SIGTERM, old)


def build(folder: Path, files: Sequence[Path], meta: dict, image_size: int, resize: str, crop_fraction: float,
          workers: int, progress: bool = False, chunk: int = 256) -> None:
    """Decode ``files`` into ``folder`` (created atomically: a partial folder renamed when complete). Ctrl-C,
    SIGTERM or an error stop the workers and remove the partial folder."""
    side = stored_size(image_size, resize, crop_fraction)
    n = len(files)
    tmp = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with _sigterm_unwinds():
        _build(tmp, folder, files, meta, image_size, resize, crop_fraction, workers, progress, chunk, side, n)


def _build(tmp: Path, folder: Path, files: Sequence[Path], meta: dict, image_size: int, resize: str,
           crop_fraction: float, workers: int, progress: bool, chunk: int, side: int, n: int) -> None:
    tmp.mkdir(parents=True)
    data_path = tmp / DATA_FILE
    try:
        with open(data_path, "wb") as fh:  # sparse file of the final size
            fh.truncate(n * 3 * side * side)
        jobs = [(str(data_path), side, s, [str(f) for f in files[s : s + chunk]], image_size, resize, crop_fraction)
                for s in range(0, n, chunk)]
        from tqdm import tqdm

        bar = tqdm(total=n, desc="decode images", unit="img", mininterval=1.0, disable=not progress)
        if workers <= 1 or len(jobs) == 1:
            for job in jobs:
                bar.update(_decode_chunk(*job))
        else:
            import multiprocessing as mp

            # fork where there is one (workers need only PIL and numpy; torch's DataLoader forks too)
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            pool = ctx.Pool(min(workers, len(jobs)), initializer=_worker_init)
            try:
                for done in pool.imap_unordered(_decode_job, jobs):
                    bar.update(done)
                pool.close()
            except BaseException:
                pool.terminate()  # stop the workers now, not after the chunks they have queued
                raise
            finally:
                pool.join()
        bar.close()
        (tmp / META_FILE).write_text(json.dumps({**meta, "n": n, "side": side}))
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished the same store first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_partials(folder: Path) -> None:
    """Partial stores left by interrupted decodes (other than live ones of this process)."""
    for p in folder.parent.glob(f"{folder.name}.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


class ImageStore:
    """Rows of a decoded store, read with ``os.pread`` (thread-safe, no memory map)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.meta = json.loads((folder / META_FILE).read_text())
        self.n, self.side = self.meta["n"], self.meta["side"]
        self.row_bytes = 3 * self.side * self.side
        path = folder / DATA_FILE
        if path.stat().st_size != self.n * self.row_bytes:
            raise ValueError(f"{path} has {path.stat().st_size} bytes, expected {self.n * self.row_bytes}")
        self._fd = os.open(path, os.O_RDONLY)

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """(len(idx), 3, L, L) uint8 copies of the given rows."""
        out = np.empty((len(idx), 3, self.side, self.side), np.uint8)
        flat = out.reshape(len(idx), -1)
        for k, i in enumerate(np.asarray(idx, dtype=np.int64)):
            got = os.preadv(self._fd, [memoryview(flat[k])], int(i) * self.row_bytes)
            if got != self.row_bytes:
                raise OSError(f"short read of row {i} from {self.folder / DATA_FILE}")
        return out

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)
