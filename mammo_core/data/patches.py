"""Patches: ROI-centred crops of every lesion and NORMAL crops of breast tissue, into ``patches.h5``.

Input is the curate stage's folder (``images.parquet``, ``lesions.parquet``, ``cache/``); all geometry
happens at cache resolution (full-resolution boxes times the image's scale).

- Lesion patch: a square around the lesion's (union) box, enlarged by ``context`` of the box's long side
  on every side and to at least ``min_size_px``, centred on the box, then placed by the crop policy below
  and resized to ``size`` x ``size`` with antialiasing.
- NORMAL patch: a square of breast tissue (at least ``min_breast_fraction`` of its in-image part inside the
  breast mask, a threshold on the smoothed image keeping its largest region) that overlaps no enlarged
  lesion box or lesion crop of its image and no other NORMAL patch of it, with a side drawn from the lesion
  crop sides of the TRAINING split (so crop scale is no cue for the class, and no NORMAL patch of val/test
  depends on the lesions of val/test). Positions are drawn uniformly among all valid ones, so "no valid
  spot" is exact, not the result of a few failed tries; it is counted, not an error. An image whose
  curation lost some lesions gets no NORMAL patches: its unlisted lesions could sit anywhere.

Crop policy (one rule for both kinds, :func:`fit_crop_box`): a crop that fits the image along an axis is
shifted inside it along that axis (never padded); a crop longer than the image along an axis is centred on
the image along it, the excess padded with 0 equally on both sides. Why: zero-padding lesion crops where
they left the image while NORMAL crops had to lie inside it made black margins announce "lesion" (4.7 % of
lesion patches against 0 % of NORMAL ones had more than 5 % padded pixels on the default run), a shortcut
a CNN learns for free. A shifted lesion is off-centre but whole in its patch. ``padded_fraction`` (the
share of each crop outside its image) is stored per patch, and the shortcut probe
(:mod:`mammo_core.evaluation.shortcut_probe`) checks that no such trivial statistic tells the kinds apart.

Intensity (why 8 bits): patches are stored as uint8, float conversion happens at training time. The
default ``breast_window`` maps each image's [minimum, maximum inside the breast] linearly onto [0, 255],
so 12-bit and 16-bit sources end up alike and bright film labels outside the breast do not compress the
tissue's range; the mapping is per image, never per patch, so lesion contrast against its surroundings
is kept. ``global`` divides by 257 (16-bit) or keeps 8-bit values as they are.

Determinism: every random draw of an image comes from a generator seeded by (seed, image id), so the
output does not depend on image order, worker count or which other images failed.
"""

from __future__ import annotations

import json
import math
import zlib
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from PIL import Image
from scipy import ndimage
from skimage.filters import threshold_otsu

from mammo_core.data import labels
from mammo_core.storage import stage_files
from mammo_core.storage.h5io import ChunkedH5Writer, DatasetSpec, string_dtype

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
Intensity = Literal["breast_window", "global"]
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive ends)


@dataclass(frozen=True)
class PatchSettings:
    size: int = 64
    context: float = 0.25
    min_size_px: int = 32
    normals_per_image: int = 2
    seed: int = 0
    breast_threshold: float | None = None  # None: Otsu; else a fraction of the smoothed image's range
    min_breast_fraction: float = 0.95
    intensity: Intensity = "breast_window"


@dataclass
class PatchSummary:
    """What was written: counts per split and class, what was skipped and why."""

    path: Path
    class_names: list[str]
    counts: dict[str, dict[str, int]]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    normals_requested: dict[str, int] = field(default_factory=dict)
    normals_without_spot: dict[str, int] = field(default_factory=dict)
    images_used: int = 0

    @property
    def n_patches(self) -> int:
        return sum(sum(per_class.values()) for per_class in self.counts.values())

    def metrics(self) -> dict[str, float]:
        """Flat numbers for the stage's tracking: counts, NORMAL misses and class balance per split."""
        out: dict[str, float] = {"n_patches": float(self.n_patches), "skipped": float(len(self.skipped)),
                                 "images_used": float(self.images_used)}
        for split, per_class in self.counts.items():
            out[f"{split}/n"] = float(sum(per_class.values()))
            for name, n in per_class.items():
                out[f"{split}/{name}"] = float(n)
            present = [n for n in per_class.values() if n > 0]
            out[f"{split}/balance_min_over_max"] = float(min(present) / max(present)) if present else 0.0
            out[f"{split}/normals_without_spot"] = float(self.normals_without_spot.get(split, 0))
        return out


