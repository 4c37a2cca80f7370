"""Shared-trunk latency: fused Freeze1-3 model vs one branch alone vs three branches run separately.

Per-image inference latency (eval, inference_mode, batch 32, torch's default CPU threads) at each
size; the three configurations are interleaved in every repeat so machine noise hits all alike, and
the median over repeats is reported. Prints one JSON line; ``fused_vs_one_ratio`` and
``fused_vs_separate_ratio`` are taken at the largest size (goal: fused <= 1.6x one branch).

Usage: python bench/trunk.py [--sizes 64 224] [--repeats 7 3] [--freeze3 denseblock2] [--device auto]
       [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mammo_core.models.fused import DEFAULT_FREEZE_UPTO, FusedDenseNet, build_single  # noqa: E402


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    ap.add_argument("--repeats", type=int, nargs="+", default=[7, 3], help="per size (last one reused)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--freeze3", default=DEFAULT_FREEZE_UPTO["freeze3"], help="the shared prefix's end")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0, help="CPU threads; 0 keeps torch's default")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    freeze_upto = {**DEFAULT_FREEZE_UPTO, "freeze3": args.freeze3}
    fused = FusedDenseNet(num_classes=2, freeze_upto=freeze_upto).to(device).eval()
    singles = [build_single(point, name=b).to(device).eval() for b, point in freeze_upto.items()]
    one = singles[-1]  # inference cost does not depend on what is frozen: any single branch will do

    configs: dict[str, Callable[[torch.Tensor], object]] = {
        "one": one,
        "fused": fused,
        "separate": lambda x: [s(x) for s in singles],
    }
    per_size = {}
    with torch.inference_mode():
        for i, size in enumerate(args.sizes):
            repeats = args.repeats[min(i, len(args.repeats) - 1)]
            x = torch.randn(args.batch, 3, size, size, device=device)
            for run in configs.values():  # warm-up: allocator, kernels, caches
                run(x)
            seconds: dict[str, list[float]] = {name: [] for name in configs}
            for _ in range(repeats):
                for name, run in configs.items():
                    seconds[name].append(_timed(lambda run=run, x=x: run(x), device))
            ms = {name: 1000 * statistics.median(v) / args.batch for name, v in seconds.items()}
            per_size[str(size)] = {
                "one_ms_per_image": round(ms["one"], 3),
                "fused_ms_per_image": round(ms["fused"], 3),
                "separate_ms_per_image": round(ms["separate"], 3),
                "fused_vs_one_ratio": round(ms["fused"] / ms["one"], 3),
                "fused_vs_separate_ratio": round(ms["fused"] / ms["separate"], 3),
                "repeats": repeats,
            }
    largest = per_size[str(max(args.sizes))]
    print(
        json.dumps(
            {
                "bench": "trunk",
                "device": str(device),
                "threads": torch.get_num_threads(),
                "batch": args.batch,
                "freeze_upto": freeze_upto,
                "sizes": per_size,
                "fused_vs_one_ratio": largest["fused_vs_one_ratio"],
                "fused_vs_separate_ratio": largest["fused_vs_separate_ratio"],
            }
        )
    )


if __name__ == "__main__":
    main()
