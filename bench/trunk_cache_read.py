"""Reading a batch back from the on-disk trunk cache: h5py point selection vs one row slice per index.

The train stage's cached mode keeps the frozen trunk's output of every training patch; beyond its memory
budget (``mammo_core.training.loop.cache_budget_bytes``) it goes to a scratch HDF5 file, one chunk per row,
and each batch reads its rows back in random order. This writes such a file (``--rows`` rows of the
paper-sized trunk output, 512 x 28 x 28 float32 for a 224-px patch: 1.6 MB each) and times both ways of
reading ``--batch`` random rows, interleaved, median of ``--repeats``; both must return the same array.

Prints one JSON line. Usage: python bench/trunk_cache_read.py [--rows 710] [--batch 32] [--repeats 9]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mammo_core.training.loop import read_rows  # noqa: E402

SHAPE = (512, 28, 28)  # the fused DenseNet's trunk output for a 224-px patch


def point_selection(dataset: h5py.Dataset, idx: np.ndarray) -> np.ndarray:
    """The previous read: h5py's list-of-indices selection (indices must increase), reordered after."""
    order = np.argsort(idx)
    rows = dataset[idx[order]]
    out = np.empty_like(rows)
    out[order] = rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=710)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trunk_cache.h5"
        with h5py.File(path, "w") as fh:
            rows = fh.create_dataset("trunk", (args.rows, *SHAPE), dtype="f4", chunks=(1, *SHAPE))
            for start in range(0, args.rows, 64):
                stop = min(start + 64, args.rows)
                rows[start:stop] = rng.random((stop - start, *SHAPE), dtype=np.float32)
        times: dict[str, list[float]] = {"point_selection": [], "row_slices": []}
        with h5py.File(path, "r") as fh:
            dataset = fh["trunk"]
            for _ in range(args.repeats):
                idx = rng.permutation(args.rows)[:args.batch]
                began = time.perf_counter()
                old = point_selection(dataset, idx)
                times["point_selection"].append(time.perf_counter() - began)
                began = time.perf_counter()
                new = read_rows(dataset, idx)
                times["row_slices"].append(time.perf_counter() - began)
                if not np.array_equal(old, new):
                    raise SystemExit("the two reads differ")
    ms = {k: round(1000 * statistics.median(v), 2) for k, v in times.items()}
    print(json.dumps({"bench": "trunk_cache_read", "rows": args.rows, "batch": args.batch, "row_mb": 4 * int(
        np.prod(SHAPE)) / 1e6, "repeats": args.repeats, "ms_per_batch": ms,
        "speedup": round(ms["point_selection"] / ms["row_slices"], 1)}))


if __name__ == "__main__":
    main()
