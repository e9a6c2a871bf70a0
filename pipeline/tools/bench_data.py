"""Benchmark: image folders at photo scale: decode throughput, loader vs train step, peak memory.

    python -m pipeline.tools.bench_data --make /tmp/photos --from <cifar10-jpg> --count 20000
    python -m pipeline.tools.bench_data --root /tmp/photos

``--make`` builds a class-folder tree of ``--count`` training and ``--count // 10`` test images by
upscaling CIFAR-10 JPEGs to 256 px wide and 256-319 px high (JPEG quality 90). The benchmark prints,
measured in one run on this machine:

1. first-time decode: images/s of the parallel store build (written to disk) vs decoding in one
   process with PIL into one array (the loader this pipeline had before, without its cache write),
   on ``--decode-sample`` of the images;
2. the training loader (``data=photos``: random resized crops to 224 px, batch ``--batch``) vs ResNet-18
   train steps on the same batches: batches/s of both and their ratio (target >= 2: data is never
   the bottleneck);
3. peak resident memory of ``python -m pipeline stage=train data=photos model=resnet18`` on the whole
   tree (decoding it, one short epoch of ``--train-images`` images, evaluation on the test split),
   against the size of the decoded data set (target: under 3 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _upscale(job: tuple[str, str, int]) -> None:
    from PIL import Image

    src, dst, i = job
    with Image.open(src) as im:
        im.convert("RGB").resize((256, 256 + i % 64), Image.BILINEAR).save(dst, quality=90)


def make_tree(out: Path, cifar: Path, count: int) -> None:
    """``count`` train and ``count // 10`` test images, class-balanced, upscaled from CIFAR-10 JPEGs."""
    jobs = []
    for split, n in (("train", count), ("test", max(10, count // 10))):
        classes = sorted(d.name for d in (cifar / split).iterdir() if d.is_dir())
        per = n // len(classes)
        for c in classes:
            srcs = sorted((cifar / split / c).glob("*.jpg"))
            if len(srcs) < per:
                raise SystemExit(f"{cifar / split / c} has {len(srcs)} images, fewer than {per}")
            (out / split / c).mkdir(parents=True, exist_ok=True)
            jobs += [(str(s), str(out / split / c / s.name), i) for i, s in enumerate(srcs[:per])]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_upscale, jobs, chunksize=256))
    print(f"made {len(jobs)} images under {out}")


def _data_cfg(root: Path, *extra: str):
    from pipeline.tools import data_config

    return data_config("data=photos", f"data.root={root}", *extra)


def bench_decode(root: Path, sample: int) -> None:
    from pipeline import imagestore
    from pipeline.data import _list_imagefolder

    files, _, _ = _list_imagefolder(root / "train", None)
    step = max(1, len(files) // sample)
    files = files[::step][:sample]
    import numpy as np

    t0 = time.perf_counter()  # the loader before: one process decodes every image, then one array of all
    np.stack([imagestore.read_rgb(f, 224, "shorter", 0.875) for f in files])
    single = len(files) / (time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        imagestore.build(Path(tmp) / "s", files, {}, 224, "shorter", 0.875, os.cpu_count() or 1)
        parallel = len(files) / (time.perf_counter() - t0)
    print(f"decode, {len(files)} images: one process {single:.0f} img/s, store build with {os.cpu_count()} "
          f"processes {parallel:.0f} img/s, ratio {parallel / single:.2f}")


def bench_loader(root: Path, batch: int, steps: int, cache: Path) -> None:
    import torch
    import torch.nn.functional as F

    from pipeline.data import batches, load_splits
    from pipeline.models import build_model

    dc = _data_cfg(root, "data.val_fraction=0")
    t0 = time.perf_counter()
    s = load_splits(dc, 0, cache, progress=True)
    print(f"store of {len(s.train_y) + len(s.test_y)} images ready in {time.perf_counter() - t0:.1f} s")
    it = iter(batches(s.train_x, s.train_y, dc, batch, shuffle=True, augment=True, seed=0, channels_last=True))
    next(it)
    t0 = time.perf_counter()
    loaded = [next(it) for _ in range(steps)]
    loader = steps / (time.perf_counter() - t0)
    model = build_model({"name": "resnet18", "num_classes": 10, "image_size": 224,
                                                                        "small_input": False}).to(
        memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    times = []
    for xb, yb in [loaded[0]] + loaded[: max(2, steps // 4)]:  # one warm-up step first
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    train = 1 / statistics.median(times[1:])
    print(f"loader {loader:.2f} batches/s vs ResNet-18 train step {train:.2f} batches/s at batch {batch}, 224 px: "
          f"ratio {loader / train:.1f} (target >= 2)")


def bench_memory(root: Path, batch: int, train_images: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pipeline", "stage=train", "data=photos", f"data.root={root}",
               "model=resnet18", "model.small_input=false", "train.epochs=1", f"train.batch_size={batch}",
               f"data.train_subset={train_images}", "progress=false", f"paths.outputs={tmp}/o",
               f"hydra.run.dir={tmp}/run"]
        probe = ("import resource, subprocess, sys, time; t = time.time(); "
                 f"rc = subprocess.run({cmd!r}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode; "
                 "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.time() - t)")
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        rc, kb, secs = out.stdout.split()
        if rc != "0":
            raise SystemExit(f"stage=train failed (rc {rc}): {' '.join(cmd)}")
        meta = next(Path(tmp, "o", "cache").glob("imagefolder-*/meta.json"))
        info = json.loads(meta.read_text())
        decoded = info["n"] * 3 * 224 * 224 / 2**30
    print(f"stage=train on {info['n']} images ({decoded:.2f} GB decoded at 224 px; the store keeps 256 px): "
          f"peak RSS {int(kb) / 2**20:.2f} GB in {float(secs):.0f} s (target < 3 GB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--make", type=Path, help="build a photo-sized tree here from --from (CIFAR-10 JPEG folder)")
    ap.add_argument("--from", dest="src", type=Path)
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--root", type=Path, help="an image-folder tree to benchmark (default: --make's)")
    ap.add_argument("--decode-sample", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--train-images", type=int, default=256, help="training images of the memory run's epoch")
    args = ap.parse_args()
    if args.make:
        if not args.src:
            raise SystemExit("--make needs --from <cifar10-jpg folder>")
        make_tree(args.make, args.src, args.count)
    root = args.root or args.make
    if root is None:
        raise SystemExit("give --root <image folder> (or --make ... --from ...)")
    bench_memory(root, args.batch, args.train_images)  # first: no pools of this process among the children
    bench_decode(root, args.decode_sample)
    with tempfile.TemporaryDirectory() as cache:
        bench_loader(root, args.batch, args.steps, Path(cache))


if __name__ == "__main__":
    main()