@dataclass(frozen=True)
class _LesionCrop:
    lesion_id: str
    label: int
    box: Box


@dataclass(frozen=True)
class _ImageJob:
    image_id: str
    split: str
    patient_id: str
    cache_file: str
    cache_shape: tuple[int, int]
    lesions: tuple[_LesionCrop, ...]
    forbidden: tuple[Box, ...]  # enlarged boxes of every lesion of the image, usable or not
    normal_sides: tuple[int, ...]
    n_normals: int
    settings: PatchSettings


@dataclass
class _ImageResult:
    image_id: str
    pixels: np.ndarray  # (k, size, size) uint8
    labels: list[int]
    source_ids: list[str]
    boxes: list[Box]
    padded: list[float] = field(default_factory=list)  # share of each crop outside the image
    skipped: list[tuple[str, str]] = field(default_factory=list)
    normals_missing: int = 0
    unreadable: bool = False


# -- geometry --------------------------------------------------------------------------------------------
def lesion_crop_box(box: Sequence[float], context: float, min_side: float) -> Box:
    """Square crop centred on ``box`` (cache pixels): long side x (1 + 2 context), at least ``min_side``."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(max(x1 - x0, y1 - y0) * (1.0 + 2.0 * context), float(min_side), 1.0)
    side_px = int(math.ceil(side - 1e-6))
    left = int(math.floor((x0 + x1) / 2.0 - side_px / 2.0 + 0.5))
    top = int(math.floor((y0 + y1) / 2.0 - side_px / 2.0 + 0.5))
    return left, top, left + side_px, top + side_px


def axis_offsets(length: int, side: int) -> np.ndarray:
    """Start positions the crop policy allows for a ``side`` crop on an axis of ``length`` pixels.

    Every position inside the axis when the crop fits; otherwise the one position that centres the crop
    on the axis (the excess padded equally on both sides, the odd pixel after).
    """
    if side <= length:
        return np.arange(length - side + 1)
    return np.array([(length - side) // 2])


def _fit_axis(start: int, side: int, length: int) -> int:
    if side > length:
        return int(axis_offsets(length, side)[0])
    return min(max(start, 0), length - side)


def fit_crop_box(box: Box, shape: tuple[int, int]) -> Box:
    """The crop policy shared by lesion and NORMAL patches (see the module docstring): ``box`` shifted
    inside an image of ``shape`` (h, w) along each axis it fits, centred on the image along an axis it
    does not. The side is kept, so the patch's scale is unchanged."""
    x0, y0, x1, y1 = (int(v) for v in box)
    h, w = shape
    left, top = _fit_axis(x0, x1 - x0, w), _fit_axis(y0, y1 - y0, h)
    return left, top, left + (x1 - x0), top + (y1 - y0)


def padded_fraction(box: Box, shape: tuple[int, int]) -> float:
    """Share of the crop ``box`` that lies outside an image of ``shape`` (h, w), i.e. would be padding."""
    x0, y0, x1, y1 = box
    h, w = shape
    inside = max(0, min(x1, w) - max(x0, 0)) * max(0, min(y1, h) - max(y0, 0))
    return 1.0 - inside / float((x1 - x0) * (y1 - y0))


def crop_padded(image: np.ndarray, box: Box, fill: float = 0.0) -> np.ndarray:
    """``image[y0:y1, x0:x1]`` where the parts outside the image are ``fill``."""
    x0, y0, x1, y1 = box
    out = np.full((y1 - y0, x1 - x0), fill, dtype=image.dtype)
    h, w = image.shape
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return out


def cut_crop(image: np.ndarray, box: Box) -> np.ndarray:
    """The pixels of a patch: ``box`` placed by the crop policy (:func:`fit_crop_box`), then cut."""
    return crop_padded(image, fit_crop_box(box, image.shape))


def resize_square(crop: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize with antialiasing (a box filter's worth of smoothing when shrinking)."""
    t = torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))[None, None]
    if t.shape[-2:] == (size, size):
        return t[0, 0].numpy()
    out = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", align_corners=False,
                                          antialias=True)
    return out[0, 0].numpy()


