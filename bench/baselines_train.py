"""Where the baselines stage's time goes, before and after the frozen prefixes were cached (issue 14/18).

On synthetic data shaped like the default run (64 px patches, 7 classes, 2160 augmented training rows,
540 train / 80 val / 180 test patches), for each network, side by side in this one process:

All costs are process CPU seconds (``getrusage``): on a shared machine wall time mostly measures the
other users; on an idle 2-core machine the wall time is roughly CPU seconds / 2 (both threads busy).

- ``before``: the old protocol's cost per training batch (every layer fine-tuned: the whole network
  forward and backward in train mode, as the stage did until now) and per evaluated row;
- ``after``: the frozen prefix computed once per row, then per batch only the trainable rest.

From those it projects the training part of the stage under each protocol (old: 840 rows x 4 epochs,
every layer trained; new: the branches' 2160 rows x 10 epochs, prefix cached), and with ``--full`` it
runs the new training for real (``units.train_network``, default schedule) and reports its wall and CPU
seconds. Prints one JSON line.

Usage: python bench/baselines_train.py [--full] [--batches 4] [--networks vgg16 resnet50 ...]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mammo_core.baselines import networks, units  # noqa: E402
from mammo_core.training.loop import TensorData, prepare_images  # noqa: E402
from mammo_core.training.schedule import Schedule  # noqa: E402

CLASSES = [f"c{k}" for k in range(7)]
OLD = {"rows": 840, "epochs": 4}
NEW = {"rows": 2160, "epochs": 10}


def _data(n: int, size: int, seed: int) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(CLASSES)
    noise = torch.randint(0, 60, (n, 1, size, size), generator=g)
    return TensorData((noise + 20 + 25 * labels.view(-1, 1, 1, 1)).to(torch.uint8), labels)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _per_batch_old(model: networks.SingleNetClassifier, x: torch.Tensor, y: torch.Tensor, batches: int) -> float:
    """Every parameter trainable, whole network in train mode (the old stage's step)."""
    for p in model.parameters():
        p.requires_grad_(True)
    torch.nn.Module.train(model, True)  # base train(): the prefix's batch norms train too, as before
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model.net(model.adapt(prepare_images(x, "cpu")))
        logits = out[0] if isinstance(out, tuple) else out
        F.cross_entropy(logits, y).backward()
        opt.step()

    return _cpu_per_call(step, batches)


def _cpu_per_call(fn, repeats: int) -> float:
    """Process CPU seconds per call after one warm-up call (wall time is at the mercy of other users)."""
    fn()
    start = _cpu()
    for _ in range(repeats):
        fn()
    return (_cpu() - start) / repeats


def _per_batch_new(model: networks.SingleNetClassifier, h: torch.Tensor, y: torch.Tensor, batches: int) -> float:
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        logits, _ = model.training_logits_from_prefix(h)
        F.cross_entropy(logits, y).backward()
        opt.step()

    return _cpu_per_call(step, batches)


def _per_row(fn, rows: int) -> float:
    with torch.inference_mode():
        return _cpu_per_call(fn, 2) / rows


def profile(network: str, size: int, batch: int, batches: int, split_rows: dict[str, int], freeze: str) -> dict:
    x = _data(batch, size, 1)
    eval_rows = _data(64, size, 2)
    fresh = networks.build_baseline(network, len(CLASSES), size, vgg_classifier="pooled", freeze=freeze).eval()
    full_row = _per_row(lambda: fresh(prepare_images(eval_rows.images, "cpu")), 64)
    prefix_row = _per_row(lambda: fresh.prefix(prepare_images(eval_rows.images, "cpu")), 64)
    h = fresh.prefix(prepare_images(x.images, "cpu"))
    rest_row = _per_row(lambda: fresh.features_and_logits_from_prefix(fresh.prefix(prepare_images(
        eval_rows.images, "cpu"))), 64) - prefix_row
    new_batch = _per_batch_new(fresh, h, x.labels, batches)
    old_batch = _per_batch_old(networks.build_baseline(network, len(CLASSES), size, vgg_classifier="pooled"),
                               x.images, x.labels, batches)
    val, test, patches_train = split_rows["val"], split_rows["test"], split_rows["patches_train"]
    old_s = (OLD["epochs"] * (OLD["rows"] // batch) * old_batch + OLD["epochs"] * val * full_row
             + (OLD["rows"] + val + test) * full_row)
    new_s = ((NEW["rows"] + val) * prefix_row + NEW["epochs"] * (NEW["rows"] // batch) * new_batch
             + NEW["epochs"] * val * max(rest_row, 0.0) + (NEW["rows"] + val) * max(rest_row, 0.0)
             + (test + patches_train) * full_row)
    return {"old_batch_cpu_s": round(old_batch, 4), "new_batch_cpu_s": round(new_batch, 4),
            "batch_ratio": round(old_batch / new_batch, 2), "prefix_row_cpu_ms": round(1000 * prefix_row, 3),
            "full_row_cpu_ms": round(1000 * full_row, 3), "old_protocol_projected_cpu_s": round(old_s, 1),
            "new_protocol_projected_cpu_s": round(new_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--networks", nargs="+", default=list(networks.NETWORKS))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--freeze", default="deep", choices=networks.FREEZE_LEVELS)
    ap.add_argument("--full", action="store_true", help="also run the new training for real (default schedule)")
    args = ap.parse_args()
    split_rows = {"val": 80, "test": 180, "patches_train": 540}
    cpu0, wall0 = _cpu(), time.perf_counter()
    per_network = {n: profile(n, args.size, args.batch, args.batches, split_rows, args.freeze) for n in args.networks}
    out = {"bench": "baselines_train", "threads": torch.get_num_threads(), "size": args.size, "freeze": args.freeze,
           "per_network": per_network,
           "old_protocol_projected_cpu_s": round(sum(v["old_protocol_projected_cpu_s"] for v in per_network.values()),
                                                 1),
           "new_protocol_projected_cpu_s": round(sum(v["new_protocol_projected_cpu_s"] for v in per_network.values()),
                                                 1),
           "profile_wall_s": round(time.perf_counter() - wall0, 1), "profile_cpu_s": round(_cpu() - cpu0, 1)}
    if args.full:
        data = units.BaselineData(_data(NEW["rows"], args.size, 3), _data(split_rows["val"], args.size, 4),
                                  _data(split_rows["test"], args.size, 5), CLASSES,
                                  _data(split_rows["patches_train"], args.size, 6))
        sched = Schedule(epochs=NEW["epochs"], batch_size=args.batch, lr=0.01, warmup_epochs=1, lr_step=5,
                         rollback_every=5, device="cpu")
        real = {}
        for n in args.networks:
            cpu1, wall1 = _cpu(), time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                units.train_network(n, data, sched, weights="none", vgg_classifier="pooled", keep_weights=False,
                                    checkpoint_dir=Path(tmp), freeze=args.freeze)
            real[n] = {"wall_s": round(time.perf_counter() - wall1, 1), "cpu_s": round(_cpu() - cpu1, 1)}
        out["new_protocol_measured"] = real
        out["new_protocol_measured_wall_s"] = round(sum(v["wall_s"] for v in real.values()), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
