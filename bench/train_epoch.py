"""Training epoch time: shared trunk vs cached trunk vs three separate trainings, on the same data.

Synthetic uint8 patches (default 512 of 64x64, 7 classes, batch 32) and the default Freeze1..3 freeze
points. Each repeat runs one epoch (training + validation on a small val set) of every mode, the modes
interleaved so machine noise hits all alike; medians over repeats are reported. ``separate`` is the sum
of the three single-branch epochs. The cached mode's one-off trunk pass over the training and
validation sets is reported apart (``cached_build_s``): it is paid once per training, not per epoch.
Checkpoint writing is outside the timed epoch in every mode.

Prints one JSON line with ``shared_vs_separate_ratio`` (goal <= 0.75) and ``cached_vs_separate_ratio``
(goal <= 0.4).

Usage: python bench/train_epoch.py [--patches 512] [--size 64] [--repeats 3] [--threads N] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mammo_core.models.fused import DEFAULT_FREEZE_UPTO, FusedDenseNet, build_single  # noqa: E402
from mammo_core.training.loop import TensorData, train_branches, train_separate  # noqa: E402
from mammo_core.training.schedule import Schedule  # noqa: E402


def _data(n: int, size: int, classes: int, seed: int) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    noise = torch.randint(0, 128, (n, 1, size, size), generator=g)
    return TensorData((noise + (127 * labels // max(1, classes - 1)).view(-1, 1, 1, 1)).to(torch.uint8), labels)


def _warm_up(fused, singles, train: TensorData, val: TensorData, schedule: Schedule, names, tmp: Path) -> None:
    """One short run of every mode on two batches, so no mode pays the one-off setup in the timings."""
    n = 2 * schedule.batch_size
    small = TensorData(train.images[:n], train.labels[:n])
    for mode in ("shared", "cached"):
        train_branches(copy.deepcopy(fused), small, val, schedule, mode=mode, checkpoint_dir=tmp / f"warm_{mode}",
                       class_names=names)
    train_separate({b: copy.deepcopy(s) for b, s in singles.items()}, small, val, schedule,
                   checkpoint_dir=tmp / "warm_separate", class_names=names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--patches", type=int, default=512)
    ap.add_argument("--val", type=int, default=64)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--classes", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [f"class{k}" for k in range(args.classes)]
    train, val = _data(args.patches, args.size, args.classes, 1), _data(args.val, args.size, args.classes, 2)
    schedule = Schedule(epochs=1, batch_size=args.batch, lr=0.01, warmup_epochs=0, rollback_every=0,
                        device=args.device)
    fused = FusedDenseNet(args.classes, DEFAULT_FREEZE_UPTO, seed=0)
    singles = {b: build_single(p, args.classes, seed=0, name=b) for b, p in DEFAULT_FREEZE_UPTO.items()}

    seconds: dict[str, list[float]] = {"shared": [], "separate": [], "cached": [], "cached_build": []}
    for repeat in range(-1, args.repeats):  # repeat -1: untimed warm-up (first-call kernel setup, caches)
        with tempfile.TemporaryDirectory() as tmp:
            if repeat < 0:
                _warm_up(fused, singles, train, val, schedule, names, Path(tmp))
                continue
            r = train_branches(copy.deepcopy(fused), train, val, schedule, mode="shared",
                               checkpoint_dir=Path(tmp) / "shared", class_names=names)
            seconds["shared"].append(r.history[0].seconds)
            rs = train_separate({b: copy.deepcopy(s) for b, s in singles.items()}, train, val, schedule,
                                checkpoint_dir=Path(tmp) / "separate", class_names=names)
            seconds["separate"].append(sum(x.history[0].seconds for x in rs.values()))
            rc = train_branches(copy.deepcopy(fused), train, val, schedule, mode="cached",
                                checkpoint_dir=Path(tmp) / "cached", class_names=names)
            seconds["cached"].append(rc.history[0].seconds)
            seconds["cached_build"].append(rc.trunk_cache_seconds)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    print(json.dumps({
        "bench": "train_epoch",
        "device": str(schedule.resolve_device()),
        "threads": torch.get_num_threads(),
        "patches": args.patches, "val": args.val, "size": args.size, "batch": args.batch,
        "classes": args.classes, "repeats": args.repeats,
        "freeze_upto": DEFAULT_FREEZE_UPTO,
        "shared_epoch_s": round(med["shared"], 3),
        "separate_epoch_s": round(med["separate"], 3),
        "cached_epoch_s": round(med["cached"], 3),
        "cached_build_s": round(med["cached_build"], 3),
        "shared_vs_separate_ratio": round(med["shared"] / med["separate"], 3),
        "cached_vs_separate_ratio": round(med["cached"] / med["separate"], 3),
        "cached_with_build_vs_separate_ratio": round((med["cached"] + med["cached_build"]) / med["separate"], 3),
        "raw_seconds": {k: [round(x, 3) for x in v] for k, v in seconds.items()},
    }))


if __name__ == "__main__":
    main()