def breast_mask(image: np.ndarray, threshold: float | None = None, work_side: int = 256) -> np.ndarray:
    """Breast region: a threshold on the smoothed image, largest connected region, holes filled.

    ``threshold`` None uses Otsu's; otherwise it is a fraction of the smoothed image's [min, max]. The mask
    is found on a block-averaged copy whose long side is about ``work_side`` (the outline needs no more;
    full resolution cost 10x more) and scaled back, so its edge is exact to one block.
    """
    h, w = image.shape
    f = max(1, math.ceil(max(h, w) / work_side))
    hh, ww = -(-h // f) * f, -(-w // f) * f
    padded = np.pad(image.astype(np.float32, copy=False), ((0, hh - h), (0, ww - w)), mode="edge")
    small = padded.reshape(hh // f, f, ww // f, f).mean(axis=(1, 3))
    smooth = ndimage.gaussian_filter(small, 1.0)
    lo, hi = float(smooth.min()), float(smooth.max())
    if hi <= lo:
        return np.zeros(image.shape, dtype=bool)
    level = threshold_otsu(smooth) if threshold is None else lo + threshold * (hi - lo)
    regions, n = ndimage.label(smooth > level)
    if n == 0:
        return np.zeros(image.shape, dtype=bool)
    sizes = np.bincount(regions.ravel())
    sizes[0] = 0
    mask = ndimage.binary_fill_holes(regions == int(np.argmax(sizes)))
    return np.repeat(np.repeat(mask, f, axis=0), f, axis=1)[:h, :w]


def breast_integral(mask: np.ndarray) -> np.ndarray:
    """Summed-area table of ``mask`` (one extra zero row and column): any square's breast count in O(1)."""
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int32)  # counts < 2**31
    integral[1:, 1:] = mask.astype(np.int32).cumsum(0, dtype=np.int32).cumsum(1, dtype=np.int32)
    return integral


def valid_normal_positions(mask: np.ndarray, side: int, forbidden: Sequence[Box],
                           min_breast_fraction: float, integral: np.ndarray | None = None) -> np.ndarray:
    """Boolean map over the crop policy's start positions (rows: :func:`axis_offsets` of the height, columns:
    of the width) of the ``side`` squares whose in-image part holds at least ``min_breast_fraction`` breast
    and that overlap none of the ``forbidden`` boxes. When the square fits the image, index (y, x) is the
    top-left corner (y, x) itself."""
    h, w = mask.shape
    if integral is None:
        integral = breast_integral(mask)
    oy, ox = axis_offsets(h, side), axis_offsets(w, side)
    if side <= h and side <= w:  # the usual case, as slices (10x faster than the general gather below)
        inside = (integral[side:, side:] - integral[:-side, side:] - integral[side:, :-side]
                  + integral[:-side, :-side])
        valid = inside >= min_breast_fraction * side * side
    else:
        ya, yb = np.clip(oy, 0, h)[:, None], np.clip(oy + side, 0, h)[:, None]
        xa, xb = np.clip(ox, 0, w)[None, :], np.clip(ox + side, 0, w)[None, :]
        inside = integral[yb, xb] - integral[ya, xb] - integral[yb, xa] + integral[ya, xa]
        valid = inside >= min_breast_fraction * (yb - ya) * (xb - xa)
    for bx0, by0, bx1, by1 in forbidden:
        # the square [x, x+side) meets [bx0, bx1) exactly when bx0 - side < x < bx1
        rows = (oy > by0 - side) & (oy < by1)
        cols = (ox > bx0 - side) & (ox < bx1)
        valid[np.ix_(rows, cols)] = False
    return valid


# -- intensity -------------------------------------------------------------------------------------------
def to_unit_range(image: np.ndarray, mask: np.ndarray, intensity: Intensity) -> np.ndarray:
    """float32 in [0, 255] (see the module docstring for why this mapping)."""
    values = image.astype(np.float32, copy=False)
    if intensity == "global":
        top = 255.0 if image.dtype == np.uint8 else 65535.0
        return np.clip(values * (255.0 / top), 0.0, 255.0)
    lo = float(values.min())
    hi = float(values[mask].max()) if mask.any() else float(values.max())
    if hi <= lo:
        return np.zeros_like(values)
    return np.clip((values - lo) * (255.0 / (hi - lo)), 0.0, 255.0)


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Values already on the 0..255 scale, rounded and stored as ``uint8`` as ``patches.h5`` holds them."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


# -- one image ------------------------------------------------------------------------------------------
def _image_rng(seed: int, image_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(image_id.encode("utf-8"))])


