"""Detector latency: ours (fused DenseNet + FPN + hash head) vs ours without hash head vs ResNet-50 FPN.

Per-image inference latency (eval, inference_mode, batch 1) of the three detectors built exactly as the
detect stage builds them from a params file's ``detect`` section (input size, anchors, proposals, head
sizes), measured side by side in one process by ``mammo_core.detection.latency`` (interleaved rounds after
warm-up, median; wall and process-CPU milliseconds). Weights are random but shaped as after training:
the extractor's parameters that the train stage trains are moved off their initial values (so Freeze3's
segments no longer equal Freeze1's and only the really shared frozen segments are computed once) and
then frozen, as the detect stage freezes them. Latency does not depend on weight values otherwise,
except through how many boxes survive the score threshold, which the fixed input and seed keep the same
run to run. The input is a synthetic breast-shaped image at the stage's input size (long side
``max_size``, a 5:8 portrait).

Each detector is timed twice: as built (torchvision's eval forward) and as its inference copy
(``mammo_core.detection.inference``: BatchNorm folded into the convolution before it, BatchNorm + ReLU before
a 1x1 convolution turned into a per-channel floor, dense blocks buffered, transitions pooled first, identity
attention removed, the hash decoder folded, pooling from strided views, and on the CPU under sleeping OpenMP
waits, on one-thread workers, the trunk's dense blocks in bands of rows and the branch segments, FPN levels and
RPN head levels as one task graph; the ResNet-50 gets the rewrites that apply to it: its BatchNorm folding and
its stem's strided max pool; bands for its bottleneck layers made it slower and are not used).
On a GPU each inference copy is also timed with its backbone (extractor + FPN) replayed from a CUDA graph
(``mammo_core.detection.cuda_graphs``, ``graphed`` in the output; the RPN and box heads stay eager, their
shapes depend on the data), with cuDNN's autotuner on for every model alike: at batch 1 the fused extractor's
many small kernels are launch-bound there. On a GPU the headline (``headline``) is the graphed pair, on the
CPU the inference copies. Both detectors use the same RPN/ROI settings
(``proposals_test`` of the params). On a shared machine, ``--threads 1`` and the CPU figures are the
comparable ones.

``--worker-thread`` also times the inference copies on a ``ThreadPoolExecutor`` thread after the main thread
has run them, as the detect stage does on the task runner's thread (``worker_thread`` in the output): there,
torch's parallel ops gain far less from a second thread, and ours, with many more small ops, loses more.

The paper claims 105 ms (ours) vs 325 ms (Faster R-CNN) on its GPU; the goal here is ours <= 0.5x the
ResNet-50 baseline on the same machine. Prints one JSON line.

Usage: python bench/detect.py [--params params/default.yaml] [--size N] [--repeats 10] [--device auto]
       [--threads N] [--worker-thread]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# first: the pipeline's OpenMP wait setting must be in place when torch loads (mammo_core.runtime.openmp_wait)
from mammo_core.runtime import openmp_wait  # noqa: E402, I001

import torch  # noqa: E402
from mammo_core.config import Params  # noqa: E402
from mammo_core.detection import builders, data, inference  # noqa: E402
from mammo_core.detection.backbone import FusedFeatureMaps  # noqa: E402
from mammo_core.detection.concurrent_branches import branch_workers  # noqa: E402
from mammo_core.detection.cuda_graphs import graph_backbone  # noqa: E402
from mammo_core.detection.latency import measure_latency_detail  # noqa: E402


def synthetic_mammogram(height: int, width: int) -> torch.Tensor:
    """(3, H, W) in [0, 1]: a half-ellipse of textured tissue against black, one bright blob (a 'mass')."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(0, 1, width), indexing="ij")
    breast = (xx / 0.95) ** 2 + yy**2 <= 1.0
    tissue = 0.45 + 0.15 * torch.rand(height, width, generator=g)
    blob = 0.3 * torch.exp(-(((xx - 0.5) / 0.05) ** 2 + ((yy - 0.1) / 0.08) ** 2))
    return torch.where(breast, tissue + blob, torch.zeros(())).clamp(0, 1).expand(3, -1, -1).contiguous()


