"""Curation: from a raw CBIS-DDSM-shaped tree to clean tables and a preprocessed image cache.

Steps: parse the four case CSVs (quirks handled in :mod:`mammo_core.data.cbis_tables`), merge the
mammograms listed both as Mass and Calc into one image, split by patient, resolve every CSV path to
files in the on-disk layout, decode each full image (in parallel worker processes), identify each ROI
mask by content, turn masks into boxes, and cache a downsampled 16-bit copy of each image and mask.

Nothing stops on a bad item: a bad CSV row, image or mask is quarantined with its reason and the rest
go on. Only when every image is bad does curation fail, saying so.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from mammo_core.data import cbis_tables, dicom_io, labels, layouts, masks, splits
from mammo_core.data.cbis_paths import parse_cbis_path
from mammo_core.errors import BadItem
from mammo_core.runtime import faults
from mammo_core.runtime.isolation import ItemFailed, run_isolated
from mammo_core.storage.durable import atomic_path

QUARANTINE_COLUMNS = ["item", "kind", "reason"]
BURNED_IN_REASON = ("DICOM BurnedInAnnotation is YES: the pixels may show identifying text "
                    "(set curate.allow_burned_in_annotation: true to accept)")


@dataclass(frozen=True)
class CurationSettings:
    classes: str = "seven"
    max_side: int = 1024
    val_fraction: float = 0.15
    split_seed: int = 0
    workers: int = 2
    min_box_area: int = 4
    mask_aspect_tolerance: float = 0.01
    max_image_bytes: int = dicom_io.DEFAULT_MAX_IMAGE_BYTES
    image_time_limit_s: float = 300.0
    allow_burned_in_annotation: bool = False


@dataclass
class LesionJob:
    lesion_id: str
    candidates: list[str]


@dataclass
class ImageJob:
    image_id: str
    full_file: str
    lesions: list[LesionJob]
    cache_dir: str
    max_side: int
    min_box_area: int
    aspect_tol: float
    max_bytes: int = dicom_io.DEFAULT_MAX_IMAGE_BYTES
    allow_burned_in_annotation: bool = False


@dataclass
class LesionOutcome:
    lesion_id: str
    reason: str | None = None
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)
    mask_area: int = 0
    mask_cache: str | None = None


@dataclass
class ImageOutcome:
    image_id: str
    reason: str | None = None
    height: int = 0
    width: int = 0
    cache_height: int = 0
    cache_width: int = 0
    cache_path: str | None = None
    meta: dict = field(default_factory=dict)
    lesions: list[LesionOutcome] = field(default_factory=list)


@dataclass
class CurationResult:
    images: pd.DataFrame
    lesions: pd.DataFrame
    quarantine: pd.DataFrame
    report: dict


def cache_shape(height: int, width: int, max_side: int) -> tuple[int, int]:
    """Downsampled (h, w) whose long side is at most ``max_side``; never upsampled."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def downsample(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Area-averaged resize (anti-aliased for downsampling) keeping the dtype's range."""
    if image.shape == shape:
        return image
    t = torch.from_numpy(image.astype(np.float32, copy=False))[None, None]
    out = torch.nn.functional.interpolate(t, size=shape, mode="area")[0, 0].numpy()
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(image.dtype)