def _read_cache_png(path: Path, shape: tuple[int, int]) -> np.ndarray:
    with Image.open(path) as im:
        im.load()
        array = np.asarray(im)
    if array.ndim != 2:
        raise ValueError(f"expected a grayscale image, got shape {array.shape}")
    if array.shape != tuple(shape):
        raise ValueError(f"cache image is {array.shape[0]}x{array.shape[1]}, table says {shape[0]}x{shape[1]}")
    if array.dtype == np.int32:  # some Pillow versions open 16-bit PNGs as mode "I"
        array = np.clip(array, 0, 65535).astype(np.uint16)
    return array


def process_image(job: _ImageJob) -> _ImageResult:
    """All patches of one image; a missing or unreadable cache image becomes a skip reason."""
    s = job.settings
    empty = np.zeros((0, s.size, s.size), dtype=np.uint8)
    try:
        image = _read_cache_png(Path(job.cache_file), job.cache_shape)
    except FileNotFoundError:
        return _ImageResult(job.image_id, empty, [], [], [], skipped=[(job.image_id, "cache image missing")],
                            unreadable=True)
    except Exception as exc:  # a corrupt PNG is one bad item, whatever the decoder raises
        reason = f"cache image unreadable: {type(exc).__name__}: {exc}"
        return _ImageResult(job.image_id, empty, [], [], [], skipped=[(job.image_id, reason)], unreadable=True)
    mask = breast_mask(image, s.breast_threshold)
    unit = to_unit_range(image, mask, s.intensity)
    crops: list[np.ndarray] = []
    result = _ImageResult(job.image_id, empty, [], [], [])
    for lesion in job.lesions:
        box = fit_crop_box(lesion.box, image.shape)
        crops.append(to_uint8(resize_square(crop_padded(unit, box), s.size)))
        result.labels.append(int(lesion.label))
        result.source_ids.append(lesion.lesion_id)
        result.boxes.append(box)
        result.padded.append(padded_fraction(box, image.shape))
    rng = _image_rng(s.seed, job.image_id)
    integral = breast_integral(mask) if job.n_normals else None
    taken: list[Box] = list(job.forbidden)
    for k in range(job.n_normals):
        side = int(job.normal_sides[rng.integers(len(job.normal_sides))])
        valid = valid_normal_positions(mask, side, taken, s.min_breast_fraction, integral)
        spots = np.flatnonzero(valid)
        if spots.size == 0:
            result.normals_missing += 1
            continue
        iy, ix = np.unravel_index(spots[rng.integers(spots.size)], valid.shape)
        y, x = int(axis_offsets(image.shape[0], side)[iy]), int(axis_offsets(image.shape[1], side)[ix])
        box = fit_crop_box((x, y, x + side, y + side), image.shape)  # already placed; the one rule, stated
        taken.append(box)
        crops.append(to_uint8(resize_square(crop_padded(unit, box), s.size)))
        result.labels.append(labels.NORMAL_LABEL)
        result.source_ids.append(f"{job.image_id}#normal{k}")
        result.boxes.append(box)
        result.padded.append(padded_fraction(box, image.shape))
    if crops:
        result.pixels = np.stack(crops)
    return result


# -- planning from the tables ------------------------------------------------------------------------------
def _class_names(curate_dir: Path, lesions: pd.DataFrame) -> list[str]:
    report = curate_dir / stage_files.CURATE.report
    if report.is_file():
        classes = json.loads(report.read_text(encoding="utf-8")).get("classes")
        if classes:
            return list(classes)
    seen = set(lesions["class_name"]) if "class_name" in lesions else set()
    for scheme in labels.SCHEMES:
        names = labels.class_names(scheme)
        if seen <= set(names):
            return names
    raise ValueError(f"cannot tell the class scheme from the class names {sorted(seen)}")


