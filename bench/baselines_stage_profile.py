"""Where the baselines stage's time goes on the default run, part by part (issue 18), in CPU seconds.

From a default run's store (``--store``: its augment, patches, features stages and baseline units) or,
without one, synthetic rows of the default's sizes (2160 augmented training rows, 60 val, 142 test, 432
patches' training rows, 64 px). For each network (``baselines.freeze: deep``, VGG16 ``pooled``):

- ``prefix_*``: the frozen prefix pass per 1000 rows, ``old`` (no_grad, contiguous, as the stage did) and
  ``new`` (:func:`mammo_core.baselines.train.prefix_outputs`: inference mode, channels-last), measured
  interleaved on the same ``--rows`` rows; ``prefix_rows`` is how many rows the stage passes now (train
  + val + test) and ``prefix_rows_before`` before (+ the patches' training split, now read from the
  augmented set's read-out);
- ``train_batch``: one training step of the trainable rest on a cached batch of 32 (x 68 batches = one
  default epoch), ``checkpoint``: one epoch's atomic checkpoint write (wall: it is mostly I/O);
- then the classic baselines and fusions: SIFT-BoVW + SVM, AGNet, the three Freeze3 + X fusions (on the
  store's unit features when given), and the side-by-side latency measurement.

All times are process CPU seconds (``getrusage``) unless named ``wall``. Prints one JSON line.
Usage: python bench/baselines_stage_profile.py [--store /tmp/a-default-store] [--rows 128] [--networks ...]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mammo_core.baselines import agnet, freeze3_fusion, latency, networks, sift_bovw, units  # noqa: E402
from mammo_core.baselines import train as baseline_train  # noqa: E402
from mammo_core.codes import features  # noqa: E402
from mammo_core.models.fused import DEFAULT_FREEZE_UPTO, FusedDenseNet  # noqa: E402
from mammo_core.training import checkpoint  # noqa: E402
from mammo_core.training.loop import TensorData, load_tensor_data, prepare_images  # noqa: E402

ROWS = {"train": 2160, "val": 60, "test": 142, "patches_train": 432}
CLASSES = 7


def _cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def _timed(fn):
    c = _cpu()
    out = fn()
    return out, _cpu() - c


def _synthetic(n: int, seed: int) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    return TensorData(torch.randint(0, 256, (n, 1, 64, 64), generator=g, dtype=torch.uint8),
                      torch.arange(n) % CLASSES)


def _old_prefix(model, data: TensorData, chunk: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.prefix(prepare_images(data.images[s:s + chunk], "cpu"))
                          for s in range(0, len(data), chunk)])


def _network_profile(network: str, rows: TensorData, tmp: Path) -> dict:
    model = networks.build_baseline(network, CLASSES, 64, vgg_classifier="pooled", freeze="deep").eval()
    plain = networks.build_baseline(network, CLASSES, 64, vgg_classifier="pooled", freeze="deep").eval()
    _old_prefix(plain, TensorData(rows.images[:32], rows.labels[:32]), 32)  # warm-up both
    baseline_train.prefix_outputs(model, TensorData(rows.images[:32], rows.labels[:32]), 32, "cpu")
    old, new = [], []
    for _ in range(2):  # interleaved
        old.append(_timed(lambda: _old_prefix(plain, rows, 32))[1])
        cached, seconds = _timed(lambda: baseline_train.prefix_outputs(model, rows, 32, "cpu"))
        new.append(seconds)
    per_1000 = 1000.0 / len(rows)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    batch, y = cached[:32], rows.labels[:32]

    def step():
        opt.zero_grad(set_to_none=True)
        logits, aux = model.training_logits_from_prefix(batch)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        opt.step()

    step()
    step_s = min(_timed(step)[1] for _ in range(3))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    wall = time.perf_counter()
    _, ckpt_cpu = _timed(lambda: checkpoint.save_atomic(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "best": {"state": state}}, tmp / "c.pt"))
    split = model.parameter_split()
    return {"prefix_old_s_per_1000": round(min(old) * per_1000, 2),
            "prefix_new_s_per_1000": round(min(new) * per_1000, 2),
            "train_batch_s": round(step_s, 3), "epoch_s_est": round(step_s * (ROWS["train"] // 32), 1),
            "checkpoint_cpu_s": round(ckpt_cpu, 2), "checkpoint_wall_s": round(time.perf_counter() - wall, 2),
            "checkpoint_mb": round((tmp / "c.pt").stat().st_size / 1e6, 1),
            "frozen_params": split["frozen"], "trainable_params": split["trainable"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--store", type=Path, default=None)
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--networks", nargs="+", default=list(networks.NETWORKS))
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.store is not None:
        (aug,) = (args.store / "stages" / "augment").glob("*/train_augmented.h5")
        (patches,) = (args.store / "stages" / "patches").glob("*/patches.h5")
        (feats,) = (args.store / "stages" / "features").glob("*/features.h5")
        train = load_tensor_data(aug)
        test = load_tensor_data(patches, split=2)
        unit_dirs = {units.read_unit(d).network: d for d in (args.store / "units" / "baselines").iterdir()
                     if (d / "manifest.json").is_file()}
    else:
        train, test, feats, unit_dirs = _synthetic(ROWS["train"], 0), _synthetic(ROWS["test"], 2), None, {}
    rows = TensorData(train.images[:args.rows], train.labels[:args.rows])
    out: dict = {"bench": "baselines_stage_profile", "source": str(args.store) if args.store else "synthetic",
                 "threads": torch.get_num_threads(), "rows_timed": args.rows,
                 "prefix_rows": ROWS["train"] + ROWS["val"] + ROWS["test"],
                 "prefix_rows_before": sum(ROWS.values()), "networks": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for network in args.networks:
            out["networks"][network] = _network_profile(network, rows, Path(tmp))
    settings = sift_bovw.BovwSettings(image_size=64, max_keypoints=64, vocabulary_size=64, svm_c=10.0, seed=0)
    _, out["sift_bovw_svm_s"] = _timed(lambda: sift_bovw.sift_bovw_svm(
        train.images.numpy(), train.labels.numpy(), test.images.numpy(), settings))
    if unit_dirs and feats is not None:
        outcome = {n: units.read_unit(d) for n, d in unit_dirs.items()}
        split = {s: features.read_branch_features(feats, code) for s, code in (("train", 0), ("val", 1), ("test", 2))}
        y_val = split["val"]["labels"]
        _, out["agnet_s"] = _timed(lambda: agnet.agnet_fusion(
            outcome["vgg16"].features, outcome["inception_v3"].features, train.labels.numpy(), y_val,
            ("vgg16", "inception_v3")))
        f3 = agnet.FeatureSplits(*(split[s]["freeze3"].astype(np.float32) for s in ("train", "val", "test")))

        def fusions():
            for n in ("vgg16", "inception_v3", "resnet50"):
                o = outcome[n]
                freeze3_fusion.fuse_with_freeze3(n, f3, agnet.FeatureSplits(o.patches_train_features, o.features.val,
                                                                            o.features.test),
                                                 split["train"]["labels"], y_val, CLASSES)
        _, out["freeze3_fusions_s"] = _timed(fusions)
    built = {n: networks.build_baseline(n, CLASSES, 64, vgg_classifier="pooled") for n in networks.NETWORKS}
    built["fused"] = FusedDenseNet(CLASSES, dict(DEFAULT_FREEZE_UPTO), seed=0)
    _, out["latency_s"] = _timed(lambda: latency.latency_ms(built, 64, repeats=3))
    for k, v in list(out.items()):
        if k.endswith("_s"):
            out[k] = round(v, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
