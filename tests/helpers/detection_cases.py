"""Constructed detection cases with known outcomes, and detect stage folders holding them as the stage saves them.

Each image has one lesion; a detector either finds it (a box on it, right class, score 0.8) or not, and every
image also gets one false positive (score 0.3) far from the lesion. Which images a detector finds is given,
so that two detectors' difference is known by construction.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from mammo_core.detection import data, records

CLASSES = ["MASS_BENIGN", "MASS_MALIGNANT", "CALC_BENIGN", "CALC_MALIGNANT"]
PER_PATIENT = 2


def targets(n_images: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n_images):
        x, y = 20.0 + 7 * (i % 9), 30.0 + 5 * (i % 11)
        out.append({"boxes": torch.tensor([[x, y, x + 30.0, y + 24.0]]),
                    "labels": torch.tensor([i % len(CLASSES) + 1])})
    return out


def detections(truth: Sequence[Mapping[str, torch.Tensor]], found: Sequence[bool]) -> list[dict[str, torch.Tensor]]:
    """Per image: the lesion found (IoU ~0.9, right class, score 0.8) where ``found``, plus one false positive."""
    out = []
    for t, hit in zip(truth, found, strict=True):
        false_box = torch.tensor([[200.0, 200.0, 230.0, 224.0]])
        boxes = [t["boxes"] + torch.tensor([[1.0, 1.0, 1.0, 1.0]]), false_box] if hit else [false_box]
        labels = [t["labels"], t["labels"]] if hit else [t["labels"]]
        scores = [0.8, 0.3] if hit else [0.3]
        out.append({"boxes": torch.cat(boxes), "scores": torch.tensor(scores), "labels": torch.cat(labels)})
    return out


def patients(n_images: int) -> list[int]:
    return [i // PER_PATIENT for i in range(n_images)]


def items(truth: Sequence[Mapping[str, torch.Tensor]], split: str, key_prefix: str = "") -> list[data.DetectionImage]:
    """Detector inputs carrying the truth, patient ordinals and the image/patient keys the stage saves."""
    return [data.DetectionImage(i, split, torch.zeros(1, 8, 8), t["boxes"], t["labels"], (0, 0), 1.0, 1.0,
                                i // PER_PATIENT, data.pseudonym(f"{key_prefix}img-{split}-{i}"),
                                data.pseudonym(f"{key_prefix}P-{i // PER_PATIENT}"))
            for i, t in enumerate(truth)]


def write_detect_folder(folder: Path, by_split: Mapping[str, tuple[Sequence, Mapping[str, Sequence]]],
                        order: Sequence[int] | None = None) -> Path:
    """A detect stage folder: detection.json (classes) and, per split, ``(truth, {model: predictions})`` saved
    with :func:`mammo_core.detection.records.write_split`; ``order``: the images' position order (a run that
    listed the same images differently)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, (truth, predictions) in by_split.items():
        images = items(truth, split)
        idx = list(order) if order is not None else list(range(len(truth)))
        records.write_split(folder, split, {m: [p[i] for i in idx] for m, p in predictions.items()},
                            [images[i] for i in idx])
    (folder / "detection.json").write_text(json.dumps({"classes": CLASSES, "rows": []}), encoding="utf-8")
    (folder / "manifest.json").write_text(json.dumps({"stage": "detect", "key": folder.name}), encoding="utf-8")
    return folder
