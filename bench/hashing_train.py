"""Hashing stage decoder training: one decoder at a time vs all of them stacked (issue 18), side by side.

The stage trains every decoder of the grid (hash and FC x ``hashing.bits`` x ``hashing.seeds`` x {fused,
Freeze3}; 48 on the default) with the default ``hashing:`` settings. This bench trains that grid twice in
this one process on the same features: ``sequential`` (``hashing.train_decoder`` per decoder, as the stage
did before) and ``batched`` (``hashing_stack.train_decoders``, as it does now), and reports for each the
wall seconds and the process CPU seconds (``getrusage``; on a shared machine wall time also measures the
other users), then how far the two agree: the largest difference of any decoder's test MAP (test queries
against the training database) and the share of test code bits that differ.

Features: the features stage's ``features.h5`` given by ``--features`` (e.g. a default run's store), else
synthetic Gaussian clusters of the default's size (432 train, 60 val, 142 test rows, 512 dims per source).
``--order`` runs the two sides in the other order, to check the first one is not paying a warm-up.

Prints one JSON line. Usage:
python bench/hashing_train.py [--features STORE/stages/features/KEY/features.h5] [--epochs 60] [--order batched-first]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mammo_core.codes import features, retrieval  # noqa: E402
from mammo_core.config import HashingParams  # noqa: E402
from mammo_core.models import hashing, hashing_stack  # noqa: E402

SOURCES = ("fused", "freeze3")
SPLITS = {"train": 0, "val": 1, "test": 2}


def _synthetic(seed: int = 0, dim: int = 512, classes: int = 7) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    centres = {s: rng.normal(size=(classes, dim)) * 0.3 for s in SOURCES}
    out = {}
    for split, n in (("train", 432), ("val", 60), ("test", 142)):
        labels = rng.integers(0, classes, n)
        out[split] = {"labels": labels, **{s: (centres[s][labels] + rng.normal(size=(n, dim))).astype(np.float32)
                                           for s in SOURCES}}
    return out


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _grid(p: HashingParams, by_split: dict) -> list[tuple[str, str, int, int]]:
    seeds = [p.seed + k for k in range(p.seeds)]
    return [(source, kind, q, seed) for source in SOURCES for q in p.bits for seed in seeds for kind in ("hash", "fc")]


def _build(key: tuple[str, str, int, int], p: HashingParams, in_dim: int):
    _, kind, q, seed = key
    if kind == "hash":
        return hashing.HashDecoder(in_dim, q, beta=p.beta, eps=p.eps, seed=seed)
    return hashing.FCDecoder(in_dim, q, seed=seed)


def _settings(p: HashingParams) -> dict:
    return {"objective": p.objective, "epochs": p.epochs, "batch_size": p.batch_size, "lr": p.lr,
            "margin": p.margin, "quantization_weight": p.quantization_weight, "every_epoch_diagnostics": False}


def _sequential(grid, p, by_split) -> dict:
    decoders = {}
    for key in grid:
        x = by_split["train"][key[0]]
        decoders[key] = _build(key, p, x.shape[1])
        hashing.train_decoder(decoders[key], x, by_split["train"]["labels"], seed=key[3], **_settings(p))
    return decoders


def _batched(grid, p, by_split) -> dict:
    jobs = {key: hashing_stack.DecoderJob(_build(key, p, by_split["train"][key[0]].shape[1]),
                                          by_split["train"][key[0]], key[3]) for key in grid}
    hashing_stack.train_decoders(list(jobs.values()), by_split["train"]["labels"], **_settings(p))
    return {key: job.decoder for key, job in jobs.items()}


def _timed(run, *args) -> tuple[dict, float, float]:
    wall, cpu = time.perf_counter(), _cpu_seconds()
    out = run(*args)
    return out, time.perf_counter() - wall, _cpu_seconds() - cpu


def _test_map(decoder, source: str, by_split: dict) -> tuple[float, np.ndarray]:
    test_codes = decoder.encode(by_split["test"][source])
    score = retrieval.mean_average_precision(
        retrieval.pack_codes(test_codes), by_split["test"]["labels"],
        retrieval.pack_codes(decoder.encode(by_split["train"][source])), by_split["train"]["labels"])
    return score, test_codes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--features", type=Path, default=None, help="a features stage's features.h5")
    ap.add_argument("--epochs", type=int, default=None, help="default: hashing.epochs' default")
    ap.add_argument("--order", choices=("sequential-first", "batched-first"), default="sequential-first")
    args = ap.parse_args()
    p = HashingParams() if args.epochs is None else HashingParams(epochs=args.epochs)
    if args.features is not None:
        by_split = {s: features.read_branch_features(args.features, code) for s, code in SPLITS.items()}
    else:
        by_split = _synthetic()
    grid = _grid(p, by_split)
    sides = [("sequential", _sequential), ("batched", _batched)]
    if args.order == "batched-first":
        sides.reverse()
    results, trained = {}, {}
    for name, run in sides:
        trained[name], wall, cpu = _timed(run, grid, p, by_split)
        results[name] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
    map_diff, bits_differ, maps = 0.0, [], {"sequential": [], "batched": []}
    for key in grid:
        (m_seq, c_seq), (m_bat, c_bat) = (_test_map(trained[side][key], key[0], by_split)
                                          for side in ("sequential", "batched"))
        maps["sequential"].append(m_seq)
        maps["batched"].append(m_bat)
        map_diff = max(map_diff, abs(m_seq - m_bat))
        bits_differ.append(float((c_seq != c_bat).mean()))
    print(json.dumps({
        "bench": "hashing_train", "features": str(args.features) if args.features else "synthetic (default sizes)",
        "decoders": len(grid), "train_rows": int(len(by_split["train"]["labels"])), "epochs": p.epochs,
        "bits": list(p.bits), "seeds": p.seeds, "threads": torch.get_num_threads(), "order": args.order,
        **{f"{side}_{k}": v for side, r in results.items() for k, v in r.items()},
        "wall_speedup": round(results["sequential"]["wall_s"] / results["batched"]["wall_s"], 2),
        "cpu_speedup": round(results["sequential"]["cpu_s"] / results["batched"]["cpu_s"], 2),
        "mean_test_map_sequential": round(float(np.mean(maps["sequential"])), 4),
        "mean_test_map_batched": round(float(np.mean(maps["batched"])), 4),
        "max_abs_test_map_diff": round(map_diff, 4),
        "mean_share_test_bits_differ": round(float(np.mean(bits_differ)), 4),
    }))


if __name__ == "__main__":
    main()
