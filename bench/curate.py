"""Curation throughput: images/s with 1 and 2 decoding workers, side by side on the same phantom tree.

Prints one JSON line. Usage: python bench/curate.py [--patients N] [--height H] [--width W]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mammo_core.data import curation, layouts  # noqa: E402
from mammo_core.sources.phantom import generate_phantom  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--patients", type=int, default=24)
    ap.add_argument("--height", type=int, default=2048)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "raw"
        generate_phantom(root, n_patients=args.patients, seed=0, image_shape=(args.height, args.width))
        layout = layouts.detect_layout(root)
        figures: dict[str, float] = {}
        n_images = 0
        for repeat in range(args.repeats):  # interleave 1 and 2 workers so machine noise hits both
            for workers in (1, 2):
                settings = curation.CurationSettings(workers=workers, max_side=1024)
                start = time.perf_counter()
                result = curation.curate(root, layout, Path(tmp) / f"cache{workers}_{repeat}", settings)
                seconds = time.perf_counter() - start
                n_images = result.report["images"]
                key = f"images_per_s_{workers}w"
                figures[key] = max(figures.get(key, 0.0), n_images / seconds)
        print(json.dumps({
            "bench": "curate",
            "images": n_images,
            "image_shape": [args.height, args.width],
            "cpus": os.cpu_count(),
            **{k: round(v, 2) for k, v in figures.items()},
            "speedup_2w": round(figures["images_per_s_2w"] / figures["images_per_s_1w"], 2),
        }))


if __name__ == "__main__":
    main()