def _save_png_atomic(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", compress_level=1)


def process_image(job: ImageJob) -> ImageOutcome:
    """Decode one mammogram and its masks; every failure becomes a reason, never an exception."""
    faults.at(f"curate:image:{job.image_id}")
    outcome = ImageOutcome(image_id=job.image_id)
    try:
        image, meta = dicom_io.read_image_file(Path(job.full_file), max_bytes=job.max_bytes)
    except BadItem as exc:
        outcome.reason = exc.reason
        return outcome
    except Exception as exc:  # an unexpected decoder failure is still one bad item
        outcome.reason = f"could not decode image: {type(exc).__name__}: {exc}"
        return outcome
    if image.ndim != 2:
        outcome.reason = f"expected a single-frame grayscale image, got shape {image.shape}"
        return outcome
    if str(meta.get("BurnedInAnnotation", "")).upper() == "YES" and not job.allow_burned_in_annotation:
        outcome.reason = BURNED_IN_REASON  # text in the pixels may name the patient: no cache copy is made
        return outcome
    h, w = image.shape
    ch, cw = cache_shape(h, w, job.max_side)
    outcome.height, outcome.width, outcome.cache_height, outcome.cache_width = h, w, ch, cw
    outcome.meta = meta
    cache_dir = Path(job.cache_dir)
    for lesion in job.lesions:
        lo = LesionOutcome(lesion_id=lesion.lesion_id)
        try:
            candidates = []
            for path in lesion.candidates:
                try:
                    candidates.append((Path(path).name, dicom_io.read_mask_file(Path(path), max_bytes=job.max_bytes)))
                except BadItem:
                    continue  # a broken crop must not hide a good mask; choose_mask names what is left
            if not candidates:
                raise BadItem(lesion.lesion_id, "no readable file in the ROI series")
            _, mask = masks.choose_mask(candidates, (h, w), aspect_tol=job.aspect_tol)
            full_mask = masks.fit_mask_to_image(mask, (h, w), aspect_tol=job.aspect_tol)
            lo.boxes = masks.mask_to_boxes(full_mask, min_area_px=job.min_box_area)
            if not lo.boxes:
                raise BadItem(lesion.lesion_id, f"mask has no region of at least {job.min_box_area} pixels")
            lo.mask_area = int(full_mask.sum())
            small = downsample(full_mask.astype(np.uint8) * 255, (ch, cw))
            mask_path = cache_dir / "masks" / f"{lesion.lesion_id}.png"
            _save_png_atomic((small >= 128).astype(np.uint8) * 255, mask_path)
            lo.mask_cache = f"masks/{mask_path.name}"
        except BadItem as exc:
            lo.reason = exc.reason
        except Exception as exc:
            lo.reason = f"could not process mask: {type(exc).__name__}: {exc}"
        outcome.lesions.append(lo)
    image_path = cache_dir / "images" / f"{job.image_id}.png"
    _save_png_atomic(downsample(image.astype(np.uint16, copy=False), (ch, cw)), image_path)
    outcome.cache_path = f"images/{image_path.name}"
    return outcome


def _candidates(index: layouts.SeriesIndex, crop_path: str, mask_path: str) -> list[str]:
    """All files of the ROI series named by either column (crop and mask may sit in two series).

    One missing series of the two is fine (the mask may be in the other); when neither resolves,
    BadItem says why (e.g. "series ... not found"), not a vague "no readable file".
    """
    files: list[str] = []
    reasons: list[str] = []
    for raw in dict.fromkeys([crop_path, mask_path]):
        cbis = parse_cbis_path(raw)
        try:
            files.extend(str(p) for p in index.files_for(cbis))
        except BadItem as exc:
            reasons.append(exc.reason)
    if not files:
        raise BadItem(mask_path, "; ".join(dict.fromkeys(reasons)) or "the ROI series holds no file")
    return list(dict.fromkeys(files))


def _resolve_full_image(index: layouts.SeriesIndex, paths: list[str]) -> Path:
    """The file of the first full-image series that resolves.

    A mammogram listed both as Mass and as Calc has two full-image series with the same pixels; when
    one is missing (e.g. a failed download) the other still gives the image. BadItem with the first
    series' reason when none resolves.
    """
    first: BadItem | None = None
    for raw in paths:
        try:
            return index.files_for(parse_cbis_path(raw))[0]
        except (BadItem, ValueError) as exc:
            error = exc if isinstance(exc, BadItem) else BadItem(raw, str(exc))
            first = first or error
    raise first or BadItem("image", "no full-image path listed")


def _single_threaded_worker() -> None:
    """Pool initializer: one torch thread per worker process.

    Why: the workers are forked. When the parent has already run a parallel torch op (a model built,
    a checkpoint saved, an earlier stage in the same process), the child inherits a dead OpenMP thread
    pool and its first parallel region (``downsample``) waits for it forever: curation hangs with no
    error. With one thread torch never enters a parallel region; the workers are the parallelism.
    """
    torch.set_num_threads(1)


def _run_jobs(
    jobs: list[ImageJob], settings: CurationSettings, progress: Callable[[int, int], None] | None
) -> list[ImageOutcome]:
    """Every job in isolated worker processes (mammo_core.runtime.isolation), even with one worker: a decoder
    that crashes, eats the memory or never returns costs its own image (quarantined), not the stage."""
    results = run_isolated(
        process_image, jobs, workers=settings.workers, time_limit_s=settings.image_time_limit_s,
        initializer=_single_threaded_worker, progress=progress,
    )
    return [
        ImageOutcome(image_id=job.image_id, reason=f"could not process image: {result.reason}")
        if isinstance(result, ItemFailed) else result
        for job, result in zip(jobs, results, strict=True)
    ]


def curate(
    root: Path,
    layout: str,
    cache_dir: Path,
    settings: CurationSettings,
    progress: Callable[[int, int], None] | None = None,
) -> CurationResult:
    """Curate the dataset under ``root`` (in ``layout``) into tables and a cache under ``cache_dir``."""
    quarantine: list[dict] = []
    table = cbis_tables.load_case_tables(cbis_tables.find_case_csvs(root))
    for item, reason in zip(table.rejected["item"], table.rejected["reason"], strict=True):
        quarantine.append({"item": item, "kind": "csv_row", "reason": reason})
    images, lesions = cbis_tables.build_images(table.rows)
    images, split_stats = splits.assign_splits(images, settings.val_fraction, settings.split_seed)

    index = layouts.SeriesIndex.build(root, layout)
    (cache_dir / "images").mkdir(parents=True, exist_ok=True)
    (cache_dir / "masks").mkdir(parents=True, exist_ok=True)
    lesions_by_image = {k: g for k, g in lesions.groupby("image_id", sort=False)}
    jobs: list[ImageJob] = []
    for row in images.itertuples(index=False):
        try:
            full_file = _resolve_full_image(index, list(row.full_image_paths))
        except BadItem as exc:
            quarantine.append({"item": row.image_id, "kind": "image", "reason": exc.reason})
            continue
        lesion_jobs = []
        for lrow in lesions_by_image[row.image_id].itertuples(index=False):
            try:
                lesion_jobs.append(LesionJob(lrow.lesion_id, _candidates(index, lrow.crop_path, lrow.mask_path)))
            except BadItem as exc:
                quarantine.append({"item": lrow.lesion_id, "kind": "lesion", "reason": exc.reason})
            except ValueError as exc:
                quarantine.append({"item": lrow.lesion_id, "kind": "lesion", "reason": str(exc)})
        jobs.append(ImageJob(row.image_id, str(full_file), lesion_jobs, str(cache_dir), settings.max_side,
                             settings.min_box_area, settings.mask_aspect_tolerance, settings.max_image_bytes,
                             settings.allow_burned_in_annotation))

    outcomes = _run_jobs(jobs, settings, progress)
    return _assemble(images, lesions, outcomes, quarantine, split_stats, settings, n_csv_rows=len(table.rows))


def _assemble(
    images: pd.DataFrame,
    lesions: pd.DataFrame,
    outcomes: list[ImageOutcome],
    quarantine: list[dict],
    split_stats: dict,
    settings: CurationSettings,
    n_csv_rows: int,
) -> CurationResult:
    by_image = {o.image_id: o for o in outcomes}
    by_lesion: dict[str, LesionOutcome] = {}
    for o in outcomes:
        if o.reason:
            quarantine.append({"item": o.image_id, "kind": "image", "reason": o.reason})
        for lo in o.lesions:
            by_lesion[lo.lesion_id] = lo
            if lo.reason and not o.reason:
                quarantine.append({"item": lo.lesion_id, "kind": "lesion", "reason": lo.reason})
    good_images = {i for i, o in by_image.items() if not o.reason}
    if not good_images:
        reasons = Counter(q["reason"] for q in quarantine).most_common(3)
        raise RuntimeError(
            f"curation found no usable image among {len(images)} listed; most common reasons: {reasons}"
        )
    img = images[images["image_id"].isin(good_images)].copy()
    img["height"] = [by_image[i].height for i in img["image_id"]]
    img["width"] = [by_image[i].width for i in img["image_id"]]
    img["cache_height"] = [by_image[i].cache_height for i in img["image_id"]]
    img["cache_width"] = [by_image[i].cache_width for i in img["image_id"]]
    img["cache_path"] = [by_image[i].cache_path for i in img["image_id"]]
    img["scale"] = img["cache_width"] / img["width"]
    img["dicom_meta"] = [json.dumps(by_image[i].meta, sort_keys=True, default=str) for i in img["image_id"]]

    les = splits.attach_split(lesions[lesions["image_id"].isin(good_images)], img)
    ok = [bool(by_lesion.get(lid)) and not by_lesion[lid].reason for lid in les["lesion_id"]]
    les = les[ok].copy()
    boxes = [by_lesion[lid].boxes for lid in les["lesion_id"]]
    les["boxes"] = [[list(map(int, b)) for b in bs] for bs in boxes]
    les["n_regions"] = [len(b) for b in boxes]
    les["x0"] = [min(b[0] for b in bs) for bs in boxes]
    les["y0"] = [min(b[1] for b in bs) for bs in boxes]
    les["x1"] = [max(b[2] for b in bs) for bs in boxes]
    les["y1"] = [max(b[3] for b in bs) for bs in boxes]
    les["mask_area"] = [by_lesion[lid].mask_area for lid in les["lesion_id"]]
    les["mask_cache"] = [by_lesion[lid].mask_cache for lid in les["lesion_id"]]
    les["label"] = [labels.label_of(t, p, settings.classes)
                    for t, p in zip(les["abnormality_type"], les["pathology"], strict=True)]
    names = labels.class_names(settings.classes)
    les["class_name"] = [names[i] for i in les["label"]]
    img["n_lesions_ok"] = img["image_id"].map(les.groupby("image_id").size()).fillna(0).astype("int64")
    splits.check_patient_disjoint(img)

    q = pd.DataFrame(quarantine, columns=QUARANTINE_COLUMNS)
    report = {
        "csv_rows": int(n_csv_rows),
        "images_listed": int(len(images)),
        "images": int(len(img)),
        "lesions": int(len(les)),
        "patients": int(img["patient_id"].nunique()),
        "classes": names,
        "images_per_split": {s: int((img["split"] == s).sum()) for s in splits.SPLITS},
        "patients_per_split": {s: int(img.loc[img["split"] == s, "patient_id"].nunique()) for s in splits.SPLITS},
        "lesions_per_class_and_split": {
            s: {n: int(((les["split"] == s) & (les["class_name"] == n)).sum()) for n in names}
            for s in splits.SPLITS
        },
        "split_stats": split_stats,
        "quarantined": int(len(q)),
        "quarantined_per_kind": {k: int(v) for k, v in q["kind"].value_counts().items()},
        "quarantined_per_reason": {k: int(v) for k, v in q["reason"].value_counts().items()},
        "mass_and_calc_merged_images": int((img["abnormality_types"].str.len() > 1).sum()),
    }
    return CurationResult(images=img.reset_index(drop=True), lesions=les.reset_index(drop=True),
                          quarantine=q, report=report)
