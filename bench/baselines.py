"""Single-network baselines vs our fused model: per-image inference latency at batch 1, side by side.

The paper's Table 6 column. Every model is built once (random weights: the cost depends only on the
architecture) and fed the same patch-sized input; each network's own upsampling (InceptionV3 to 75 px
at least) counts as part of its cost. The models run interleaved in every repeat after a warm-up, in
one process, so machine noise hits all alike; the median is reported in ms per image. "fused" is our
Freeze1..3 model on the shared trunk (``mammo_core.models.fused.FusedDenseNet``, all three branch heads).

Usage: python bench/baselines.py [--size 224] [--repeats 20] [--vgg-classifier full] [--device auto]
       [--threads N] [--classes 7]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mammo_core.baselines.latency import latency_ms  # noqa: E402
from mammo_core.baselines.networks import NETWORKS, build_baseline, parameter_millions  # noqa: E402
from mammo_core.models.fused import DEFAULT_FREEZE_UPTO, FusedDenseNet  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=224, help="patch side fed to every model")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--classes", type=int, default=7)
    ap.add_argument("--vgg-classifier", default="full", choices=["full", "pooled"])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=0, help="CPU threads; 0 keeps torch's default")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    models: dict[str, torch.nn.Module] = {
        n: build_baseline(n, args.classes, args.size, vgg_classifier=args.vgg_classifier) for n in NETWORKS
    }
    models["fused"] = FusedDenseNet(args.classes, dict(DEFAULT_FREEZE_UPTO), seed=0)
    ms = latency_ms(models, args.size, repeats=args.repeats, device=device)
    print(json.dumps({
        "bench": "baselines",
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "batch": 1,
        "size": args.size,
        "repeats": args.repeats,
        "vgg_classifier": args.vgg_classifier,
        "ms_per_image": {k: round(v, 3) for k, v in ms.items()},
        "input_size": {n: models[n].input_size for n in NETWORKS},
        "params_m": {k: round(parameter_millions(m), 2) for k, m in models.items()},
        "fused_vs_densenet121_ratio": round(ms["fused"] / ms["densenet121"], 3),
    }))


if __name__ == "__main__":
    main()
