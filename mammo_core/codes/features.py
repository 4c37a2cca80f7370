"""Feature export: every patch's per-branch feature vectors, streamed into ``features.h5``.

The model runs in inference mode over blocks of ``patches.h5``; each block's features go to a
background HDF5 writer (:class:`mammo_core.storage.h5io.ChunkedH5Writer`), so memory stays flat however many
patches there are and the model never waits on compression or disk. The fused vector is added after the
fusion weights are chosen (:mod:`mammo_core.codes.fusion`), from the stored branch vectors.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import h5py
import numpy as np
import torch

from mammo_core.models.fused import FusedDenseNet
from mammo_core.runtime import stop_request
from mammo_core.storage import h5io
from mammo_core.training.loop import prepare_images

T = TypeVar("T")
BRANCH_DATASETS = ("freeze1", "freeze2", "freeze3")
CARRIED = ("labels", "split", "patient_id", "source_id")


def _prefetch(blocks: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Read the next blocks in a background thread while the model runs on the current one."""
    pending: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce() -> None:
        try:
            for block in blocks:
                pending.put(block)
        except BaseException as exc:  # handed to the consumer, raised there
            pending.put(exc)
        finally:
            pending.put(done)

    threading.Thread(target=produce, name="features-reader", daemon=True).start()
    while (item := pending.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def export_features(
    model: FusedDenseNet,
    patches_h5: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    model_key: str,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Write per-branch features (float32, N x D) plus labels/split/ids; returns the number of rows.

    ``model_key`` (the train stage key) is stored as an attribute so later stages can refuse features of
    another model.
    """
    patches_h5 = Path(patches_h5)
    with h5io.open_for_reading(patches_h5) as fh:
        total = int(fh["labels"].shape[0])
        string_dtypes = {n: fh[n].dtype for n in ("patient_id", "source_id")}
    branches = list(model.branches.keys())
    dim = int(model.features(torch.zeros(1, 3, 32, 32)).popitem()[1].shape[1]) if total else 0
    specs = [h5io.DatasetSpec(b, np.float32, (dim,)) for b in branches]
    specs += [h5io.DatasetSpec("labels", np.int64), h5io.DatasetSpec("split", np.int8),
              h5io.DatasetSpec("patient_id", string_dtypes["patient_id"]),
              h5io.DatasetSpec("source_id", string_dtypes["source_id"])]
    model = model.to(device).eval()
    done = 0
    with h5io.ChunkedH5Writer(out_path, specs, attrs={"model_key": model_key, "branches": branches,
                                                      "feature_dim": dim, "source": patches_h5.name}) as writer:
        for _, block in _prefetch(h5io.iter_blocks(patches_h5, ["images", *CARRIED], batch_size)):
            stop_request.check("the feature export")
            with torch.inference_mode():
                feats = model.features(prepare_images(torch.from_numpy(block["images"]), device))
            writer.append(**{b: feats[b].float().cpu().numpy() for b in branches},
                          **{n: block[n] for n in CARRIED})
            done += len(block["labels"])
            if progress:
                progress(done, total)
    return done


def read_branch_features(path: str | os.PathLike, split_code: int | None = None) -> dict[str, np.ndarray]:
    """Per-branch features (and labels/patient ids) of one split code, or of all rows."""
    with h5io.open_for_reading(path) as fh:
        rows = np.flatnonzero(fh["split"][:] == split_code) if split_code is not None else slice(None)
        names = [n for n in (*BRANCH_DATASETS, "fused", "labels", "patient_id", "source_id") if n in fh]
        return {n: fh[n][rows] for n in names}


def fuse(branch_features: Mapping[str, np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Weighted sum of the branch feature vectors, in BRANCH_DATASETS order (the paper's fusion)."""
    if len(weights) != len(BRANCH_DATASETS):
        raise ValueError(f"need {len(BRANCH_DATASETS)} fusion weights, got {list(weights)}")
    out = np.zeros_like(branch_features[BRANCH_DATASETS[0]], dtype=np.float32)
    for name, w in zip(BRANCH_DATASETS, weights, strict=True):
        out += np.float32(w) * branch_features[name]
    return out


def add_fused(path: str | os.PathLike, weights: Sequence[float], block_rows: int = 4096) -> None:
    """Append the ``fused`` dataset (chunked, compressed) computed block by block from the branches."""
    with h5py.File(path, "a") as fh:
        n, dim = fh[BRANCH_DATASETS[0]].shape
        out = fh.create_dataset("fused", shape=(n, dim), dtype=np.float32, chunks=(min(max(n, 1), 512), dim),
                                compression="gzip", compression_opts=4)
        for start in range(0, n, block_rows):
            stop = min(n, start + block_rows)
            out[start:stop] = fuse({b: fh[b][start:stop] for b in BRANCH_DATASETS}, weights)
        fh.attrs["fusion_weights"] = np.asarray(weights, dtype=np.float64)
