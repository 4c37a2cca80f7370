"""ROI masks: find the mask among the files of an ROI series, fit it to its image, turn it into boxes.

CBIS-DDSM ROI series hold a binary mask and a cropped image, but their file names are swapped
between the mass and calc files and their order is not reliable; some masks even sit in a separate
series or differ in size from their full image. So the mask is identified BY CONTENT: it is binary
(zero plus one other value) and, ideally, the size of the full mammogram.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from mammo_core.errors import BadItem

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), x1/y1 exclusive, full-image pixels

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _mask_kind(arr: np.ndarray) -> str:
    """"binary" (values {0, v} with v != 0, or only v), "empty" (all zero) or "not binary"."""
    if arr.ndim != 2 or arr.size == 0:
        return "not binary"
    if arr.dtype == bool:
        return "binary" if arr.any() else "empty"
    lo, hi = arr.min(), arr.max()
    if lo == hi:
        return "empty" if lo == 0 else "binary"
    if lo != 0 and hi != 0:
        return "not binary"
    other = hi if lo == 0 else lo
    # every nonzero pixel must equal the one other value (two passes, no sort of the image)
    return "binary" if np.count_nonzero(arr) == np.count_nonzero(arr == other) else "not binary"


def is_binary_mask(arr: np.ndarray) -> bool:
    """True when ``arr`` is a usable mask: exactly the values {0, v} (v != 0), or only v.

    An all-zero array marks nothing and is not a valid mask.
    """
    return _mask_kind(np.asarray(arr)) == "binary"


def _aspect_agrees(shape: tuple[int, int], full_shape: tuple[int, int], tol: float) -> bool:
    (h, w), (fh, fw) = shape, full_shape
    if min(h, w, fh, fw) <= 0:
        return False
    return abs((h / w) / (fh / fw) - 1.0) <= tol


def _hw(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def choose_mask(
    candidates: list[tuple[str, np.ndarray]], full_shape: tuple[int, int], aspect_tol: float = 0.01
) -> tuple[str, np.ndarray]:
    """The (name, array) of the ROI mask among ``candidates`` (the files of one or two ROI series).

    Preference: a binary array of exactly ``full_shape``; else a binary array whose aspect ratio
    agrees with the full image within ``aspect_tol`` (fit it with :func:`fit_mask_to_image`).
    The array is returned as given. Raises BadItem when no candidate qualifies, with the reason:
    "mask size HxW does not match image HxW and aspect differs", "mask is empty",
    "no binary mask among <names>", or "several different binary masks among <names>".
    """
    full_shape = (int(full_shape[0]), int(full_shape[1]))
    names = ", ".join(name for name, _ in candidates) or "(no files)"
    item = names
    kinds = [(name, np.asarray(arr), _mask_kind(np.asarray(arr))) for name, arr in candidates]
    binary = [(name, arr) for name, arr, kind in kinds if kind == "binary"]

    same_size = [(n, a) for n, a in binary if a.shape == full_shape]
    same_aspect = [(n, a) for n, a in binary if a.shape != full_shape
                   and _aspect_agrees(a.shape, full_shape, aspect_tol)]
    for tier in (same_size, same_aspect):
        if tier:
            first_name, first = tier[0]
            if any(a.shape != first.shape or not np.array_equal(a != 0, first != 0) for _, a in tier[1:]):
                raise BadItem(item, f"several different binary masks among {names}")
            return first_name, first
    if binary:
        name, arr = binary[0]
        raise BadItem(
            name,
            f"mask size {_hw(arr.shape)} does not match image {_hw(full_shape)} and aspect differs",
        )
    empty = [name for name, _, kind in kinds if kind == "empty"]
    if empty:
        raise BadItem(empty[0], "mask is empty")
    raise BadItem(item, f"no binary mask among {names}")


def fit_mask_to_image(mask: np.ndarray, full_shape: tuple[int, int], aspect_tol: float = 0.01) -> np.ndarray:
    """The mask as a bool array of ``full_shape``: nonzero = inside the ROI.

    A mask of another size is resized by nearest neighbour (pixel centres: full pixel i takes mask
    pixel floor((i + 0.5) * h / H)), so a half-size mask maps every mask pixel to a 2x2 block. When the
    aspect ratios differ by more than ``aspect_tol`` the mask belongs to another geometry: BadItem.
    """
    mask = np.asarray(mask)
    full_shape = (int(full_shape[0]), int(full_shape[1]))
    if mask.ndim != 2:
        raise BadItem("mask", f"mask has shape {mask.shape}, expected 2-D")
    inside = mask if mask.dtype == bool else mask != 0
    if mask.shape == full_shape:
        return inside
    if not _aspect_agrees(mask.shape, full_shape, aspect_tol):
        raise BadItem(
            "mask",
            f"mask size {_hw(mask.shape)} does not match image {_hw(full_shape)} and aspect differs",
        )
    (h, w), (fh, fw) = mask.shape, full_shape
    rows = np.minimum(((np.arange(fh) + 0.5) * (h / fh)).astype(np.intp), h - 1)
    cols = np.minimum(((np.arange(fw) + 0.5) * (w / fw)).astype(np.intp), w - 1)
    return inside[rows][:, cols]


def mask_to_boxes(mask: np.ndarray, min_area_px: int = 4) -> list[Box]:
    """One box (x0, y0, x1, y1), x1/y1 exclusive, per 8-connected region of the mask.

    Regions with fewer than ``min_area_px`` pixels (specks from resizing or annotation noise) are
    dropped. Boxes are sorted in reading order: by y0, then x0. An empty mask gives [].
    Only the bounding rectangle of the nonzero pixels is labelled, so a small lesion in a
    3000x5000 mask costs little.
    """
    inside = np.asarray(mask)
    inside = inside if inside.dtype == bool else inside != 0
    if inside.ndim != 2:
        raise BadItem("mask", f"mask has shape {inside.shape}, expected 2-D")
    rows = np.flatnonzero(inside.any(axis=1))
    if rows.size == 0:
        return []
    cols = np.flatnonzero(inside.any(axis=0))
    top, left = int(rows[0]), int(cols[0])
    crop = inside[top : rows[-1] + 1, left : cols[-1] + 1]
    labels, count = ndimage.label(crop, structure=_EIGHT_CONNECTED)
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    boxes: list[Box] = []
    for index, region in enumerate(ndimage.find_objects(labels), start=1):
        if region is None or areas[index] < min_area_px:
            continue
        ys, xs = region
        boxes.append((left + xs.start, top + ys.start, left + xs.stop, top + ys.stop))
    boxes.sort(key=lambda b: (b[1], b[0], b[3], b[2]))
    return [tuple(int(v) for v in b) for b in boxes]  # type: ignore[misc]
