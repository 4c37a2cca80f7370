"""Padded pixels of lesion and NORMAL patches in a store's patches stage, and the shortcut probe on them.

Works on a patches.h5 of any version: the share of each crop outside its image is recomputed from the
stored crop box and the image's cache size (curate's images.parquet), so the same command measures a store
built before the one-crop-policy change (lesion crops zero-padded, NORMAL crops inside) and one after it.

Prints one JSON line: per kind (lesion / NORMAL), the number of patches, the share with more than 5 %
padded pixels, the share with any, the mean padded share; and the probe's test accuracy and balanced
accuracy per target and model (:mod:`mammo_core.evaluation.shortcut_probe`).
Usage: python bench/patch_padding.py STORE/stages/patches/KEY [--n-boot 1000] (its curate folder is the one
its manifest names upstream, in the same store)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mammo_core.data import labels, patches  # noqa: E402
from mammo_core.evaluation import shortcut_probe  # noqa: E402
from mammo_core.storage import h5io  # noqa: E402


def _curate_dir(patch_dir: Path) -> Path:
    manifest = json.loads((patch_dir / "manifest.json").read_text(encoding="utf-8"))
    return patch_dir.parents[1] / "curate" / manifest["upstream"]["curate"]


def measure(patch_dir: Path, n_boot: int) -> dict:
    curate_dir = _curate_dir(patch_dir)
    data = h5io.read_datasets(patch_dir / "patches.h5", ["images", "box", "labels", "split", "patient_id", "image_id"])
    images = pd.read_parquet(curate_dir / "images.parquet").set_index("image_id")
    shapes = {str(i): (int(r.cache_height), int(r.cache_width)) for i, r in images.iterrows()}
    image_ids = h5io.decode_strings(data["image_id"])
    padded = np.array([patches.padded_fraction(tuple(int(v) for v in box), shapes[i])
                       for box, i in zip(data["box"], image_ids, strict=True)])
    y = np.asarray(data["labels"], dtype=np.int64)
    lesion = y != labels.NORMAL_LABEL
    kinds = {}
    for kind, rows in (("lesion", lesion), ("NORMAL", ~lesion)):
        kinds[kind] = {"n": int(rows.sum()), "share_over_5pct_padded": float((padded[rows] > 0.05).mean()),
                       "share_any_padding": float((padded[rows] > 0).mean()),
                       "mean_padded": float(padded[rows].mean()),
                       "mean_black_pixels": float((data["images"][rows] == 0).mean())}
    stats = shortcut_probe.patch_statistics(data["images"], data["box"], padded)
    groups = np.asarray(h5io.decode_strings(data["patient_id"]), dtype=object)
    split = np.asarray(data["split"])
    probe = {}
    for target, target_y in (("lesion_vs_normal", lesion.astype(np.int64)), ("task_classes", y)):
        for set_name, columns in shortcut_probe.FEATURE_SETS.items():
            chosen = stats[:, [shortcut_probe.FEATURES.index(c) for c in columns]]
            for r in shortcut_probe.fit_and_score(chosen, target_y, split, groups, target, n_boot):
                probe[f"{target}/{set_name}/{r['model']}"] = {
                    k: r.get(k) for k in ("test_acc", "test_acc_ci_low", "test_acc_ci_high", "balanced_acc",
                                          "balanced_acc_ci_low", "balanced_acc_ci_high", "chance_balanced_acc")}
    return {"patches": str(patch_dir), "padding": kinds, "probe": probe}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("patches_dir", type=Path)
    parser.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args()
    print(json.dumps(measure(args.patches_dir, args.n_boot), sort_keys=True))


if __name__ == "__main__":
    main()
