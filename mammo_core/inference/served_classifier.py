"""The served patch classifier as plain code (no MLflow): inputs -> patches -> branches -> fusion -> codes
-> SVM/kNN/RF -> a table of probabilities, predicted class and per-row error.

``tasks.serving.classifier`` wraps :class:`ClassifierPipeline` for ``mlflow.pyfunc`` and logs/registers it;
the classify stage times it (Table 6) through the same object, so what is timed is what is served.

Intensity (what a caller's patch must look like). The patches stage maps each *whole image* onto 0..255
(``breast_window``: the image's minimum to its maximum inside the breast; ``global``: a fixed scale) before
cropping, and stores uint8 patches. A served patch is handled as follows:

- 8-bit input (a uint8 array, an 8-bit PNG, or integer values all within 0..255) is taken to be on that
  scale already, i.e. a patch as the patches stage writes it; it is only resized. For such patches the
  served prediction equals the pipeline's own, bit for bit.
- 16-bit input (a uint16 array, a 16-bit PNG, any DICOM, or integer values above 255) is a raw crop. It
  goes through the same function the patches stage uses (``mammo_core.data.patches.to_unit_range``) with the
  patch standing in for its image: ``global`` divides by 257; ``breast_window`` stretches the patch's own
  minimum..maximum onto 0..255 (the whole image's window is not available from a crop, so this is an
  approximation: the lesion's contrast against its surroundings is kept, the absolute level is not).
- Then, as in the patches stage: bilinear antialiased resize to the training patch size (a non-square
  input is stretched; crop it square first), rounding to uint8, ImageNet normalisation.

MLflow's schema enforcement turns array cells into int64, so the bit depth of arrays that went through
``pyfunc.load_model(...).predict`` is decided by their values (above 255 means 16-bit).

Served inputs: the ``path`` column is read only under the root given at serve time and arrays, images and
requests are capped (``mammo_core.inference.served_inputs``); with no root configured only arrays are served.
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

from mammo_core.codes import features, model_io
from mammo_core.data import patches
from mammo_core.errors import BadItem
from mammo_core.inference.served_inputs import ServeLimits, without_path
from mammo_core.models.fused import FusedDenseNet
from mammo_core.models.hashing import build_decoder
from mammo_core.training.loop import prepare_images

PREDICTED = "predicted_class"
ERROR = "error"
BATCH = 64


# --------------------------------------------------------------------------------------------- inputs


def _bit_depth(array: np.ndarray) -> int:
    if array.dtype == np.uint8:
        return 8
    if array.dtype == np.uint16:
        return 16
    return 8 if array.size == 0 or int(array.max()) <= 255 else 16


def as_patch_array(value: Any, item: str) -> np.ndarray:
    """A 2-D integer patch (uint8 or uint16) from an array or nested lists; BadItem when it is not one."""
    try:
        array = np.asarray(value)
        if array.dtype == object:  # a column of lists may come back as an object array of 1-D arrays
            array = np.stack([np.asarray(row) for row in value])
    except (ValueError, TypeError) as exc:
        raise BadItem(item, f"image is not a rectangular array: {exc}") from None
    if array.ndim != 2 or min(array.shape) < 1:
        raise BadItem(item, f"image must be a non-empty 2-D array, got shape {array.shape}")
    if array.dtype.kind not in "ui":
        if array.dtype.kind == "f" and np.all(np.isfinite(array)) and np.all(array == np.rint(array)):
            array = array.astype(np.int64)
        else:
            raise BadItem(item, f"image must hold integers (uint8 or uint16 values), got {array.dtype}")
    if int(array.min()) < 0 or int(array.max()) > 65535:
        raise BadItem(item, f"image values outside 0..65535 ({int(array.min())}..{int(array.max())})")
    return array.astype(np.uint8 if _bit_depth(array) == 8 else np.uint16, copy=False)


def read_patch_file(path: str | os.PathLike) -> np.ndarray:
    """A PNG/JPEG/DICOM patch as uint8 (8-bit sources) or uint16 (16-bit PNG, DICOM in display orientation).

    Reading goes through ``mammo_core.data.dicom_io.read_image_file``, which lets no DICOM header value out.
    """
    from mammo_core.data.dicom_io import read_image_file

    image, meta = read_image_file(Path(path))
    if meta.get("source_bits") == 8:  # read_image_file scaled 8-bit values by 257; undo it exactly
        return (image // 257).astype(np.uint8)
    return image


def preprocess_patch(patch: np.ndarray, size: int, intensity: patches.Intensity) -> np.ndarray:
    """uint8 (size, size) on the patches stage's scale (see the module docstring for the rules)."""
    if patch.dtype == np.uint8:
        unit = patch.astype(np.float32)
    else:
        unit = patches.to_unit_range(patch, np.ones(patch.shape, dtype=bool), intensity)
    return np.clip(np.rint(patches.resize_square(unit, size)), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------- pipeline


@dataclass
class ClassifierPipeline:
    """The served chain, as plain objects (no MLflow): what :class:`ClassifierModel` runs."""

    network: FusedDenseNet
    fusion_weights: tuple[float, ...]
    decoder: torch.nn.Module
    classifier: Any  # mammo_core.codes.classifiers.FusedClassifier
    class_names: list[str]
    patch_size: int
    intensity: patches.Intensity

    @classmethod
    def load(cls, files: Mapping[str, str | os.PathLike], expected_sha256: str) -> ClassifierPipeline:
        """Build from the artifact files (``weights``, ``model_config``, ``fusion``, ``decoder``, ``hashing``,
        ``classifier_model``, ``classifier``, ``preprocessing``); refuses a skops file of another sha256."""
        def read(name: str) -> dict:
            return json.loads(Path(files[name]).read_text(encoding="utf-8"))

        config, fusion, hashing_cfg = read("model_config"), read("fusion"), read("hashing")
        classifier_cfg, prep = read("classifier"), read("preprocessing")
        network = FusedDenseNet(config["num_classes"], config["freeze_upto"])
        network.load_state_dict(torch.load(files["weights"], map_location="cpu", weights_only=True))
        kind, bits = classifier_cfg["codes"].split("@")
        decoder = build_decoder(kind, hashing_cfg["in_dim"], int(bits), hashing_cfg["beta"], hashing_cfg["eps"], 0)
        decoder.load_state_dict(torch.load(files["decoder"], map_location="cpu", weights_only=True))
        classifier = model_io.load_model(files["classifier_model"], expected_sha256)
        class_names = list(classifier_cfg["class_names"])
        if list(config["class_names"]) != class_names:
            raise ValueError(f"class names differ between the network {config['class_names']} and the "
                             f"classifier {class_names}")
        if int(classifier.n_features_in_) != int(bits):
            raise ValueError(f"code length mismatch: the classifier expects {classifier.n_features_in_} bits, "
                             f"the decoder gives {bits}")
        return cls(network.eval(), tuple(float(w) for w in fusion["weights"]), decoder.eval(), classifier,
                   class_names, int(config["patch_size"]), prep["intensity"])

    @torch.inference_mode()
    def codes(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S) patches on the training scale -> binary codes (N, bits) uint8."""
        if len(images) == 0:
            return np.zeros((0, int(self.classifier.n_features_in_)), dtype=np.uint8)
        fused = []
        for start in range(0, len(images), BATCH):
            block = torch.from_numpy(np.ascontiguousarray(images[start:start + BATCH]))[:, None]
            feats = self.network.features(prepare_images(block, "cpu"))
            fused.append(features.fuse({b: f.numpy() for b, f in feats.items()}, self.fusion_weights))
        return self.decoder.encode(np.concatenate(fused))

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S) -> class probabilities (N, classes), columns in ``class_names`` order."""
        from mammo_core.codes.classifiers import align_proba

        proba = self.classifier.predict_proba(self.codes(images))
        return align_proba(proba, self.classifier.classes_, list(range(len(self.class_names))))

    def predict_frame(self, frame: pd.DataFrame, limits: ServeLimits | None = None) -> pd.DataFrame:
        """Rows with ``image`` (array/lists) or ``path`` (PNG/DICOM) -> probabilities, predicted class, error.

        ``limits`` (default: no path allowed, default caps) decides which paths may be read and how large an
        input may be. A row that cannot be used gets NaN probabilities and its reason in ``error``; the
        others go on.
        """
        limits = limits or ServeLimits()
        if not isinstance(frame, pd.DataFrame):
            frame = pd.DataFrame(frame)
        if "image" not in frame.columns and "path" not in frame.columns:
            raise ValueError(f"input needs a column 'image' (patch arrays) or 'path' (patch files), "
                             f"got {list(frame.columns)}")
        limits.check_rows(len(frame))
        images, rows, errors = [], [], [""] * len(frame)
        for i in range(len(frame)):
            row = frame.iloc[i]
            image = row["image"] if "image" in frame.columns else None
            path = row["path"] if "path" in frame.columns else None
            path = str(path) if isinstance(path, str | os.PathLike) else ""
            try:
                if image is not None and not (np.isscalar(image) and pd.isna(image)):
                    limits.check_nested(image, f"row {i}")
                    patch = as_patch_array(image, f"row {i}")
                elif path:
                    resolved = limits.allowed_file(path, f"row {i}")
                    patch = read_patch_file(resolved)
                    limits.check_pixels(patch.shape, f"row {i}")
                else:
                    raise BadItem(f"row {i}", "neither 'image' nor 'path' is given")
                images.append(preprocess_patch(patch, self.patch_size, self.intensity))
                rows.append(i)
            except BadItem as exc:  # the reason, never the path: CBIS file names carry patient ids
                errors[i] = without_path(exc.reason, path, f"row {i}")
        proba = np.full((len(frame), len(self.class_names)), np.nan)
        if rows:
            proba[rows] = self.predict_proba(np.stack(images))
        out = pd.DataFrame(proba, columns=self.class_names, index=frame.index)
        out[PREDICTED] = [self.class_names[int(np.argmax(p))] if not e else "" for p, e in zip(proba, errors,
                                                                                                  strict=True)]
        out[ERROR] = errors
        return out
