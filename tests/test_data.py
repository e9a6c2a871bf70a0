"""Data: tensor augmentation, splits, image folders (RGB/grayscale/any size) and their errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import (
    Batches,
    DataConfig,
    Images,
    batches,
    cutout,
    load_splits,
    random_crop_flip,
    random_resized_crop_flip,
)
from pipeline.errors import PipelineError


def _cfg(**kw) -> DataConfig:
    base = dict(source="embedded", root=None, download=False, image_size=32, num_classes=10,
                val_fraction=0.1, mean=[0.5] * 3, std=[0.25] * 3, augment=True, crop_padding=4, train_subset=None,
                resize="squash", crop_fraction=0.875, train_crop="pad", rrc_scale=[0.08, 1.0], cutout=0,
                decode_workers=1, max_cache_gb=100.0, fingerprint="stat")
    base.update(kw)
    return DataConfig(**base)


def test_crop_flip_keeps_pixels_and_shape():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.int32).view(2, 3, 8, 8).to(torch.uint8)
    out = random_crop_flip(x, 0, torch.Generator().manual_seed(0))  # no padding: only flips
    for i in range(2):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
    out = random_crop_flip(x, 2, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8


def test_cutout_blanks_one_clipped_square_per_image_and_only_when_augmenting():
    x = torch.ones(64, 3, 32, 32)
    out = cutout(x, 16, torch.Generator().manual_seed(0))
    blanked = (out == 0).all(1).sum((1, 2))  # pixels zeroed in all channels, per image
    assert (blanked <= 256).all() and (blanked >= 64).all()  # a corner centre keeps a quarter of the square
    assert (blanked == 256).any() and (blanked < 256).any()  # inside, and clipped at the border
    assert torch.equal(out, cutout(x, 16, torch.Generator().manual_seed(0)))  # seeded
    y = torch.zeros(8, dtype=torch.long)
    xb, _ = next(iter(Batches(torch.full((8, 3, 8, 8), 200, dtype=torch.uint8), y, 8, [0.0] * 3, [1.0] * 3,
                              augment=False, cutout=4)))
    assert (xb != 0).all()  # evaluation batches are never cut
    assert "cutout" in _cfg(cutout=32).check()[0]


def test_embedded_splits_are_balanced_and_disjoint():
    s = load_splits(_cfg(), seed=0)
    assert len(s.test_y) == 1500 and s.train_x.shape[1:] == (3, 32, 32)
    assert torch.bincount(s.val_y).tolist() == [65] * 10
    assert len(s.train_y) + len(s.val_y) == 6500


def test_batches_shard_across_ranks_without_overlap():
    x = torch.zeros(10, 3, 4, 4, dtype=torch.uint8)
    y = torch.arange(10)
    seen = []
    for rank in range(2):
        b = Batches(x, y, 2, [0.5] * 3, [0.5] * 3, shuffle=True, seed=1, rank=rank, world_size=2)
        seen += [int(v) for _, yb in b for v in yb]
    assert sorted(seen) == list(range(10))


def _write_tree(root, sizes, mode="RGB"):
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i, size in enumerate(sizes):
                arr = (np.random.default_rng(i).random((size, size, 3 if mode == "RGB" else 1)) * 255).astype(np.uint8)
                Image.fromarray(arr.squeeze()).convert(mode).save(d / f"{i}.png")


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_imagefolder_any_size_and_grayscale(tmp_path, mode):
    _write_tree(tmp_path / "data", [20, 48, 33, 40, 64], mode)
    cfg = _cfg(source="imagefolder", root=str(tmp_path / "data"), num_classes=2, image_size=16,
               val_fraction=0.2)
    s = load_splits(cfg, seed=0, cache_dir=tmp_path / "cache")
    assert s.train_x.shape[1:] == (3, 16, 16) and s.classes == ["cat", "dog"]
    assert len(s.test_y) == 10 and len(list((tmp_path / "cache").glob("imagefolder-*/meta.json"))) == 1


def test_imagefolder_errors(tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        load_splits(_cfg(source="imagefolder", root=str(tmp_path / "missing")), 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="train/ and test/"):
        load_splits(_cfg(source="imagefolder", root=str(tmp_path / "empty")), 0)
    _write_tree(tmp_path / "d", [8])
    for f in (tmp_path / "d/train/dog").iterdir():
        f.unlink()
    with pytest.raises(PipelineError, match=r"class folder .*dog has no images"):
        load_splits(_cfg(source="imagefolder", root=str(tmp_path / "d"), num_classes=2), 0)
    (tmp_path / "d/train/dog/broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(PipelineError, match=r"cannot read image .*broken.jpg"):
        load_splits(_cfg(source="imagefolder", root=str(tmp_path / "d"), num_classes=2), 0)


def test_wrong_num_classes_says_which_value(tmp_path):
    _write_tree(tmp_path / "d", [8, 8])
    with pytest.raises(PipelineError, match="data.num_classes=2"):
        load_splits(_cfg(source="imagefolder", root=str(tmp_path / "d"), num_classes=10), 0)


def test_parallel_decode_store_equals_one_process_and_reads_by_row(tmp_path):
    _write_tree(tmp_path / "data", [20, 48, 33, 40, 64, 17, 90, 25])
    base = dict(source="imagefolder", root=str(tmp_path / "data"), num_classes=2, image_size=16, val_fraction=0.25)
    one = load_splits(_cfg(**base, decode_workers=1), 0, tmp_path / "c1")
    two = load_splits(_cfg(**base, decode_workers=2), 0, tmp_path / "c2")
    for a, b in ((one.train_x, two.train_x), (one.val_x, two.val_x), (one.test_x, two.test_x)):
        assert torch.equal(a[:], b[:])
    assert isinstance(one.train_x, Images)
    assert not list((tmp_path / "c2").glob("*.partial-*"))  # the finished store was renamed into place
    idx = torch.tensor([3, 0, 2])
    assert torch.equal(one.train_x[idx], torch.stack([one.train_x[3], one.train_x[0], one.train_x[2]]))
    assert one.train_x.nbytes == len(one.train_x) * 3 * 16 * 16


def test_random_resized_crop_keeps_the_whole_image_at_full_scale_and_is_seeded():
    x = torch.randint(0, 255, (6, 3, 20, 20), dtype=torch.uint8)
    out = random_resized_crop_flip(x, 20, (1.0, 1.0), torch.Generator().manual_seed(0))
    for i in range(6):  # no aspect ratio but 1 fits the whole area: the whole image, maybe flipped
        assert torch.equal(out[i], x[i].float()) or torch.equal(out[i], x[i].flip(-1).float())
    a = random_resized_crop_flip(x, 8, (0.08, 1.0), torch.Generator().manual_seed(1))
    b = random_resized_crop_flip(x, 8, (0.08, 1.0), torch.Generator().manual_seed(1))
    assert a.shape == (6, 3, 8, 8) and torch.equal(a, b) and a.min() >= 0 and a.max() <= 255


def test_resized_crop_batches_draw_from_the_stored_square(tmp_path):
    _write_tree(tmp_path / "data", [40, 64, 33])
    cfg = _cfg(source="imagefolder", root=str(tmp_path / "data"), num_classes=2, image_size=16, val_fraction=0.0,
               resize="shorter", crop_fraction=0.5, train_crop="resized")
    s = load_splits(cfg, 0, tmp_path / "cache")
    assert s.train_x[:].shape[-1] == 16 and s.train_x.full([0]).shape[-1] == 32
    xb, yb = next(iter(batches(s.train_x, s.train_y, cfg, 4, shuffle=True, augment=True, seed=0)))
    assert xb.shape == (4, 3, 16, 16) and xb.dtype == torch.float32 and len(yb) == 4


def test_loading_reuses_the_fingerprint_scan_of_an_image_folder(tmp_path, monkeypatch):
    """An image folder is listed and stat-ed once per run: fingerprint scans, loading the splits reuses it."""
    from pipeline import data as data_mod

    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / split / cls / f"{i}.png")
    cfg = _cfg(source="imagefolder", root=str(tmp_path), num_classes=2, val_fraction=0.0)
    before = data_mod.fingerprint(cfg)
    monkeypatch.setattr(data_mod, "_list_imagefolder", lambda *a: pytest.fail("listed the folder again"))
    assert len(load_splits(cfg, seed=0, cache_dir=tmp_path / "cache").train_y) == 6
    monkeypatch.undo()
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "a" / "3.png")
    assert data_mod.fingerprint(cfg) != before  # a new scan every time the key is computed
