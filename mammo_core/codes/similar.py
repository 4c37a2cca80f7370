"""Similar-case search: the k training lesions nearest to a new image by Hamming distance of hash codes.

A query goes through exactly what a training patch went through, so its code is comparable with the
database codes:

1. cut: a patch query is used whole (made square by zero padding); a full mammogram with a lesion box is
   cut like :mod:`mammo_core.data.patches` cuts lesions (square around the box, ``context`` margin, at least
   ``min_size_px`` cache pixels, placed by the patches' crop policy: shifted inside the image, padded
   only where the crop is longer than the image),
2. intensity: a full mammogram is mapped per image with the patches stage's mapping (``breast_window``:
   breast mask, [min, max inside the breast] -> [0, 255]); a patch query is taken to be a patch already
   (8-bit values as they are, 16-bit / 257), because re-windowing a patch on its own range would stretch
   its contrast away from the stored patches',
3. resize to the model's patch size, ImageNet normalisation (:func:`mammo_core.training.loop.prepare_images`),
4. per-branch features, fused with the features stage's weights (:func:`mammo_core.codes.features.fuse`),
5. binary code from the hashing stage's decoder, packed, Hamming k-NN with ties by database index.

Identifiers: CBIS lesion and image ids start with the patient id (``P_00003_RIGHT_CC_MASS_1``). Results
never carry a patient id: the index strips each row's patient id from its source id when it is built
(``RIGHT_CC_MASS_1``) and keeps the database ``row`` so a case can still be found in the store.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mammo_core.codes import features, retrieval
from mammo_core.data import patches
from mammo_core.data.dicom_io import read_image_file
from mammo_core.data.labels import PATHOLOGIES
from mammo_core.models.fused import FusedDenseNet
from mammo_core.models.hashing import FCDecoder, HashDecoder
from mammo_core.storage import h5io
from mammo_core.training.loop import prepare_images

MIN_SIDE_PX = 16  # a smaller query holds too little tissue to say anything about a lesion
MAMMOGRAPHY = "MG"
_BACKGROUND_CLASSES = ("NORMAL", "NOT_MALIGNANT")  # no single pathology (binary: normal and benign together)

Box = tuple[int, int, int, int]


def pathology_of(class_name: str) -> str | None:
    """The pathology a class name implies (``MASS_BENIGN_WITHOUT_CALLBACK`` -> ``BENIGN_WITHOUT_CALLBACK``)."""
    if class_name in _BACKGROUND_CLASSES:
        return None
    for pathology in sorted(PATHOLOGIES, key=len, reverse=True):
        if class_name == pathology or class_name.endswith(f"_{pathology}"):
            return pathology
    return None


def patient_free_id(source_id: str, patient_id: str) -> str:
    """``source_id`` without its patient id (and the separator after it)."""
    if not patient_id:
        return source_id
    out = source_id.replace(patient_id, "")
    out = out.strip("_-#/ ")
    return out or "(unnamed)"


def parse_box(text: str) -> Box:
    """``"x0,y0,x1,y1"`` (image pixels, exclusive ends) -> a box of ints."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(int(round(float(p))) for p in parts)
    except ValueError:
        raise ValueError(f"box {text!r} must be four numbers x0,y0,x1,y1") from None
    if len(values) != 4:
        raise ValueError(f"box {text!r} must be four numbers x0,y0,x1,y1, got {len(values)}")
    return values  # type: ignore[return-value]


def read_query_image(path: str | os.PathLike) -> np.ndarray:
    """A query image file (DICOM, PNG or JPEG) as uint16 via :func:`read_image_file`; DICOM must be MG.

    Raises :class:`~mammo_core.errors.BadItem` for unreadable files and ValueError naming the file and its
    modality for a DICOM of another modality (a CT slice or an ultrasound frame is no mammogram).
    """
    path = Path(path)
    image, meta = read_image_file(path)
    modality = meta.get("Modality")
    if modality is not None and str(modality).strip().upper() != MAMMOGRAPHY:
        raise ValueError(f"{path}: modality {modality!r} is not a mammogram ({MAMMOGRAPHY}); "
                         "similar-case search compares mammography patches only")
    return image


