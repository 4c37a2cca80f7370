"""Augmentation: the paper's policy and nothing else, seeded per copy, training patches only."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from mammo_core.data import augment
from mammo_core.data.augment import AugmentParams, augment_patch, augment_split, draw_params, preview_grid
from mammo_core.storage import h5io
from mammo_core.storage.h5io import ChunkedH5Writer, DatasetSpec

SIZE = 32
SPLITS = [0, 1, 0, 2, 0, 1, 0, 0, 2, 0]  # 6 train, 2 val, 2 test


def _blob(size=SIZE, sigma=3.0, value=200.0) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    c = (size - 1) / 2
    return (value * np.exp(-((yy - c) ** 2 + (xx - c) ** 2) / (2 * sigma**2))).astype(np.uint8)


def make_patches_h5(path, splits=SPLITS):
    rng = np.random.default_rng(0)
    n = len(splits)
    images = rng.integers(0, 200, (n, 1, SIZE, SIZE)).astype(np.uint8)
    images[0, 0] = _blob()
    specs = [
        DatasetSpec("images", np.uint8, (1, SIZE, SIZE)), DatasetSpec("labels", np.int64),
        DatasetSpec("split", np.int8), DatasetSpec("patient_id", "S4"), DatasetSpec("source_id", "S12"),
        DatasetSpec("image_id", "S8"), DatasetSpec("box", np.int32, (4,)),
    ]
    attrs = {"class_names": ["NORMAL", "MASS", "CALC"], "size": SIZE,
             "split_codes": {"train": 0, "val": 1, "test": 2}, "counts": {}}
    with ChunkedH5Writer(path, specs, attrs=attrs) as writer:
        writer.append(images=images, labels=np.arange(n) % 3, split=np.array(splits),
                      patient_id=[f"P{i}" for i in range(n)], source_id=[f"src{i}" for i in range(n)],
                      image_id=[f"img{i}" for i in range(n)], box=np.tile([0, 0, SIZE, SIZE], (n, 1)))
    return images


def test_augmented_file_holds_train_originals_and_their_copies(tmp_path):
    source = make_patches_h5(tmp_path / "patches.h5")
    summary = augment_split(tmp_path / "patches.h5", tmp_path / "aug.h5", copies=3, seed=1, batch=4)
    data = h5io.read_datasets(tmp_path / "aug.h5")
    train_rows = [i for i, s in enumerate(SPLITS) if s == 0]
    assert summary.originals == 6 and summary.rows == 24 == len(data["labels"])
    assert data["images"].shape == (24, 1, SIZE, SIZE) and data["images"].dtype == np.uint8
    assert data["origin_index"].tolist() == [i for i in train_rows for _ in range(4)]
    assert data["copy"].tolist() == [0, 1, 2, 3] * 6
    assert set(data["split"].tolist()) == {0}
    assert set(h5io.decode_strings(data["source_id"])) == {f"src{i}" for i in train_rows}  # no val/test
    originals = data["copy"] == 0
    assert np.array_equal(data["images"][originals], source[train_rows])
    assert not np.array_equal(data["images"][data["copy"] == 1], source[train_rows])
    assert data["labels"].tolist() == [i % 3 for i in train_rows for _ in range(4)]
    assert np.all(data["aug_params"][originals] == 0)
    assert summary.per_class == {"NORMAL": 12, "MASS": 8, "CALC": 4}  # train labels 0, 2, 1, 0, 1, 0
    attrs = h5io.read_attrs(tmp_path / "aug.h5")
    assert attrs["copies"] == 3 and attrs["seed"] == 1 and attrs["class_names"] == ["NORMAL", "MASS", "CALC"]


def test_same_seed_same_pixels_whatever_the_batch_size(tmp_path):
    make_patches_h5(tmp_path / "patches.h5")
    for name, seed, batch in (("a", 5, 1), ("b", 5, 7), ("c", 6, 7)):
        augment_split(tmp_path / "patches.h5", tmp_path / f"{name}.h5", copies=2, seed=seed, batch=batch)
    a, b, c = (h5io.read_datasets(tmp_path / f"{n}.h5") for n in "abc")
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    assert not np.array_equal(a["images"], c["images"])
    # a single copy can be regenerated alone from (seed, index, copy)
    row = 5
    again = augment_patch(torch.from_numpy(h5io.read_datasets(tmp_path / "patches.h5", ["images"])["images"][
        int(a["origin_index"][row])]), draw_params(5, int(a["origin_index"][row]), int(a["copy"][row])))
    assert np.array_equal(again.numpy(), a["images"][row])


def test_drawn_parameters_stay_within_the_policy():
    params = np.array([draw_params(0, i, c).as_row() for i in range(400) for c in (1, 2)])
    assert np.abs(params[:, 2:]).max() <= 10.0
    assert np.abs(params[:, 2:]).max() > 9.0  # the whole range is used
    assert 0.4 < params[:, 0].mean() < 0.6 and 0.4 < params[:, 1].mean() < 0.6


def test_flips_move_a_single_pixel_exactly():
    patch = torch.zeros((1, SIZE, SIZE), dtype=torch.uint8)
    patch[0, 3, 5] = 255
    h = augment_patch(patch, AugmentParams(True, False, 0.0, 0.0, 0.0))
    v = augment_patch(patch, AugmentParams(False, True, 0.0, 0.0, 0.0))
    hv = augment_patch(patch, AugmentParams(True, True, 0.0, 0.0, 0.0))
    assert torch.nonzero(h[0]).tolist() == [[3, SIZE - 1 - 5]]
    assert torch.nonzero(v[0]).tolist() == [[SIZE - 1 - 3, 5]]
    assert torch.nonzero(hv[0]).tolist() == [[SIZE - 1 - 3, SIZE - 1 - 5]]


def test_rotation_turns_about_the_centre_without_translation():
    patch = torch.zeros((1, 65, 65), dtype=torch.uint8)
    patch[0, 32, 52] = 255  # 20 px right of the centre (32, 32)
    out = augment_patch(patch, AugmentParams(False, False, 10.0, 0.0, 0.0))[0].float()
    yy, xx = np.mgrid[:65, :65]
    w = np.where(np.hypot(yy - 32, xx - 32) < 26, out.numpy(), 0.0)  # the white corner fill aside
    cy, cx = (yy * w).sum() / w.sum(), (xx * w).sum() / w.sum()
    assert abs(np.hypot(cy - 32, cx - 32) - 20) < 1.0  # same distance from the centre
    assert abs(abs(np.degrees(np.arctan2(cy - 32, cx - 32))) - 10) < 2.0  # turned by 10 degrees


def test_white_margins_come_only_from_rotation_and_shear():
    flat = torch.full((1, SIZE, SIZE), 100, dtype=torch.uint8)
    flipped = augment_patch(flat, AugmentParams(True, True, 0.0, 0.0, 0.0))
    assert torch.equal(flipped, flat)  # no crop, no translation, no fill from flips
    for params in (AugmentParams(False, False, 10.0, 0.0, 0.0), AugmentParams(False, False, 0.0, -10.0, 0.0),
                   AugmentParams(False, False, 0.0, 0.0, 10.0)):
        out = augment_patch(flat, params)[0]
        assert out.max() == 255 and out.min() >= 100  # margins white, never black
        assert torch.all(out[8:24, 8:24] == 100)  # the middle keeps its pixels: no translation or scale


@pytest.mark.parametrize("copy", range(1, 9))
def test_centred_symmetric_blob_stays_centred(copy):
    params = draw_params(11, 0, copy)
    out = augment_patch(torch.from_numpy(_blob()[None]), params)[0].numpy().astype(np.float64)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    c = (SIZE - 1) / 2
    inner = np.hypot(yy - c, xx - c) < 11  # the white fill lives near the corners only
    w = np.where(inner, out, 0.0)
    cy, cx = (yy * w).sum() / w.sum(), (xx * w).sum() / w.sum()
    assert abs(cy - c) < 1.0 and abs(cx - c) < 1.0, params


def test_policy_transforms_are_only_the_papers():
    policy = augment.paper_policy()
    kinds = [type(t) for t in policy.transforms]
    assert kinds == [v2.RandomHorizontalFlip, v2.RandomVerticalFlip, v2.RandomRotation, v2.RandomAffine]
    rotation, affine = policy.transforms[2], policy.transforms[3]
    assert list(rotation.degrees) == [-10.0, 10.0]
    assert list(affine.degrees) == [0.0, 0.0] and affine.translate is None and affine.scale is None
    assert list(affine.shear) == [-10.0, 10.0, -10.0, 10.0]
    out = policy(torch.full((1, SIZE, SIZE), 100, dtype=torch.uint8))
    assert out.shape == (1, SIZE, SIZE) and out.dtype == torch.uint8 and out.min() >= 100


def test_preview_grid_shows_originals_next_to_their_copies(tmp_path):
    make_patches_h5(tmp_path / "patches.h5")
    augment_split(tmp_path / "patches.h5", tmp_path / "aug.h5", copies=2, seed=0)
    png = preview_grid(tmp_path / "aug.h5", tmp_path / "fig" / "preview.png", n=4)
    with Image.open(png) as im:
        grid = np.asarray(im)
    scale = 96 // SIZE
    assert grid.shape == ((4 * (SIZE + 2) + 2) * scale, (3 * (SIZE + 2) + 2) * scale)
    first = grid[2 * scale:(2 + SIZE) * scale:scale, 2 * scale:(2 + SIZE) * scale:scale]
    assert np.array_equal(first, h5io.read_datasets(tmp_path / "aug.h5", ["images"])["images"][0, 0])
    assert sorted(p.name for p in png.parent.iterdir()) == ["preview.png"]


def test_file_without_training_patches_is_an_error_and_leaves_no_file(tmp_path):
    make_patches_h5(tmp_path / "patches.h5", splits=[1, 2, 1])
    with pytest.raises(ValueError, match="no training patch"):
        augment_split(tmp_path / "patches.h5", tmp_path / "aug.h5", copies=1, seed=0)
    assert not (tmp_path / "aug.h5").exists()


def test_file_that_is_not_a_patches_file_is_named_in_the_error(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as fh:
        fh["images"] = np.zeros((2, 1, 4, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"other\.h5: missing dataset"):
        augment_split(tmp_path / "other.h5", tmp_path / "aug.h5", copies=1, seed=0)
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="not a readable HDF5 file"):
        augment_split(tmp_path / "junk.h5", tmp_path / "aug.h5", copies=1, seed=0)