def _plan(images: pd.DataFrame, lesions: pd.DataFrame, cache_dir: Path, s: PatchSettings, n_classes: int
          ) -> tuple[list[_ImageJob], list[tuple[str, str]], dict[str, int]]:
    skipped: list[tuple[str, str]] = []
    images = images.sort_values("image_id", kind="stable")
    by_image = {str(r.image_id): r for r in images.itertuples(index=False)}
    crops: dict[str, list[_LesionCrop]] = {i: [] for i in by_image}
    forbidden: dict[str, list[Box]] = {i: [] for i in by_image}
    listed = Counter()
    for les in lesions.sort_values("lesion_id", kind="stable").itertuples(index=False):
        image_id, lesion_id = str(les.image_id), str(les.lesion_id)
        img = by_image.get(image_id)
        if img is None:
            skipped.append((lesion_id, f"its image {image_id} is not among the curated images"))
            continue
        listed[image_id] += 1
        full = np.array([les.x0, les.y0, les.x1, les.y1], dtype=np.float64)
        if not np.all(np.isfinite(full)) or full[2] <= full[0] or full[3] <= full[1]:
            skipped.append((lesion_id, f"degenerate lesion box {full.tolist()}"))
            continue
        if full[2] <= 0 or full[3] <= 0 or full[0] >= img.width or full[1] >= img.height:
            skipped.append((lesion_id, f"lesion box {full.tolist()} lies off the "
                                       f"{img.width}x{img.height} image"))
            continue
        try:
            label = int(les.label)
        except (TypeError, ValueError):
            skipped.append((lesion_id, f"label {les.label!r} is not a class index"))
            continue
        if label == labels.NORMAL_LABEL or not 0 < label < n_classes:
            skipped.append((lesion_id, f"label {label} is not a lesion class of {n_classes} classes"))
            continue
        sx, sy = img.cache_width / img.width, img.cache_height / img.height  # exact per axis, unlike `scale`
        clipped = np.clip(full, 0, [img.width, img.height, img.width, img.height])
        cache_box = clipped * [sx, sy, sx, sy]
        enlarged = lesion_crop_box(cache_box, s.context, s.min_size_px)
        box = fit_crop_box(enlarged, (int(img.cache_height), int(img.cache_width)))
        crops[image_id].append(_LesionCrop(lesion_id, label, box))
        # the lesion's surroundings and, when shifted, the pixels of its patch
        forbidden[image_id].extend([enlarged] if box == enlarged else [enlarged, box])

    # NORMAL sides come from the training lesions only: a val/test NORMAL patch must not depend on the
    # val/test lesions, and every split's NORMAL patches then share one size distribution.
    train_sides = sorted(c.box[2] - c.box[0] for image_id, cs in crops.items()
                         if str(by_image[image_id].split) == "train" for c in cs)
    normal_sides = tuple(train_sides or [int(s.min_size_px)])

    jobs: list[_ImageJob] = []
    normals_requested: Counter = Counter()
    for image_id, img in by_image.items():
        split = str(img.split)
        if split not in SPLIT_CODES:
            skipped.append((image_id, f"unknown split {split!r}"))
            continue
        n_normals = s.normals_per_image
        expected = getattr(img, "n_lesions", None)
        if expected is not None and listed[image_id] < int(expected):
            n_normals = 0  # a lesion curation dropped could lie anywhere: no tissue here is surely normal
            skipped.append((f"{image_id}#normal", "some lesions of this image were not curated; "
                                                  "no NORMAL patch drawn from it"))
        normals_requested[split] += n_normals
        jobs.append(_ImageJob(
            image_id=image_id, split=split, patient_id=str(img.patient_id),
            cache_file=str(cache_dir / str(img.cache_path)),
            cache_shape=(int(img.cache_height), int(img.cache_width)),
            lesions=tuple(crops[image_id]), forbidden=tuple(forbidden[image_id]),
            normal_sides=normal_sides, n_normals=n_normals, settings=s,
        ))
    return jobs, skipped, dict(normals_requested)


def _specs(size: int, jobs: list[_ImageJob], s: PatchSettings) -> list[DatasetSpec]:
    ids = [j.image_id for j in jobs]
    sources = [c.lesion_id for j in jobs for c in j.lesions] + [f"{i}#normal{max(0, s.normals_per_image - 1)}"
                                                               for i in ids]
    return [
        DatasetSpec("images", np.uint8, (1, size, size)),
        DatasetSpec("labels", np.int64),
        DatasetSpec("split", np.int8),
        DatasetSpec("patient_id", string_dtype([j.patient_id for j in jobs])),
        DatasetSpec("source_id", string_dtype(sources)),
        DatasetSpec("image_id", string_dtype(ids)),
        DatasetSpec("box", np.int32, (4,)),
        DatasetSpec("padded_fraction", np.float32),
    ]