def read_code_database(codes_h5: str | os.PathLike, decoder: str, bits: int, split: str = "train"
                       ) -> dict[str, Any]:
    """One split of a hashing stage's ``codes.h5``: packed codes, labels, patient-free ids, class names.

    Patient ids are read only to strip them from the source ids; they are not returned.
    """
    path = Path(codes_h5)
    with h5io.open_for_reading(path) as fh:
        name = f"{decoder}/{bits}/{split}"
        if name not in fh:
            have = sorted(f"{d}/{q}" for d in fh if d not in ("labels", "patient_id", "source_id") for q in fh[d])
            raise ValueError(f"{path}: no codes {name!r}; the file holds {have}")
        codes = fh[name][:]
        labels = fh[f"labels/{split}"][:].astype(np.int64)
        source = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in fh[f"source_id/{split}"][:]]
        patients = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in fh[f"patient_id/{split}"][:]]
        class_names = json.loads(fh.attrs["class_names"])
        model_key = json.loads(fh.attrs["features_model_key"]) if "features_model_key" in fh.attrs else None
    return {"codes": codes, "labels": labels, "case_ids": [patient_free_id(s, p) for s, p in zip(source, patients,
                                                                                                  strict=True)],
            "class_names": list(class_names), "model_key": model_key}


def read_fusion_weights(fusion_json: str | os.PathLike) -> tuple[tuple[float, ...], str | None]:
    """The features stage's chosen fusion weights and the train key they were computed for."""
    data = json.loads(Path(fusion_json).read_text(encoding="utf-8"))
    return tuple(float(w) for w in data["weights"]), data.get("model_key")


@dataclass(frozen=True)
class SimilarCase:
    rank: int
    source_id: str  # patient-free (see the module docstring)
    class_name: str
    pathology: str | None
    distance: int
    row: int  # row of the database (the train split of codes.h5)

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "source_id": self.source_id, "class_name": self.class_name,
                "pathology": self.pathology, "distance": self.distance, "row": self.row}


