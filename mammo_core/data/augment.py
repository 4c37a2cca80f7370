"""The paper's augmentation policy, and the materialised augmented training set ``train_augmented.h5``.

Policy (DESIGN.md section 7): random horizontal and vertical flips, a random rotation within +-10
degrees and a random shear within +-10 degrees (on both axes), margins filled white; nothing else: no
crop, no translation, no scale. :func:`paper_policy` is the policy as torchvision ``v2`` transforms (for
on-line use); :func:`augment_patch` applies the very same functional ops with explicit parameters.

Why explicit parameters: the augmented set is an artifact that other stages cache (the trunk cache of the
train stage relies on the same pixels every epoch). Each copy's parameters come from a generator seeded by
(seed, patch index in ``patches.h5``, copy number), never from the global torch RNG, so the output is the
same whatever the batch size or the number of workers, and any single copy can be regenerated alone.

Only training patches are read; validation and test patches never enter the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from mammo_core.data.patches import SPLIT_CODES
from mammo_core.runtime.intra_op_threads import torch_threads
from mammo_core.storage import h5io
from mammo_core.storage.durable import atomic_path

MAX_ROTATION_DEG = 10.0
MAX_SHEAR_DEG = 10.0
WHITE_UINT8 = 255
PATCH_DATASETS = ("images", "labels", "split", "patient_id", "source_id", "image_id", "box")
PARAM_COLUMNS = ("hflip", "vflip", "rotation_deg", "shear_x_deg", "shear_y_deg")
_INTERPOLATION = InterpolationMode.BILINEAR


def paper_policy(fill: float = WHITE_UINT8) -> v2.Compose:
    """The policy as random torchvision transforms, in the order :func:`augment_patch` applies them."""
    return v2.Compose([
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomVerticalFlip(p=0.5),
        v2.RandomRotation(degrees=MAX_ROTATION_DEG, interpolation=_INTERPOLATION, fill=fill),
        v2.RandomAffine(degrees=0.0, translate=None, scale=None,
                        shear=(-MAX_SHEAR_DEG, MAX_SHEAR_DEG, -MAX_SHEAR_DEG, MAX_SHEAR_DEG),
                        interpolation=_INTERPOLATION, fill=fill),
    ])


@dataclass(frozen=True)
class AugmentParams:
    hflip: bool
    vflip: bool
    rotation_deg: float
    shear_x_deg: float
    shear_y_deg: float

    def as_row(self) -> list[float]:
        return [float(self.hflip), float(self.vflip), self.rotation_deg, self.shear_x_deg, self.shear_y_deg]


IDENTITY = AugmentParams(False, False, 0.0, 0.0, 0.0)


def draw_params(seed: int, patch_index: int, copy: int) -> AugmentParams:
    """The parameters of one copy, from its own generator (independent of batching and workers)."""
    rng = np.random.default_rng([seed, patch_index, copy])
    flips = rng.random(2) < 0.5
    rot, shx, shy = rng.uniform(-1.0, 1.0, 3) * [MAX_ROTATION_DEG, MAX_SHEAR_DEG, MAX_SHEAR_DEG]
    return AugmentParams(bool(flips[0]), bool(flips[1]), float(rot), float(shx), float(shy))


def augment_patch(patch: torch.Tensor, params: AugmentParams, fill: float = WHITE_UINT8) -> torch.Tensor:
    """Apply the policy with fixed ``params`` to a (C, H, W) tensor; same ops as :func:`paper_policy`."""
    out = patch
    if params.hflip:
        out = F.horizontal_flip(out)
    if params.vflip:
        out = F.vertical_flip(out)
    if params.rotation_deg:
        out = F.rotate(out, params.rotation_deg, interpolation=_INTERPOLATION, fill=[fill])
    if params.shear_x_deg or params.shear_y_deg:
        out = F.affine(out, angle=0.0, translate=[0.0, 0.0], scale=1.0,
                       shear=[params.shear_x_deg, params.shear_y_deg], interpolation=_INTERPOLATION, fill=[fill])
    return out


@dataclass
class AugmentSummary:
    path: Path
    originals: int
    rows: int
    copies: int
    seed: int
    per_class: dict[str, int]  # rows per class name (originals and copies)


def _check_patches_file(path: Path) -> tuple[int, int, dict[str, np.dtype]]:
    """Rows, patch size and dtypes of ``patches.h5``; a clear error when it is not one."""
    try:
        fh = h5io.open_for_reading(path)
    except (OSError, FileNotFoundError) as exc:
        raise ValueError(f"{path}: not a readable HDF5 file ({exc})") from None
    with fh:
        missing = [n for n in PATCH_DATASETS if n not in fh]
        if missing:
            raise ValueError(f"{path.name}: missing dataset(s) {missing}; is it a patches.h5?")
        lengths = {n: fh[n].shape[0] for n in PATCH_DATASETS}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"{path.name}: datasets have different lengths {lengths}")
        images = fh["images"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 1 or images.shape[2] != images.shape[3]:
            raise ValueError(f"{path.name}: /images must be (N, 1, S, S) uint8, is {images.shape} {images.dtype}")
        return lengths["images"], int(images.shape[2]), {n: fh[n].dtype for n in PATCH_DATASETS}


def augment_split(
    patches_h5: str | Path,
    out_path: str | Path,
    *,
    copies: int,
    seed: int,
    batch: int = 256,
    compression: str | None = "gzip",
) -> AugmentSummary:
    """Write the training patches plus ``copies`` augmented copies of each to ``out_path``.

    Rows are grouped per original (copy 0 = the original, then copies 1..``copies``), in ``patches.h5``
    order. Extra datasets: ``/origin_index`` (row in ``patches.h5``), ``/copy`` and ``/aug_params``
    (``PARAM_COLUMNS``; zeros for originals).
    """
    if copies < 0 or batch < 1:
        raise ValueError("copies must be >= 0 and batch >= 1")
    patches_h5 = Path(patches_h5)
    total, size, dtypes = _check_patches_file(patches_h5)
    attrs = h5io.read_attrs(patches_h5)
    class_names = list(attrs.get("class_names", []))
    specs = [
        h5io.DatasetSpec("images", np.uint8, (1, size, size)),
        h5io.DatasetSpec("labels", np.int64),
        h5io.DatasetSpec("split", np.int8),
        h5io.DatasetSpec("patient_id", dtypes["patient_id"]),
        h5io.DatasetSpec("source_id", dtypes["source_id"]),
        h5io.DatasetSpec("image_id", dtypes["image_id"]),
        h5io.DatasetSpec("box", np.int32, (4,)),
        h5io.DatasetSpec("origin_index", np.int64),
        h5io.DatasetSpec("copy", np.int16),
        h5io.DatasetSpec("aug_params", np.float32, (len(PARAM_COLUMNS),)),
    ]
    out_attrs = {k: v for k, v in attrs.items() if k not in ("counts", "normals_without_spot", "skipped")}
    out_attrs.update(
        copies=copies, seed=seed, aug_param_columns=list(PARAM_COLUMNS), source_rows=total,
        policy={"hflip_p": 0.5, "vflip_p": 0.5, "rotation_deg": MAX_ROTATION_DEG, "shear_deg": MAX_SHEAR_DEG,
                "shear_axes": "x and y", "fill": "white (255)", "interpolation": "bilinear",
                "translate": None, "scale": None, "crop": None},
    )
    per_label = np.zeros(max(len(class_names), 1), dtype=np.int64)
    originals = 0
    train = SPLIT_CODES["train"]
    # one intra-op thread: a 64-224 px patch is far too small to split, and on a busy 2-core machine torch's
    # thread hand-offs made each op 10-50x slower than running it on one thread
    with torch_threads(1), h5io.ChunkedH5Writer(out_path, specs, attrs=out_attrs, compression=compression) as out:
        for start, block in h5io.iter_blocks(patches_h5, PATCH_DATASETS, batch):
            rows = np.flatnonzero(block["split"] == train)
            if rows.size == 0:
                continue
            originals += rows.size
            columns: dict[str, list] = {spec.name: [] for spec in specs}
            for r in rows:
                index = start + int(r)
                pixels = torch.from_numpy(block["images"][r])
                for c in range(copies + 1):
                    params = IDENTITY if c == 0 else draw_params(seed, index, c)
                    image = pixels if c == 0 else augment_patch(pixels, params)
                    columns["images"].append(image.numpy())
                    for name in ("labels", "split", "patient_id", "source_id", "image_id", "box"):
                        columns[name].append(block[name][r])
                    columns["origin_index"].append(index)
                    columns["copy"].append(c)
                    columns["aug_params"].append(params.as_row())
            labels = np.asarray(columns["labels"], dtype=np.int64)
            if labels.size and labels.max() >= per_label.size:
                per_label = np.pad(per_label, (0, int(labels.max()) + 1 - per_label.size))
            per_label += np.bincount(labels, minlength=per_label.size)
            out.append(**{name: np.stack(v) if name in ("images", "box", "aug_params") else v
                          for name, v in columns.items()})
        if originals == 0:
            raise ValueError(f"{patches_h5.name} holds no training patch; nothing to augment")
    names = class_names or [str(i) for i in range(per_label.size)]
    return AugmentSummary(path=Path(out_path), originals=originals, rows=originals * (copies + 1),
                          copies=copies, seed=seed,
                          per_class={names[i]: int(n) for i, n in enumerate(per_label) if i < len(names)})


def preview_grid(h5_path: str | Path, png_path: str | Path, n: int = 16, max_copies: int = 4) -> Path:
    """A PNG: one row per original (spread over the file), the original first, then its copies."""
    with h5io.open_for_reading(h5_path) as fh:
        origin = fh["origin_index"][:]
        copy = fh["copy"][:]
        starts = np.flatnonzero(copy == 0)
        if starts.size == 0:
            raise ValueError(f"{Path(h5_path).name} holds no original patch to preview")
        chosen = starts[np.unique(np.linspace(0, starts.size - 1, min(n, starts.size)).round().astype(int))]
        rows = []
        for row_start in chosen:
            same = np.flatnonzero(origin == origin[row_start])
            same = same[np.argsort(copy[same], kind="stable")][: max_copies + 1]
            rows.append([fh["images"][int(i), 0] for i in same])
    size = rows[0][0].shape[0]
    gap = 2
    scale = max(1, 96 // size)
    columns = max(len(r) for r in rows)
    grid = np.full((len(rows) * (size + gap) + gap, columns * (size + gap) + gap), 128, dtype=np.uint8)
    for i, tiles in enumerate(rows):
        for j, tile in enumerate(tiles):
            y, x = gap + i * (size + gap), gap + j * (size + gap)
            grid[y:y + size, x:x + size] = tile
    picture = Image.fromarray(grid)
    if scale > 1:
        picture = picture.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    png_path = Path(png_path)
    with atomic_path(png_path) as tmp:
        picture.save(tmp, format="PNG")
    return png_path
