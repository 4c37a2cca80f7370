"""Where the detect stage's seconds go, before and after this code's changes, side by side in one process.

Two measurements, each interleaved (one call of every variant per round, median over rounds), in wall and
process-CPU milliseconds:

* ``extractor_ms_per_image``: the feature cache's pass over one image (the fused extractor at the stage's
  input size), as built vs its inference copy (``mammo_core.detection.inference``, what
  ``FeatureCache.add`` now runs).
* ``train_step_ms``: one training step of each detector at the stage's settings (batch of ``batch_size``
  windows of ``train_crop`` px on a synthetic breast; ours reads cached maps as in the stage): forward,
  backward, gradient clipping and an SGD step with the previous per-parameter loop (``foreach``) vs the
  fused step ``engine.train_detector`` now uses. Per epoch that is ``ceil(train images / batch_size)``
  steps (101 on the default's 202 training images).

Usage: python bench/detect_cost.py [--params params/default.yaml] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from detect import as_trained, synthetic_mammogram  # noqa: E402

from mammo_core.config import Params  # noqa: E402
from mammo_core.detection import builders, data, inference  # noqa: E402
from mammo_core.detection.feature_cache import forward_with_maps  # noqa: E402


def _interleaved(calls: dict, repeats: int) -> dict[str, dict[str, float]]:
    for f in calls.values():
        f()
    wall: dict[str, list[float]] = {k: [] for k in calls}
    cpu: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for k, f in calls.items():
            w, c = time.perf_counter(), time.process_time()
            f()
            wall[k].append((time.perf_counter() - w) * 1000)
            cpu[k].append((time.process_time() - c) * 1000)
    return {k: {"wall_ms": round(statistics.median(wall[k]), 1), "cpu_ms": round(statistics.median(cpu[k]), 1)}
            for k in calls}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(Path(__file__).resolve().parents[1] / "params" / "default.yaml"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    p = Params.model_validate(yaml.safe_load(Path(args.params).read_text()) or {}).detect
    classes = data.class_names(p.classes)
    models = {name: as_trained(builders.build_detector(builders.config_from_params(p, name, classes))[0])
              for name in builders.MODELS}
    image = synthetic_mammogram(p.max_size, round(p.max_size * 5 / 8))
    ours = models["ours"].eval()
    body, fast_body = ours.backbone.body, inference.inference_copy(ours.backbone.body)
    x = ours.transform([image])[0].tensors

    def extractor(b):
        def run():
            with torch.inference_mode():
                b(x)
        return run
    extractor_ms = _interleaved({"as_built": extractor(body), "inference_copy": extractor(fast_body)}, args.repeats)

    crop = p.train_crop or p.max_size
    windows = [image[:, k * crop:(k + 1) * crop, :crop].contiguous() for k in range(p.batch_size)]
    targets = [{"boxes": torch.tensor([[20.0, 30.0, 50.0, 64.0]]), "labels": torch.tensor([1])} for _ in windows]
    with torch.inference_mode():
        maps = [[m[0].clone() for m in body(ours.transform([w])[0].tensors).values()] for w in windows]
    calls = {}
    for name, model in models.items():
        model.train()
        params = [q for q in model.parameters() if q.requires_grad]
        for fused in (False, True):
            opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4,
                                  **({"fused": True} if fused else {"foreach": True}))

            def step(model=model, params=params, opt=opt, name=name):
                losses = (model(windows, targets) if name == "frcnn_r50"
                          else forward_with_maps(model, windows, targets, maps))
                opt.zero_grad(set_to_none=True)
                sum(losses.values()).backward()
                torch.nn.utils.clip_grad_norm_(params, 10.0)
                opt.step()
            calls[f"{name}/{'fused' if fused else 'foreach'}"] = step
    step_ms = _interleaved(calls, args.repeats)
    print(json.dumps({
        "bench": "detect_cost", "threads": torch.get_num_threads(), "input_hw": list(image.shape[-2:]),
        "train_crop": crop, "batch_size": p.batch_size, "repeats": args.repeats,
        "extractor_ms_per_image": extractor_ms,
        "extractor_cpu_ratio": round(extractor_ms["inference_copy"]["cpu_ms"] / extractor_ms["as_built"]["cpu_ms"], 3),
        "train_step_ms": step_ms,
        "trainable_params_m": {n: round(sum(q.numel() for q in m.parameters() if q.requires_grad) / 1e6, 2)
                               for n, m in models.items()},
    }))


if __name__ == "__main__":
    main()
