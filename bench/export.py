"""Feature export throughput next to the pure forward pass on the same batches (goal: ratio >= 0.95).

A synthetic ``patches.h5`` (smooth random patches, written like the patches stage writes: chunked, gzip)
is exported by :func:`mammo_core.codes.features.export_features` with an untrained ``FusedDenseNet``; the
baseline runs ``model.features`` on the same batches, already in memory, in inference mode, writing
nothing. The difference is what export adds: reading and decompressing blocks, copying features off the
device, and the background HDF5 writer. Runs are interleaved (export, forward, export, ...) after one
warm-up of each so that a machine-wide slowdown hits both alike; rates are medians, and
``paired_ratio_median`` is the median over repeats of forward time / export time.

Prints one JSON line. Usage: python bench/export.py [--n 2048] [--size 64] [--batch 128] [--repeats 3]
[--device auto|cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mammo_core.codes import features  # noqa: E402
from mammo_core.models.fused import FusedDenseNet  # noqa: E402
from mammo_core.storage import h5io  # noqa: E402
from mammo_core.training.loop import prepare_images  # noqa: E402

N_CLASSES = 7


def synthetic_patches(path: Path, n: int, size: int, seed: int = 0) -> None:
    """``n`` smooth random uint8 patches (gzip compresses them like tissue, unlike white noise)."""
    rng = np.random.default_rng(seed)
    specs = [h5io.DatasetSpec("images", np.uint8, (1, size, size)), h5io.DatasetSpec("labels", np.int64),
             h5io.DatasetSpec("split", np.int8), h5io.DatasetSpec("patient_id", np.dtype("S8")),
             h5io.DatasetSpec("source_id", np.dtype("S16"))]
    coarse = max(2, size // 8)
    with h5io.ChunkedH5Writer(path, specs, attrs={"size": size}) as out:
        for start in range(0, n, 256):
            m = min(256, n - start)
            low = torch.from_numpy(rng.random((m, 1, coarse, coarse), dtype=np.float32))
            smooth = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
            noisy = smooth.numpy() * 200 + rng.normal(0, 8, (m, 1, size, size))
            out.append(images=np.clip(noisy, 0, 255).astype(np.uint8),
                       labels=rng.integers(0, N_CLASSES, m), split=rng.integers(0, 3, m).astype(np.int8),
                       patient_id=[f"P_{i:05d}" for i in range(start, start + m)],
                       source_id=[f"lesion_{i}" for i in range(start, start + m)])


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_export(model: FusedDenseNet, patches_h5: Path, out: Path, batch: int, device: str) -> float:
    start = time.perf_counter()
    features.export_features(model, patches_h5, out, model_key="bench", batch_size=batch, device=device)
    _sync(device)
    seconds = time.perf_counter() - start
    out.unlink()
    return seconds


def time_forward(model: FusedDenseNet, batches: list[torch.Tensor], device: str) -> float:
    model = model.to(device).eval()
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            model.features(prepare_images(b, device))
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    model = FusedDenseNet(N_CLASSES, seed=0).eval()
    with tempfile.TemporaryDirectory() as tmp:
        patches_h5 = Path(tmp) / "patches.h5"
        synthetic_patches(patches_h5, args.n, args.size)
        batches = [torch.from_numpy(block["images"]) for _, block in h5io.iter_blocks(patches_h5, ["images"],
                                                                                       args.batch)]
        out = Path(tmp) / "features.h5"
        time_export(model, patches_h5, out, args.batch, device)  # warm-up (allocator, kernels, page cache)
        time_forward(model, batches, device)
        export_s, forward_s = [], []
        for _ in range(args.repeats):
            export_s.append(time_export(model, patches_h5, out, args.batch, device))
            forward_s.append(time_forward(model, batches, device))
    export_rate = args.n / float(np.median(export_s))
    forward_rate = args.n / float(np.median(forward_s))
    print(json.dumps({
        "bench": "export",
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({torch.get_num_threads()} "
                                                                                  "threads)",
        "n_patches": args.n,
        "size": args.size,
        "batch": args.batch,
        "repeats": args.repeats,
        "export_patches_per_s": round(export_rate, 1),
        "forward_patches_per_s": round(forward_rate, 1),
        "export_vs_forward_ratio": round(export_rate / forward_rate, 3),
        # each repeat's export next to the forward run right after it: robust to slow drifts of machine load
        "paired_ratio_median": round(float(np.median(np.array(forward_s) / np.array(export_s))), 3),
        "export_s": [round(s, 3) for s in export_s],
        "forward_s": [round(s, 3) for s in forward_s],
        "goal_ratio": 0.95,
    }))


if __name__ == "__main__":
    main()