class SimilarCaseIndex:
    """A trained fused model, its fusion weights, a hash decoder and the packed training codes."""

    def __init__(
        self,
        model: FusedDenseNet,
        fusion_weights: Sequence[float],
        decoder: HashDecoder | FCDecoder,
        codes: np.ndarray,
        case_ids: Sequence[str],
        labels: Sequence[int],
        class_names: Sequence[str],
        patch: patches.PatchSettings,
        *,
        cache_max_side: int | None = None,
        device: torch.device | str = "cpu",
    ):
        """``case_ids`` must already be patient-free (:func:`patient_free_id`); ``codes`` packed uint8 rows.

        ``patch`` is how the patches stage cut and mapped its patches (``size`` = the model's patch size);
        ``cache_max_side`` the curate stage's cache resolution, in which ``min_size_px`` is counted.
        """
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[0] == 0:
            raise ValueError(f"the code database is empty (codes of shape {codes.shape}): there is nothing to search")
        if not len(codes) == len(case_ids) == len(labels):
            raise ValueError(f"database rows disagree: {len(codes)} codes, {len(case_ids)} ids, {len(labels)} labels")
        if codes.shape[1] != math.ceil(decoder.q / 8):
            raise ValueError(f"database codes have {codes.shape[1]} bytes per row, the decoder makes {decoder.q}-bit "
                             f"codes ({math.ceil(decoder.q / 8)} bytes)")
        labels = np.asarray(labels, dtype=np.int64)
        if labels.min() < 0 or labels.max() >= len(class_names):
            raise ValueError(f"database labels outside [0, {len(class_names)}) for classes {list(class_names)}")
        if len(fusion_weights) != len(model.branches):
            raise ValueError(f"{len(fusion_weights)} fusion weights for {len(model.branches)} branches")
        self.model = model.to(device).eval()
        self.device = device
        self.fusion_weights = tuple(float(w) for w in fusion_weights)
        self.decoder = decoder.eval()
        self.database = retrieval.HammingIndex.from_packed(codes)
        self.case_ids = tuple(str(s) for s in case_ids)
        self.labels = labels
        self.class_names = tuple(class_names)
        self.patch = patch
        self.cache_max_side = cache_max_side

    def __len__(self) -> int:
        return len(self.database)

    # -- image -> patch ------------------------------------------------------------------------------
    def query_patch(self, image: np.ndarray, box: Sequence[int] | None = None) -> np.ndarray:
        """The (size, size) uint8 patch a query image becomes (see the module docstring, steps 1-3)."""
        image, box = check_query(image, box)
        h, w = image.shape
        s = self.patch
        if box is None:
            unit = patches.to_unit_range(image, np.ones(image.shape, dtype=bool), "global")
            crop_box = patches.lesion_crop_box((0, 0, w, h), 0.0, 1.0)
        else:
            scale = 1.0 if self.cache_max_side is None else min(1.0, self.cache_max_side / max(h, w))
            mask = patches.breast_mask(image, s.breast_threshold)
            unit = patches.to_unit_range(image, mask, s.intensity)
            crop_box = patches.lesion_crop_box(box, s.context, s.min_size_px / scale)
        crop = patches.cut_crop(unit, crop_box)
        return patches.to_uint8(patches.resize_square(crop, s.size))

    # -- patch -> code ------------------------------------------------------------------------------
    def fused_features(self, patch_batch: np.ndarray) -> np.ndarray:
        """(N, S, S) uint8 patches -> (N, D) fused features, weighted as the features stage chose."""
        x = torch.from_numpy(np.ascontiguousarray(patch_batch, dtype=np.uint8))[:, None]
        with torch.inference_mode():
            per_branch = self.model.features(prepare_images(x, self.device))
        branches = {b: per_branch[b].float().cpu().numpy() for b in features.BRANCH_DATASETS}
        return features.fuse(branches, self.fusion_weights)

    def encode(self, patch_batch: np.ndarray) -> np.ndarray:
        """(N, S, S) uint8 patches -> packed codes (N, ceil(q / 8)) uint8, the ``codes.h5`` layout."""
        return retrieval.pack_codes(self.decoder.encode(self.fused_features(patch_batch)))

    # -- search -------------------------------------------------------------------------------------
    def search(self, image: np.ndarray, box: Sequence[int] | None = None, k: int = 5) -> list[SimilarCase]:
        """The ``k`` nearest database cases, nearest first, equal distances in database order."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        code = self.encode(self.query_patch(image, box)[None])[0]
        rows, dist = retrieval.knn(code, self.database, k)
        out = []
        for rank, (row, d) in enumerate(zip(rows.tolist(), dist.tolist(), strict=True), start=1):
            name = self.class_names[int(self.labels[row])]
            out.append(SimilarCase(rank, self.case_ids[row], name, pathology_of(name), int(d), int(row)))
        return out

    def query(self, image: np.ndarray, box: Sequence[int] | None = None, k: int = 5) -> list[dict[str, Any]]:
        """:meth:`search` as plain dicts: rank, source_id, class_name, pathology, distance, row."""
        return [case.to_dict() for case in self.search(image, box, k)]


def check_query(image: np.ndarray, box: Sequence[int] | None = None) -> tuple[np.ndarray, Box | None]:
    """The query image and box, validated (ValueError saying what is wrong); cheap, so callers can check early."""
    image = _check_image(image)
    return image, (None if box is None else _check_box(box, image.shape))


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        raise ValueError(f"the query image has {image.shape[-1]} channels (shape {image.shape}); "
                         "expected one grey channel (H, W)")
    if image.ndim != 2:
        raise ValueError(f"the query image must be 2-D (H, W) grey, got shape {image.shape}")
    if image.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"the query image must be uint8 or uint16, got {image.dtype}")
    if min(image.shape) < MIN_SIDE_PX:
        raise ValueError(f"the query image is {image.shape[1]}x{image.shape[0]} pixels; "
                         f"at least {MIN_SIDE_PX} pixels per side are needed")
    return image


def _check_box(box: Sequence[int], shape: tuple[int, int]) -> Box:
    if len(box) != 4:
        raise ValueError(f"box must be (x0, y0, x1, y1), got {tuple(box)}")
    x0, y0, x1, y1 = (int(v) for v in box)
    h, w = shape
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {(x0, y0, x1, y1)} is empty: need x0 < x1 and y0 < y1")
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
        raise ValueError(f"box {(x0, y0, x1, y1)} lies outside the {w}x{h} image "
                         "(x0,y0,x1,y1 in image pixels, exclusive ends)")
    return x0, y0, x1, y1
