"""Classify images with an exported model, using only what the bundle holds (no Hydra config).

    python -m pipeline.predict outputs/runs/<run>/deploy photo.jpg            # top-5 with class names
    python -m pipeline.predict outputs/runs/<run>/deploy images/ --csv out.csv  # a folder, batched
    python -m pipeline.predict outputs/runs/<run>/deploy a.jpg b.png           # several files or folders
    python -m pipeline.predict model.onnx img.png --labels cat,dog --mean 0.5,0.5,0.5 --std 0.25,0.25,0.25

The model's ``metadata_props`` (written by the pipeline's bundle) give class names, mean, std and
input size; ``--labels/--mean/--std/--size`` replace them (and are needed for a bare ONNX file).
Images are converted to RGB and brought to the model's input size the way the pipeline's image-folder
loader did for this model (its ``resize`` metadata: squashed, or shorter side + center crop), so
predictions equal what validate measured.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline import deploy
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


class Predictor:
    """One inference session plus the preprocessing its metadata describes. The session runs on the runtime the
    bundle records for the model, with its settings (OpenVINO's inference precision, threads), else on ONNX
    Runtime; ``runtime`` and ``threads`` replace the bundle's."""

    def __init__(self, model: Path | str, threads: int | None = None, labels: list[str] | None = None,
                 mean: list[float] | None = None, std: list[float] | None = None, size: int | None = None,
                 providers: list[str] | None = None, runtime: str | None = None):
        from pipeline import inference

        self.path = deploy.resolve_model(Path(model))
        recorded = deploy.bundle_runtime(self.path) or {}
        self.runtime = runtime or recorded.get("name") or inference.DEFAULT
        options = (recorded.get("options") or {}) if self.runtime == recorded.get("name") else {}
        if threads is None:
            threads = int(recorded.get("threads") or 0)
        try:
            rt = inference.get(self.runtime)
        except PipelineError as e:
            if runtime is None and self.runtime != inference.DEFAULT:
                raise PipelineError(f"{e}; or run the bundle on ONNX Runtime: --runtime onnxruntime") from None
            raise
        self.session = rt.session(self.path, threads, "all", providers, options=options)
        meta = self.session.metadata
        self.uint8 = self.session.input_dtype == "uint8"

        def need(value, key: str, flag: str):
            if value is not None:
                return value
            if key in meta:
                return json.loads(meta[key])
            raise PipelineError(f"{self.path} has no {key!r} in its metadata (not a pipeline bundle model); give "
                                f"{flag} (a bare ONNX file needs --labels, --mean and --std)")

        self.classes = [str(c) for c in need(labels, deploy.META_CLASSES, "--labels a,b,c")]
        how = json.loads(meta[deploy.META_RESIZE]) if deploy.META_RESIZE in meta else {}
        self.resize, self.crop_fraction = how.get("mode", "squash"), float(how.get("crop_fraction", 1.0))
        shape = self.session.input_shape
        spatial = shape[1] if self.uint8 else shape[2]
        self.size = int(size or meta.get(deploy.META_SIZE, 0) or
                        (spatial if isinstance(spatial, int) else 0))
        if not self.size:
            raise PipelineError(f"{self.path} does not say its input size; give --size N")
        if not self.uint8:
            m = np.asarray(need(mean, deploy.META_MEAN, "--mean r,g,b"), np.float32).reshape(1, 3, 1, 1)
            s = np.asarray(need(std, deploy.META_STD, "--std r,g,b"), np.float32).reshape(1, 3, 1, 1)
            self._m, self._s = m * np.float32(255), s * np.float32(255)
        n_out = self.session.output_shape[-1]
        if isinstance(n_out, int) and n_out != len(self.classes):
            raise PipelineError(f"{self.path} predicts {n_out} classes but {len(self.classes)} labels were given")

    def load(self, path: Path) -> tuple[np.ndarray, str | None]:
        """uint8 HWC RGB pixels at the model's size, and a note when the image had to be resized."""
        from PIL import Image, UnidentifiedImageError

        from pipeline.imagestore import center_crop, prepare, to_rgb

        try:
            with Image.open(path) as im:
                im = to_rgb(im)  # 16-bit gray scaled to 8 bits, not clipped
                note = None
                if im.size != (self.size, self.size):
                    how = "resized" if self.resize == "squash" else "resized and center-cropped"
                    note = f"{how} from {im.size[0]}x{im.size[1]} to {self.size}x{self.size}"
                chw = np.asarray(prepare(im, self.size, self.resize, self.crop_fraction), np.uint8).transpose(2, 0, 1)
                return np.ascontiguousarray(center_crop(chw, self.size).transpose(1, 2, 0)), note
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise PipelineError(f"cannot read image {path} ({type(e).__name__}: {e})") from None

    def to_input(self, pixels: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> what the model takes: the same uint8, or normalised NCHW float32."""
        if self.uint8:
            return np.ascontiguousarray(pixels)
        x = pixels.transpose(0, 3, 1, 2).astype(np.float32)
        return np.ascontiguousarray((x - self._m) / self._s)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(x)

    def classify(self, x: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
        """Top-k (class name, probability) per image of a model input batch."""
        z = self.logits(x)
        k = min(k, z.shape[1])
        if z.shape[1] <= 64:  # few classes: plain Python beats numpy's per-call overhead at batch 1
            out = []
            for row in z.tolist():
                top = max(row)
                e = [math.exp(v - top) for v in row]
                total = sum(e)
                idx = sorted(range(len(row)), key=row.__getitem__, reverse=True)[:k]
                out.append([(self.classes[j], e[j] / total) for j in idx])
            return out
        top = np.argpartition(-z, k - 1, axis=1)[:, :k]
        e = np.exp(z - z.max(1, keepdims=True))
        p = e / e.sum(1, keepdims=True)
        out = []
        for i in range(len(z)):
            idx = top[i][np.argsort(-z[i, top[i]])]
            out.append([(self.classes[j], float(p[i, j])) for j in idx])
        return out


def iter_images(path: Path) -> Iterator[Path]:
    """The file itself, or every image file below a folder (sorted); other files are skipped with a note."""
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise PipelineError(f"{path} is not an image file ({', '.join(sorted(IMAGE_SUFFIXES))})")
        yield path
        return
    if not path.is_dir():
        raise PipelineError(f"{path} does not exist; give an image file or a folder of images")
    files = sorted(p for p in path.rglob("*") if p.is_file())
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if len(images) < len(files):
        print(f"note: skipped {len(files) - len(images)} files that are not images in {path}", file=sys.stderr)
    if not images:
        raise PipelineError(f"{path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    yield from images


def _floats(text: str | None) -> list[float] | None:
    return [float(v) for v in text.split(",")] if text else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.predict", description=__doc__.splitlines()[0])
    ap.add_argument("model", help="bundle folder (outputs/runs/<run>/deploy) or .onnx file")
    ap.add_argument("images", nargs="+", help="image files or folders of images (a shell glob works)")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--csv", help="also write the predictions to this CSV file")
    ap.add_argument("--batch", type=int, default=32, help="images per inference call")
    ap.add_argument("--threads", type=int, help="inference threads (0: one per core; default: the bundle's setting)")
    ap.add_argument("--runtime", help="inference runtime (default: the one the bundle records, else onnxruntime): "
                    "onnxruntime or openvino")
    ap.add_argument("--labels", help="comma-separated class names (replaces the model's metadata)")
    ap.add_argument("--mean", help="r,g,b normalisation mean in [0, 1]")
    ap.add_argument("--std", help="r,g,b normalisation std in [0, 1]")
    ap.add_argument("--size", type=int, help="input height = width in pixels")
    args = ap.parse_args(argv)
    try:
        if args.top_k < 1 or args.batch < 1:
            raise PipelineError("--top-k and --batch must be >= 1")
        if args.csv:  # checked before any image is classified
            out = Path(args.csv)
            if out.is_dir():
                raise PipelineError(f"--csv {args.csv} is a folder; give a file name, e.g. --csv {out / 'out.csv'}")
            if not out.absolute().parent.is_dir():
                raise PipelineError(f"--csv {args.csv}: the folder {out.absolute().parent} does not exist; create it "
                                    "or give a file in an existing folder")
        pred = Predictor(args.model, args.threads, args.labels.split(",") if args.labels else None,
                         _floats(args.mean), _floats(args.std), args.size, runtime=args.runtime)
        top_k = min(args.top_k, len(pred.classes))
        if top_k < args.top_k:
            print(f"note: --top-k {args.top_k} is more than the model's {len(pred.classes)} classes; showing "
                  f"{top_k}", file=sys.stderr)
        single = len(args.images) == 1 and Path(args.images[0]).is_file()
        rows, failed, batch, names = [], 0, [], []

        def flush() -> None:
            if batch:
                for name, top in zip(names, pred.classify(pred.to_input(np.stack(batch)), top_k), strict=True):
                    print(f"{name}: " + ", ".join(f"{c} {p:.3f}" for c, p in top))
                    rows.append([name, *[v for c, p in top for v in (c, f"{p:.6f}")]])
                batch.clear()
                names.clear()

        for path in (p for arg in args.images for p in iter_images(Path(arg))):
            try:
                pixels, note = pred.load(path)
            except PipelineError as e:
                if single:
                    raise
                print(f"note: skipped {e}", file=sys.stderr)
                failed += 1
                continue
            if note:
                print(f"note: {path.name}: {note}", file=sys.stderr)
            batch.append(pixels)
            names.append(str(path))
            if len(batch) == args.batch:
                flush()
        flush()
        if args.csv:
            try:
                with open(args.csv, "w", newline="") as f:
                    w = csv.writer(f)
                    w.writerow(["file", *[h for i in range(1, top_k + 1) for h in (f"class{i}", f"prob{i}")]])
                    w.writerows(rows)
            except OSError as e:
                raise PipelineError(f"--csv {args.csv} cannot be written ({e.strerror or e}); give a writable "
                                    "place") from None
        if not rows:
            raise PipelineError(f"no image in {' '.join(args.images)} could be read")
        if failed:
            print(f"note: {failed} image{'s' * (failed > 1)} could not be read and {'were' if failed > 1 else 'was'} "
                  "skipped", file=sys.stderr)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
