"""The names of every stage's output files, spelled once: the contract between a stage and its readers.

Why: a stage writes ``fusion.json`` and the report, the served classifier and similar-case search read it;
when each spelled the name itself, renaming a file in one place broke a reader silently (it found no file
and showed "not run"). Every writer and reader names a file here, by stage: ``stage_files.FEATURES.fusion``
is the ``fusion.json`` of a features folder. Plain strings, relative to the stage's sealed folder
(``<store>/stages/<stage>/<key>/``); ``manifest.json`` is :data:`mammo_core.storage.store.MANIFEST`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AcquireFiles:
    source: str = "source.json"  # where the raw data came from (phantom, local tree, TCIA), for the model card


@dataclass(frozen=True)
class CurateFiles:
    images: str = "images.parquet"  # one row per usable image: split, cache path, scale
    lesions: str = "lesions.parquet"  # one row per lesion: class, box, image id
    quarantine: str = "quarantine.parquet"  # items left out, with their reason
    report: str = "curation_report.json"  # counts per split and class, what was quarantined


@dataclass(frozen=True)
class PatchesFiles:
    patches: str = "patches.h5"
    summary: str = "patches_summary.json"
    shortcut_probe: str = "shortcut_probe.json"


@dataclass(frozen=True)
class AugmentFiles:
    augmented: str = "train_augmented.h5"
    preview: str = "augment_preview.png"


@dataclass(frozen=True)
class TrainFiles:
    weights: str = "weights.pt"
    model_config: str = "model_config.json"
    predictions: str = "predictions.h5"  # per-branch test predictions (Tables 2-3 inputs)
    history: str = "history.json"  # per-epoch losses and validation accuracy (Figure 11)


@dataclass(frozen=True)
class FeaturesFiles:
    features: str = "features.h5"
    fusion: str = "fusion.json"  # the branch fusion weights chosen on validation
    fusion_grid: str = "fusion_grid.csv"


@dataclass(frozen=True)
class HashingFiles:
    codes: str = "codes.h5"
    summary: str = "hashing.json"  # code lengths, the decoder served, retrieval MAP
    map_table: str = "table4_map.csv"
    map_by_seed: str = "table4_map_by_seed.csv"
    bit_statistics: str = "bit_statistics.csv"


@dataclass(frozen=True)
class ClassifyFiles:
    summary: str = "classifier.json"
    model: str = "fusion.skops"
    predictions: str = "predictions.csv"  # per patch, val and test: what promote / compare pair on
    latency: str = "latency.json"
    pairs_table: str = "table2_pairs.csv"
    errors_table: str = "table3_errors.csv"
    classifiers_table: str = "table5_classifiers.csv"


@dataclass(frozen=True)
class DetectFiles:
    summary: str = "detection.json"
    table: str = "table8_detection.csv"
    weights: str = "detector.pt"
    config: str = "detector_config.json"
    history: str = "history.json"
    detections: str = "test_detections.parquet"
    truth: str = "test_truth.parquet"
    test_images: str = "test_images.parquet"
    val_detections: str = "val_detections.parquet"
    val_truth: str = "val_truth.parquet"
    val_images: str = "val_images.parquet"

    def split_files(self, split: str) -> tuple[str, str, str]:
        """(detections, truth, images) of one split: what the paired detector comparisons read."""
        by_split = {"test": (self.detections, self.truth, self.test_images),
                    "val": (self.val_detections, self.val_truth, self.val_images)}
        return by_split[split]


@dataclass(frozen=True)
class BaselinesFiles:
    summary: str = "baselines.json"
    curves: str = "val_curves.json"
    predictions: str = "predictions.csv"  # every single network's test predictions
    freeze3_fusion: str = "freeze3_fusion.json"
    freeze3_fusion_predictions: str = "freeze3_fusion_predictions.csv"


@dataclass(frozen=True)
class ReportFiles:
    markdown: str = "report.md"
    html: str = "report.html"


ACQUIRE = AcquireFiles()
CURATE = CurateFiles()
PATCHES = PatchesFiles()
AUGMENT = AugmentFiles()
TRAIN = TrainFiles()
FEATURES = FeaturesFiles()
HASHING = HashingFiles()
CLASSIFY = ClassifyFiles()
DETECT = DetectFiles()
BASELINES = BaselinesFiles()
REPORT = ReportFiles()
BY_STAGE = {"acquire": ACQUIRE, "curate": CURATE, "patches": PATCHES, "augment": AUGMENT, "train": TRAIN,
            "features": FEATURES, "hashing": HASHING, "classify": CLASSIFY, "detect": DETECT,
            "baselines": BASELINES, "report": REPORT}
