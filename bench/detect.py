"""Detector latency: ours (fused DenseNet + FPN + hash head) vs ours without hash head vs ResNet-50 FPN.

Per-image inference latency (eval, inference_mode, batch 1) of the three detectors built exactly as the
detect stage builds them from a params file's ``detect`` section (input size, anchors, proposals, head
sizes), measured side by side in one process by ``mammo_core.detection.latency`` (interleaved rounds after
warm-up, median). Weights are random: latency does not depend on their values, except through how many
boxes survive the score threshold, which the fixed input and seed keep the same run to run. The input is a
synthetic breast-shaped image at the stage's input size (long side ``max_size``, a 5:8 portrait).

The paper claims 105 ms (ours) vs 325 ms (Faster R-CNN) on its GPU; the goal here is ours <= 0.5x the
ResNet-50 baseline on the same machine. Prints one JSON line.

Usage: python bench/detect.py [--params params/default.yaml] [--size N] [--repeats 10] [--device auto]
       [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mammo_core.config import Params  # noqa: E402
from mammo_core.detection import builders, data  # noqa: E402
from mammo_core.detection.latency import measure_latency  # noqa: E402


def synthetic_mammogram(height: int, width: int) -> torch.Tensor:
    """(3, H, W) in [0, 1]: a half-ellipse of textured tissue against black, one bright blob (a 'mass')."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(0, 1, width), indexing="ij")
    breast = (xx / 0.95) ** 2 + yy**2 <= 1.0
    tissue = 0.45 + 0.15 * torch.rand(height, width, generator=g)
    blob = 0.3 * torch.exp(-(((xx - 0.5) / 0.05) ** 2 + ((yy - 0.1) / 0.08) ** 2))
    return torch.where(breast, tissue + blob, torch.zeros(())).clamp(0, 1).expand(3, -1, -1).contiguous()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default=str(Path(__file__).resolve().parents[1] / "params" / "default.yaml"))
    ap.add_argument("--size", type=int, default=None, help="input long side (default: the params' max_size)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    p = Params.model_validate(yaml.safe_load(Path(args.params).read_text()) or {}).detect
    size = args.size or p.max_size
    models = {}
    for name in builders.MODELS:
        config = builders.config_from_params(p, name, data.class_names(p.classes), input_size=size)
        models[name] = builders.build_detector(config)[0].eval().to(device)
    image = synthetic_mammogram(size, round(size * 5 / 8)).to(device)
    times = measure_latency(models, image, repeats=args.repeats, warmup=args.warmup)
    print(json.dumps({
        "bench": "detect", "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "input_hw": list(image.shape[-2:]), "proposals_test": p.proposals_test, "repeats": args.repeats,
        "latency_ms": {k: round(v, 2) for k, v in times.items()},
        "params_m": {k: round(builders.parameter_millions(m), 2) for k, m in models.items()},
        "ours_vs_frcnn_r50": round(times["ours"] / times["frcnn_r50"], 3),
        "ours_nohash_vs_frcnn_r50": round(times["ours_nohash"] / times["frcnn_r50"], 3),
        "paper_claim_ms": {"ours": 105, "faster_rcnn": 325},
    }))


if __name__ == "__main__":
    main()
