"""Build the embedded CIFAR-10 subset that ships with the repo.

Reads the CIFAR-10 JPEG archive (ImageFolder layout ``cifar10-jpg/{train,test}/<class>/NNNN.jpg``)
and keeps the first ``--train-per-class`` / ``--test-per-class`` files of every class in file-name
order, so the result is deterministic and class-balanced. The JPEG bytes are stored unchanged in
one ``.npz`` (concatenated bytes + offsets + labels); nothing is re-encoded.

    python -m pipeline.tools.build_embedded_data --archive cifar10-jpg.tar.gz
"""

from __future__ import annotations

import argparse
import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np

from pipeline.artifacts import atomic_write_bytes

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "assets" / "cifar10_subset.npz"


def build(archive: Path, out: Path, train_per_class: int, test_per_class: int) -> dict[str, int]:
    """Select, pack and atomically write the subset; return the number of images per split."""
    wanted = {"train": train_per_class, "test": test_per_class}
    members: dict[tuple[str, int], list[tarfile.TarInfo]] = {}
    with tarfile.open(archive, "r:gz") as tar:
        infos = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")]
    for m in infos:
        _, split, cls, _ = m.name.split("/")
        members.setdefault((split, CLASSES.index(cls)), []).append(m)
    picked = {
        key: sorted(ms, key=lambda m: m.name)[: wanted[key[0]]] for key, ms in members.items()
    }
    arrays: dict[str, np.ndarray] = {}
    with tarfile.open(archive, "r:gz") as tar:
        blobs = {m.name: tar.extractfile(m).read() for ms in picked.values() for m in ms}
    for split in ("train", "test"):
        data, offsets, labels = [], [0], []
        for label in range(len(CLASSES)):
            ms = picked[(split, label)]
            if len(ms) < wanted[split]:
                raise SystemExit(f"{archive}: only {len(ms)} {split} images for {CLASSES[label]}")
            for m in ms:
                data.append(blobs[m.name])
                offsets.append(offsets[-1] + len(blobs[m.name]))
                labels.append(label)
        arrays[f"{split}_jpeg"] = np.frombuffer(b"".join(data), dtype=np.uint8)
        arrays[f"{split}_offsets"] = np.asarray(offsets, dtype=np.int64)
        arrays[f"{split}_labels"] = np.asarray(labels, dtype=np.int64)
    arrays["classes"] = np.asarray(CLASSES)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(out, buf.getvalue())
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, sha256 {digest})")
    return {s: len(arrays[f"{s}_labels"]) for s in ("train", "test")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, required=True, help="cifar10-jpg.tar.gz")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--train-per-class", type=int, default=650)
    parser.add_argument("--test-per-class", type=int, default=150)
    args = parser.parse_args()
    build(args.archive, args.out, args.train_per_class, args.test_per_class)


if __name__ == "__main__":
    main()