def as_trained(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Move every trainable fused-extractor weight off its initial value, then freeze the extractor.

    Why: at random init Freeze3's trainable segments (and every attention gamma, 0) still equal the
    frozen ones, so the shared-segment plan and the identity-attention rewrite would skip work that a
    trained extractor must do; the detect stage freezes the extractor after training, and so does this.
    """
    body = getattr(model.backbone, "body", None)
    if isinstance(body, FusedFeatureMaps):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in body.parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.randn(p.shape, generator=g))
        builders.freeze_feature_extractor(model)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default=str(Path(__file__).resolve().parents[1] / "params" / "default.yaml"))
    ap.add_argument("--size", type=int, default=None, help="input long side (default: the params' max_size)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--worker-thread", action="store_true", help="also time the inference copies on a worker thread")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input size: every model gets its fastest kernels alike
    p = Params.model_validate(yaml.safe_load(Path(args.params).read_text()) or {}).detect
    size = args.size or p.max_size
    models = {}
    for name in builders.MODELS:
        config = builders.config_from_params(p, name, data.class_names(p.classes), input_size=size)
        models[name] = as_trained(builders.build_detector(config)[0]).eval().to(device)
    started = time.process_time()
    for name in builders.MODELS:
        models[f"{name}_inference"] = inference.inference_copy(models[name])
    rewrite_cpu_s = time.process_time() - started
    if device.type == "cuda":
        for name in builders.MODELS:
            models[f"{name}_graphed"] = inference.inference_copy(models[name])
            graph_backbone(models[f"{name}_graphed"])
    image = synthetic_mammogram(size, round(size * 5 / 8)).to(device)
    with torch.inference_mode():
        outputs = {name: m([image])[0] for name, m in models.items()}
    times = measure_latency_detail(models, image, repeats=args.repeats, warmup=args.warmup)
    worker = None
    if args.worker_thread:
        copies = {name: models[f"{name}_inference"] for name in builders.MODELS}
        with ThreadPoolExecutor(1) as pool:
            on_worker = pool.submit(measure_latency_detail, copies, image, args.repeats, args.warmup).result()
        worker = {"latency_ms": {k: round(v["wall_ms"], 2) for k, v in on_worker.items()},
                  "ours_vs_frcnn_r50": round(on_worker["ours"]["wall_ms"] / on_worker["frcnn_r50"]["wall_ms"], 3)}

    def ratio(a: str, b: str, key: str) -> float:
        return round(times[a][key] / times[b][key], 3)

    def ratios(a: str, b: str) -> dict[str, float]:
        """``a`` over ``b`` by each clock: wall, process CPU, fastest process CPU."""
        return {k: ratio(a, b, k) for k in ("wall_ms", "cpu_ms", "cpu_min_ms")}

    def score_diff(name: str, variant: str) -> float | None:
        """Largest score difference of a rewritten model against the as-built one (None: boxes differ)."""
        a, b = outputs[name]["scores"], outputs[f"{name}_{variant}"]["scores"]
        return round(float((b - a).abs().max()), 8) if len(a) and a.shape == b.shape else None

    graphed = device.type == "cuda"
    headline = "graphed" if graphed else "inference"

    print(json.dumps({
        "bench": "detect", "argv": sys.argv[1:],
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "cuda": torch.version.cuda if device.type == "cuda" else None,
        "omp_wait": openmp_wait.describe(),
        "input_hw": list(image.shape[-2:]), "proposals_test": p.proposals_test, "repeats": args.repeats,
        "latency_ms": {k: round(v["wall_ms"], 2) for k, v in times.items()},
        "cpu_ms": {k: round(v["cpu_ms"], 2) for k, v in times.items()},
        "cpu_min_ms": {k: round(v["cpu_min_ms"], 2) for k, v in times.items()},
        "params_m": {k: round(builders.parameter_millions(models[k]), 2) for k in builders.MODELS},
        "cudnn_benchmark": torch.backends.cudnn.benchmark, "headline": headline,
        "headline_ours_vs_frcnn_r50": ratio(f"ours_{headline}", f"frcnn_r50_{headline}", "wall_ms"),
        "ours_vs_frcnn_r50": {"inference": ratios("ours_inference", "frcnn_r50_inference"),
                              "graphed": ratios("ours_graphed", "frcnn_r50_graphed") if graphed else None,
                              "as_built": ratios("ours", "frcnn_r50"),
                              "ours_inference_vs_r50_as_built": ratios("ours_inference", "frcnn_r50")},
        "ours_nohash_vs_frcnn_r50": {"inference": ratios("ours_nohash_inference", "frcnn_r50_inference")},
        "inference_copy_max_score_diff": {name: score_diff(name, "inference") for name in builders.MODELS},
        "graphed_max_score_diff": ({name: score_diff(name, "graphed") for name in builders.MODELS}
                                   if graphed else None),
        "rewrite_cpu_s": round(rewrite_cpu_s, 2), "worker_thread": worker,
        "branch_workers": {k: branch_workers(models[f"{k}_inference"], device) for k in builders.MODELS},
        "paper_claim_ms": {"ours": 105, "faster_rcnn": 325},
    }))


if __name__ == "__main__":
    main()