def extract_patches(
    curate_dir: str | Path,
    out_path: str | Path,
    *,
    size: int = 64,
    context: float = 0.25,
    min_size_px: int = 32,
    normals_per_image: int = 2,
    seed: int = 0,
    breast_threshold: float | None = None,
    min_breast_fraction: float = 0.95,
    intensity: Intensity = "breast_window",
    workers: int = 1,
    cache_dir: str | Path | None = None,
    compression: str | None = "gzip",
) -> PatchSummary:
    """Write ``patches.h5`` from a curate folder; see the module docstring for what a patch is.

    ``cache_dir`` defaults to ``<curate_dir>/cache``. Raises RuntimeError when no image yields a patch.
    """
    if size < 8 or min_size_px < 1 or context < 0 or normals_per_image < 0:
        raise ValueError("need size >= 8, min_size_px >= 1, context >= 0, normals_per_image >= 0")
    if not 0.0 < min_breast_fraction <= 1.0:
        raise ValueError("min_breast_fraction must be in (0, 1]")
    if breast_threshold is not None and not 0.0 <= breast_threshold < 1.0:
        raise ValueError("breast_threshold must be None (Otsu) or a fraction in [0, 1)")
    if intensity not in ("breast_window", "global"):
        raise ValueError(f"intensity must be 'breast_window' or 'global', not {intensity!r}")
    curate_dir = Path(curate_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else curate_dir / "cache"
    settings = PatchSettings(size=size, context=context, min_size_px=min_size_px,
                             normals_per_image=normals_per_image, seed=seed, breast_threshold=breast_threshold,
                             min_breast_fraction=min_breast_fraction, intensity=intensity)
    images = pd.read_parquet(curate_dir / stage_files.CURATE.images)
    lesions = pd.read_parquet(curate_dir / stage_files.CURATE.lesions)
    names = _class_names(curate_dir, lesions)
    jobs, skipped, normals_requested = _plan(images, lesions, cache_dir, settings, len(names))
    counts = {split: dict.fromkeys(names, 0) for split in SPLIT_CODES}
    missing: Counter = Counter()
    split_of = {j.image_id: j.split for j in jobs}
    patient_of = {j.image_id: j.patient_id for j in jobs}
    used = 0
    attrs = {
        "class_names": names, "size": size, "split_codes": SPLIT_CODES,
        "settings": {k: v for k, v in vars(settings).items()},
        "intensity_mapping": ("per image: [min, max inside the breast] -> [0, 255]"
                              if intensity == "breast_window" else "16-bit / 257, 8-bit as is"),
        "box_units": "cache pixels, x0 y0 x1 y1, exclusive ends",
        "crop_policy": ("one rule for lesion and NORMAL crops: shifted inside the image along an axis the crop "
                        "fits, centred and zero-padded along an axis it does not; NORMAL sides drawn from the "
                        "training lesions' crop sides"),
        "padded_fraction": "share of each crop outside its image (zero padding), before resizing",
    }
    with ChunkedH5Writer(out_path, _specs(size, jobs, settings), attrs=attrs, compression=compression) as out:
        for result in _results(jobs, workers):
            skipped.extend(result.skipped)
            missing[split_of[result.image_id]] += result.normals_missing
            n = len(result.labels)
            used += not result.unreadable
            if n == 0:
                continue
            split = split_of[result.image_id]
            for lab in result.labels:
                counts[split][names[lab]] += 1
            out.append(
                images=result.pixels[:, None], labels=np.array(result.labels, dtype=np.int64),
                split=np.full(n, SPLIT_CODES[split], dtype=np.int8),
                patient_id=[patient_of[result.image_id]] * n, source_id=result.source_ids,
                image_id=[result.image_id] * n, box=np.array(result.boxes, dtype=np.int64),
                padded_fraction=np.array(result.padded, dtype=np.float32),
            )
        if out.rows_appended == 0:
            reasons = Counter(r for _, r in skipped).most_common(3)
            raise RuntimeError(f"no patch could be extracted from {len(jobs)} images; "
                               f"most common reasons: {reasons}")
        out.set_attrs(counts=counts, normals_without_spot=dict(missing), skipped=len(skipped))
    return PatchSummary(path=Path(out_path), class_names=names, counts=counts, skipped=skipped,
                        normals_requested=normals_requested, normals_without_spot=dict(missing),
                        images_used=used)


def _results(jobs: list[_ImageJob], workers: int):
    """Per-image results in job order (so the file's row order never depends on ``workers``)."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(process_image, jobs)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(process_image, jobs, chunksize=4)
