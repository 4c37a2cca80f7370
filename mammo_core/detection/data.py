"""Detection data: curated full mammograms, breast-cropped and resized, with lesion boxes and classes.

Why a breast crop: a mammogram is mostly empty background and film labels; cropping to the breast's
bounding box spends the detector's input pixels on tissue (lesions are small). Why one box per lesion (the
lesion's bounding box from curate, not one per mask region): a calcification cluster is one finding, and
FROC counts findings. Images without lesions stay in as negatives (they teach what tissue is not a lesion).

Boxes that cannot be used are dropped and counted by reason (``zero_size``, ``outside_image``,
``unknown_class``), never silently. An image whose breast mask is empty is dropped (``no_breast_tissue``).

Augmentation keeps boxes consistent with the pixels: flips mirror the coordinates; a rotation turns each
box's four corners and takes their enclosing axis-aligned box, clipped to the image.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F
from torchvision.transforms import functional as TF

from mammo_core.data.patches import breast_mask, to_unit_range
from mammo_core.storage import stage_files

CLASS_SETS: dict[str, tuple[str, ...]] = {
    "four": ("MASS_BENIGN", "MASS_MALIGNANT", "CALC_BENIGN", "CALC_MALIGNANT"),
    "two": ("MASS", "CALC"),
}


def class_names(kind: str) -> list[str]:
    if kind not in CLASS_SETS:
        raise ValueError(f"unknown detection class set {kind!r}; use one of {sorted(CLASS_SETS)}")
    return list(CLASS_SETS[kind])


def detection_class(abnormality_type: str, pathology: str, kind: str) -> str | None:
    """The detection class name of a lesion, or None when its type/pathology is not recognised.

    BENIGN_WITHOUT_CALLBACK counts as benign (the issue's convention).
    """
    kind_name = {"mass": "MASS", "calc": "CALC", "calcification": "CALC"}.get(str(abnormality_type).strip().lower())
    if kind_name is None:
        return None
    if kind == "two":
        return kind_name
    path = str(pathology).strip().upper()
    if path.startswith("BENIGN"):
        return f"{kind_name}_BENIGN"
    if path == "MALIGNANT":
        return f"{kind_name}_MALIGNANT"
    return None


@dataclass
class DetectionImage:
    """One detector input: image (1, H, W) float in [0, 1], boxes (K, 4) xyxy and 1-based labels (K,).

    ``crop`` (x0, y0) and ``scale`` map input pixels back to the cached image: cache = input / scale + crop;
    ``cache_to_original`` maps the cache to the original full image. ``group``: an ordinal of the image's
    patient (never the patient id), so that a bootstrap draws both views of a patient together; None when
    unknown. ``image_key``/``patient_key``: sha256 digests of the curated image and patient ids (see
    :func:`pseudonym`), stable across runs of one dataset so that two runs' detections pair image by image.
    """

    index: int
    split: str
    image: Tensor
    boxes: Tensor
    labels: Tensor
    crop: tuple[int, int]
    scale: float
    cache_to_original: float
    group: int | None = None
    image_key: str | None = None
    patient_key: str | None = None

    def target(self) -> dict[str, Tensor]:
        return {"boxes": self.boxes, "labels": self.labels}


@dataclass
class DetectionData:
    images: list[DetectionImage]
    classes: list[str]
    dropped: Counter = field(default_factory=Counter)

    def split(self, name: str) -> list[DetectionImage]:
        return [im for im in self.images if im.split == name]


def breast_box(unit: np.ndarray, mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box (x0, y0, x1, y1), exclusive ends, of the breast mask; None when there is no breast."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0 or cols.size == 0 or float(unit.max()) <= float(unit.min()):
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def prepare_image(image: np.ndarray, max_size: int) -> tuple[Tensor, tuple[int, int], float] | None:
    """uint16/uint8 full image -> (input (1, h, w) in [0, 1], crop offset (x0, y0), scale); None without breast.

    The intensity window is the patches stage's ``breast_window`` (image minimum .. maximum inside the
    breast), so detector inputs look like the patches the backbone was trained on.
    """
    mask = breast_mask(image)
    unit = to_unit_range(image, mask, "breast_window")
    box = breast_box(unit, mask)
    if box is None:
        return None
    x0, y0, x1, y1 = box
    crop = unit[y0:y1, x0:x1]
    scale = max_size / max(crop.shape)
    h, w = max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))
    t = torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32) / 255.0)[None, None]
    mode = "area" if scale < 1 else "bilinear"
    resized = F.interpolate(t, size=(h, w), mode=mode, **({} if mode == "area" else {"align_corners": False}))
    return resized[0].clamp_(0.0, 1.0), (x0, y0), scale


def clean_boxes(boxes: Sequence[Sequence[float]], height: int, width: int,
                dropped: Counter) -> tuple[list[int], Tensor]:
    """Clip boxes to the image; drop (and count) zero-size ones and ones wholly outside. Returns kept indices."""
    keep, out = [], []
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        if not (x1 > x0 and y1 > y0):
            dropped["zero_size"] += 1
            continue
        cx0, cy0 = min(max(x0, 0.0), width), min(max(y0, 0.0), height)
        cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
        if cx1 - cx0 < 1.0 or cy1 - cy0 < 1.0:
            dropped["outside_image"] += 1
            continue
        keep.append(i)
        out.append([cx0, cy0, cx1, cy1])
    return keep, torch.tensor(out, dtype=torch.float32).reshape(-1, 4)


def _read_cache_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        im.load()
        array = np.asarray(im)
    if array.ndim != 2:
        raise ValueError(f"{path}: expected a grayscale image, got shape {array.shape}")
    if array.dtype == np.int32:  # some Pillow versions open 16-bit PNGs as mode "I"
        array = np.clip(array, 0, 65535).astype(np.uint16)
    return array


def load_detection_data(curate_dir: str | Path, kind: str, max_size: int, max_images: int | None = None,
                        splits: Sequence[str] = ("train", "val", "test")) -> DetectionData:
    """Detector inputs for every curated image in ``splits`` (at most ``max_images`` per split, table order)."""
    curate_dir = Path(curate_dir)
    names = class_names(kind)
    images = pd.read_parquet(curate_dir / stage_files.CURATE.images)
    lesions = pd.read_parquet(curate_dir / stage_files.CURATE.lesions)
    for table, cols, name in ((images, ("image_id", "split", "cache_path", "scale"), stage_files.CURATE.images),
                              (lesions, ("image_id", "abnormality_type", "pathology", "x0", "y0", "x1", "y1"),
                               stage_files.CURATE.lesions)):
        missing = [c for c in cols if c not in table.columns]
        if missing:
            raise ValueError(f"{curate_dir / name}: missing columns {missing}")
    by_image = {k: g for k, g in lesions.groupby("image_id", sort=False)}
    patients = ({pid: k for k, pid in enumerate(sorted(images["patient_id"].astype(str).unique()))}
                if "patient_id" in images.columns else {})
    dropped: Counter = Counter()
    out: list[DetectionImage] = []
    for split in splits:
        rows = images[images["split"] == split]
        if max_images is not None:
            rows = rows.head(max_images)
        for row in rows.itertuples(index=False):
            image = _read_cache_png(curate_dir / "cache" / row.cache_path)
            prepared = prepare_image(image, max_size)
            if prepared is None:
                dropped["no_breast_tissue"] += 1
                continue
            tensor, (cx, cy), scale = prepared
            les = by_image.get(row.image_id)
            raw, labels = [], []
            if les is not None:
                for lr in les.itertuples(index=False):
                    cls = detection_class(lr.abnormality_type, lr.pathology, kind)
                    if cls is None:
                        dropped["unknown_class"] += 1
                        continue
                    s = float(row.scale)
                    raw.append([(lr.x0 * s - cx) * scale, (lr.y0 * s - cy) * scale,
                                (lr.x1 * s - cx) * scale, (lr.y1 * s - cy) * scale])
                    labels.append(names.index(cls) + 1)
            keep, boxes = clean_boxes(raw, tensor.shape[1], tensor.shape[2], dropped)
            out.append(DetectionImage(len(out), split, tensor, boxes,
                                      torch.tensor([labels[i] for i in keep], dtype=torch.int64),
                                      (cx, cy), scale, 1.0 / float(row.scale),
                                      patients.get(str(getattr(row, "patient_id", ""))),
                                      pseudonym(row.image_id),
                                      pseudonym(getattr(row, "patient_id", None))))
    return DetectionData(out, names, dropped)


def pseudonym(value: object) -> str | None:
    """A short sha256 digest of a curated id: the same on every run of one dataset, and no readable id.

    Why: saved detections must pair across runs (``mammo compare``, ``mammo promote``) by image and patient,
    while the tables logged to MLflow carry no dataset id (CBIS image ids contain the patient id).
    """
    if value is None or (isinstance(value, float) and value != value):
        return None
    return hashlib.sha256(str(value).encode("utf-8")).hexdigest()[:16]


# --------------------------------------------------------------------------------------- augmentation


def hflip(image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    w = image.shape[-1]
    out = boxes.clone()
    out[:, 0], out[:, 2] = w - boxes[:, 2], w - boxes[:, 0]
    return image.flip(-1), out


def vflip(image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    h = image.shape[-2]
    out = boxes.clone()
    out[:, 1], out[:, 3] = h - boxes[:, 3], h - boxes[:, 1]
    return image.flip(-2), out


def rotate_boxes(boxes: Tensor, angle_deg: float, height: int, width: int) -> Tensor:
    """Boxes after rotating the image by ``angle_deg`` counter-clockwise about its centre (torchvision's sense).

    Each box's four corners are rotated and enclosed in an axis-aligned box, clipped to the image.
    """
    if len(boxes) == 0:
        return boxes.clone()
    cx, cy = width / 2.0, height / 2.0
    a = math.radians(angle_deg)
    cos, sin = math.cos(a), math.sin(a)
    xs = boxes[:, [0, 2, 2, 0]] - cx
    ys = boxes[:, [1, 1, 3, 3]] - cy
    # counter-clockwise on screen (y down): x' = x cos + y sin, y' = -x sin + y cos
    rx = xs * cos + ys * sin + cx
    ry = -xs * sin + ys * cos + cy
    out = torch.stack([rx.min(1).values, ry.min(1).values, rx.max(1).values, ry.max(1).values], dim=1)
    out[:, 0::2] = out[:, 0::2].clamp(0, width)
    out[:, 1::2] = out[:, 1::2].clamp(0, height)
    return out


def rotate(image: Tensor, boxes: Tensor, angle_deg: float) -> tuple[Tensor, Tensor]:
    """Rotate image (fill 0: background) and recompute boxes."""
    h, w = image.shape[-2:]
    rotated = TF.rotate(image, angle_deg, interpolation=TF.InterpolationMode.BILINEAR, fill=0.0)
    return rotated, rotate_boxes(boxes, angle_deg, h, w)


def _on_grid(value: float, lo: float, hi: float, limit: int, grid: int) -> int:
    """``value`` rounded to a multiple of ``grid``, inside [lo, hi] when a multiple lies there, in [0, limit]."""
    if grid <= 1:
        return int(round(value))
    snapped = grid * round(value / grid)
    first, last = grid * math.ceil(lo / grid), grid * math.floor(hi / grid)
    if first <= last:
        snapped = min(max(snapped, first), last)
    return int(min(max(snapped, 0), limit // grid * grid))


def random_window(image: Tensor, boxes: Tensor, labels: Tensor, size: int, generator: torch.Generator,
                  positive_fraction: float = 0.75, min_visible: float = 0.5, grid: int = 1
                  ) -> tuple[Tensor, Tensor, Tensor, tuple[int, int]]:
    """:func:`random_crop` that also says where the window lies: (window, boxes, labels, (top, left)).

    ``grid`` > 1 puts the window's corner on multiples of ``grid`` (a lesion window still holds its
    lesion where a grid position allows it), so that the window is whole cells of a feature map of that
    stride (:mod:`mammo_core.detection.feature_cache`).
    """
    h, w = image.shape[-2:]
    ch, cw = min(size, h), min(size, w)
    draws = torch.rand(3, generator=generator).tolist()
    if len(boxes) and draws[0] < positive_fraction:
        x0, y0, x1, y1 = boxes[min(int(draws[1] * len(boxes)), len(boxes) - 1)].tolist()
        lo_x, hi_x = max(0.0, x1 - cw), min(x0, w - cw)
        lo_y, hi_y = max(0.0, y1 - ch), min(y0, h - ch)
        if hi_x < lo_x:
            lo_x = hi_x = min(max((x0 + x1 - cw) / 2, 0.0), w - cw)
        if hi_y < lo_y:
            lo_y = hi_y = min(max((y0 + y1 - ch) / 2, 0.0), h - ch)
        left = _on_grid(lo_x + draws[2] * (hi_x - lo_x), lo_x, hi_x, w - cw, grid)
        top = _on_grid(lo_y + torch.rand(1, generator=generator).item() * (hi_y - lo_y), lo_y, hi_y, h - ch, grid)
    else:
        left = int(draws[1] * (w - cw + 1)) if grid <= 1 else _on_grid(draws[1] * (w - cw), 0, w - cw, w - cw, grid)
        top = int(draws[2] * (h - ch + 1)) if grid <= 1 else _on_grid(draws[2] * (h - ch), 0, h - ch, h - ch, grid)
    window = image[..., top:top + ch, left:left + cw]
    if not len(boxes):
        return window, boxes.clone(), labels.clone(), (top, left)
    shifted = boxes - torch.tensor([left, top, left, top], dtype=boxes.dtype)
    clipped = shifted.clone()
    clipped[:, 0::2] = clipped[:, 0::2].clamp(0, cw)
    clipped[:, 1::2] = clipped[:, 1::2].clamp(0, ch)
    area = (shifted[:, 2] - shifted[:, 0]) * (shifted[:, 3] - shifted[:, 1])
    kept = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    ok = (kept >= min_visible * area) & ((clipped[:, 2] - clipped[:, 0]) >= 1) & ((clipped[:, 3] - clipped[:, 1]) >= 1)
    return window, clipped[ok], labels[ok], (top, left)


def random_crop(image: Tensor, boxes: Tensor, labels: Tensor, size: int, generator: torch.Generator,
                positive_fraction: float = 0.75, min_visible: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    """A ``size`` x ``size`` window (smaller where the image is) and the boxes that stay mostly inside it.

    Why crops: lesions are small, so most of a full mammogram's pixels teach the detector only
    "background"; a window placed on a lesion (``positive_fraction`` of the draws, when the image has
    boxes) spends the training budget where the boxes are, at the input resolution, while the other draws
    land anywhere and keep the negatives. A box keeps its label when at least ``min_visible`` of its area
    stays in the window (clipped to it); the rest are dropped, as a cut-off finding is not a finding.
    The window around a lesion is placed uniformly among positions that hold the whole box (or centred
    on it when the box is larger than the window), so lesions are not always in the middle.
    """
    window, boxes, labels, _ = random_window(image, boxes, labels, size, generator, positive_fraction, min_visible)
    return window, boxes, labels


def augment(image: Tensor, boxes: Tensor, labels: Tensor, generator: torch.Generator,
            max_rotation: float = 10.0) -> tuple[Tensor, Tensor, Tensor]:
    """Random h/v flips and a rotation within +-``max_rotation`` degrees; boxes left under 1 px are dropped."""
    draws = torch.rand(3, generator=generator).tolist()
    if draws[0] < 0.5:
        image, boxes = hflip(image, boxes)
    if draws[1] < 0.5:
        image, boxes = vflip(image, boxes)
    if max_rotation > 0:
        image, boxes = rotate(image, boxes, (2 * draws[2] - 1) * max_rotation)
    ok = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
    return image, boxes[ok], labels[ok]
