"""The served lesion detector as plain code (no MLflow): full mammogram -> boxes with class and score.

``tasks.serving.detector`` wraps :class:`DetectorPipeline` for ``mlflow.pyfunc`` and logs/registers it;
``mammo predict`` also uses :func:`read_mammogram` and :func:`save_overlay` directly.

Preprocessing is the detect stage's (``mammo_core.detection.data.prepare_image``): breast mask, the
``breast_window`` intensity window, crop to the breast, resize to long side ``input_size``. Boxes are mapped
back to pixels of the file as read (DICOM in display orientation; PNG/JPEG of any size and bit depth), so
they overlay the original. An image without breast tissue or a DICOM without pixel data is an error for
that input only; a weights file for other classes is refused at load time with the file named.

Served paths are read only under the root given at serve time (``mammo_core.inference.served_inputs``; none by
default, so a server started without one refuses every path with the same message), and decoded images
and requests are capped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw

from mammo_core.data.patches import breast_mask, to_unit_range
from mammo_core.detection.builders import DetectorConfig, load_detector
from mammo_core.detection.data import prepare_image
from mammo_core.detection.engine import as_input
from mammo_core.errors import BadItem
from mammo_core.inference.served_inputs import ServeLimits, without_path
from mammo_core.storage.durable import atomic_path

COLUMNS = ["input", "x0", "y0", "x1", "y1", "class", "score", "error"]
COLOURS = ("#ff5555", "#55ff55", "#5599ff", "#ffcc33", "#ff66ff", "#66ffff")


@dataclass
class Detection:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels of the original image
    label: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"box": [round(v, 2) for v in self.box], "class": self.label, "score": round(self.score, 4)}


def read_mammogram(path: str | os.PathLike) -> np.ndarray:
    """uint16 image of a DICOM/PNG/JPEG (8-bit files scaled by 257); BadItem (reason only) when unusable."""
    from mammo_core.data.dicom_io import read_image_file

    image, _ = read_image_file(Path(path))
    if image.ndim != 2 or min(image.shape) < 8:
        raise BadItem("image", f"expected a 2-D image of at least 8x8 pixels, got shape {image.shape}")
    return image


def windowed(image: np.ndarray) -> np.ndarray:
    """uint8 display image on the detector's intensity window (what the overlay is drawn on)."""
    unit = to_unit_range(image, breast_mask(image), "breast_window")
    return np.clip(np.rint(unit), 0, 255).astype(np.uint8)


def save_overlay(image: np.ndarray, detections: list[Detection], path: str | os.PathLike) -> Path:
    """PNG of the windowed image with each box, class and score drawn; written atomically."""
    rgb = Image.fromarray(windowed(image)).convert("RGB")
    draw = ImageDraw.Draw(rgb)
    width = max(1, round(max(image.shape) / 400))
    for d in detections:
        colour = COLOURS[hash(d.label) % len(COLOURS)]
        draw.rectangle(d.box, outline=colour, width=width)
        draw.text((d.box[0], max(0.0, d.box[1] - 12)), f"{d.label} {d.score:.2f}", fill=colour)
    path = Path(path)
    with atomic_path(path) as tmp:
        rgb.save(tmp, format="PNG")
    return path


class DetectorPipeline:
    """The served detector as plain objects (no MLflow): what :class:`DetectorModel` runs."""

    def __init__(self, model: torch.nn.Module, config: DetectorConfig):
        self.model = model.eval()
        self.config = config

    @classmethod
    def load(cls, files: Mapping[str, str | os.PathLike]) -> DetectorPipeline:
        config = DetectorConfig.from_dict(json.loads(Path(files["config"]).read_text(encoding="utf-8")))
        return cls(load_detector(files["weights"], config), config)

    @torch.inference_mode()
    def detect(self, image: np.ndarray, min_score: float = 0.05) -> list[Detection]:
        """Boxes in the image's own pixels, highest score first."""
        prepared = prepare_image(image, self.config.input_size)
        if prepared is None:
            raise BadItem("image", "no breast tissue found (blank or constant image)")
        tensor, (cx, cy), scale = prepared
        out = self.model([as_input(tensor, "cpu")])[0]
        h, w = image.shape
        found = []
        for box, label, score in zip(out["boxes"].tolist(), out["labels"].tolist(), out["scores"].tolist(),
                                     strict=True):
            if score < min_score:
                continue
            x0, y0, x1, y1 = (box[0] / scale + cx, box[1] / scale + cy, box[2] / scale + cx, box[3] / scale + cy)
            found.append(Detection((min(max(x0, 0.0), w), min(max(y0, 0.0), h), min(max(x1, 0.0), w),
                                    min(max(y1, 0.0), h)), self.config.classes[int(label) - 1], float(score)))
        return sorted(found, key=lambda d: -d.score)

    def predict_frame(self, frame: pd.DataFrame, min_score: float = 0.05,
                      limits: ServeLimits | None = None) -> pd.DataFrame:
        """Rows with ``path`` -> one row per detection (``input`` = 1-based row), or one row with ``error``.

        ``limits`` (default: no path allowed) decides which files may be read and how large they may be.
        """
        limits = limits or ServeLimits()
        if "path" not in frame.columns:
            raise ValueError(f"input needs a column 'path' (mammogram files), got {list(frame.columns)}")
        limits.check_rows(len(frame))
        rows = []
        for i, path in enumerate(frame["path"].astype(str).tolist(), start=1):
            try:
                resolved = limits.allowed_file(path, f"input {i}")
                image = read_mammogram(resolved)
                limits.check_pixels(image.shape, f"input {i}")
                for d in self.detect(image, min_score):
                    rows.append({"input": i, "x0": d.box[0], "y0": d.box[1], "x1": d.box[2], "y1": d.box[3],
                                 "class": d.label, "score": d.score, "error": ""})
            except BadItem as exc:  # the reason only: CBIS file names carry patient ids
                reason = without_path(exc.reason, path, f"input {i}")
                rows.append({"input": i, "x0": np.nan, "y0": np.nan, "x1": np.nan, "y1": np.nan, "class": "",
                             "score": np.nan, "error": reason})
        return pd.DataFrame(rows, columns=COLUMNS)
