"""How OpenMP threads wait between parallel regions: the pipeline's torch work under each policy, idle and shared.

Why: libgomp (torch's OpenMP runtime on Linux) makes a thread that reaches the end of a parallel region wait
for the next one, spinning up to ``GOMP_SPINCOUNT`` iterations (300,000 by default, 0 with
``OMP_WAIT_POLICY=PASSIVE``) before it sleeps on a futex. Spinning long collapses when another busy process
shares the cores (the thread that spins takes the core its partner needs); not spinning at all makes every
region of a small op pay a futex wake-up, and ours (about ten times as many small ops as the ResNet-50 FPN)
pays it thousands of times per image. The pipeline sets its policy in ``mammo_core/__init__.py``; this bench
measures the candidates side by side.

Each policy runs in a fresh child process (libgomp reads its environment once, when torch loads), on two
workloads at the pipeline's default sizes: (1) the detect stage's latency pair, the inference copies of ours
and the ResNet-50 FPN at batch 1 (``bench/detect.py``'s synthetic image and as-trained weights); (2) one SGD
step of the fused DenseNet on 32 patches of 64 px (the train stage). Each is timed idle and ``shared``: with
a busy process on one core, as on a machine that runs the test suite beside the pipeline. Policies and
conditions alternate over ``--rounds``; the medians over rounds are reported.

Prints one JSON line. Usage: python bench/omp_wait.py [--rounds 2] [--policies passive,spin:30000,default]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# openmp_wait.SETTINGS, not imported from there: importing mammo_core exports PASSIVE when neither is set
WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def policy_env(policy: str) -> dict[str, str]:
    """The child's environment: ``passive``, ``default`` (libgomp's own), ``spin:N`` (GOMP_SPINCOUNT=N) or
    ``passive+spin:N`` (both exported: GOMP_SPINCOUNT wins, as when a user exports it over the pipeline's
    PASSIVE)."""
    env = {k: v for k, v in os.environ.items() if k not in WAIT_SETTINGS}
    for part in policy.split("+"):
        if part == "passive":
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        elif part.startswith("spin:"):
            env["GOMP_SPINCOUNT"] = part.split(":", 1)[1]
        elif part != "default":
            raise SystemExit(f"unknown policy {policy!r}: passive, default, spin:N or passive+spin:N")
    return env


def child(repeats: int, steps: int) -> None:
    """Time both workloads in this process (its OpenMP policy came with its environment); print JSON."""
    exported = {k: os.environ.get(k) for k in WAIT_SETTINGS}  # before mammo_core adds one
    import torch
    import yaml

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "bench"))
    from detect import as_trained, synthetic_mammogram
    from stage_thread import training_step_timer

    from mammo_core.config import Params
    from mammo_core.detection import builders, data, inference
    from mammo_core.detection.latency import measure_latency_detail

    p = Params.model_validate(yaml.safe_load((REPO / "params" / "default.yaml").read_text()) or {}).detect
    models = {}
    for name in ("ours", "frcnn_r50"):
        config = builders.config_from_params(p, name, data.class_names(p.classes), input_size=p.max_size)
        models[name] = inference.inference_copy(as_trained(builders.build_detector(config)[0]).eval())
    image = synthetic_mammogram(p.max_size, round(p.max_size * 5 / 8))
    latency = measure_latency_detail(models, image, repeats=repeats, warmup=1)

    step_s = training_step_timer(steps=steps)()
    print(json.dumps({"ours_ms": latency["ours"]["wall_ms"], "frcnn_r50_ms": latency["frcnn_r50"]["wall_ms"],
                      "train_step_ms": 1000 * step_s, "threads": torch.get_num_threads(), "env": exported}))


def run_child(policy: str, shared: bool, repeats: int, steps: int) -> dict:
    hog = (subprocess.Popen([sys.executable, "-c", "while True: pass"]) if shared else None)
    try:
        out = subprocess.run([sys.executable, __file__, "--child", "--repeats", str(repeats), "--steps", str(steps)],
                             env=policy_env(policy), capture_output=True, text=True, check=True)
    finally:
        if hog:
            hog.kill()
            hog.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--policies", default="passive,spin:30000,default")
    ap.add_argument("--repeats", type=int, default=5, help="detector latency rounds per child")
    ap.add_argument("--steps", type=int, default=4, help="timed training steps per child")
    ap.add_argument("--conditions", default="idle,shared")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.repeats, args.steps)
        return
    policies, conditions = args.policies.split(","), args.conditions.split(",")
    runs: dict[str, dict[str, list[dict]]] = {c: {pol: [] for pol in policies} for c in conditions}
    for r in range(args.rounds):
        for condition in conditions:
            order = policies if r % 2 == 0 else policies[::-1]
            for policy in order:
                runs[condition][policy].append(run_child(policy, condition == "shared", args.repeats, args.steps))
    result = {}
    for condition, per_policy in runs.items():
        result[condition] = {}
        for policy, rows in per_policy.items():
            med = {k: round(statistics.median(row[k] for row in rows), 1)
                   for k in ("ours_ms", "frcnn_r50_ms", "train_step_ms")}
            med["ours_vs_r50"] = round(med["ours_ms"] / med["frcnn_r50_ms"], 3)
            result[condition][policy] = med
    print(json.dumps({"bench": "omp_wait", "cpus": os.cpu_count(), "rounds": args.rounds,
                      "detect_input_long_side": "params/default.yaml detect.max_size", **result}))


if __name__ == "__main__":
    main()
