"""The whole pipeline on a GPU, as Prefect stages: per-stage seconds, and Freeze1-3 trained both ways.

Issue 18, goal 7. Two ``mammo run`` on one fresh store, each a real CLI process (temporary Prefect server,
MLflow run tree, sealed stage folders):

1. ``-p PARAMS`` (``params/paper_phantom.yaml``: paper.yaml's sizes on the phantom), every stage, Freeze1-3
   trained on one shared trunk (``train.mode: shared``) on the GPU;
2. ``-p PARAMS --until train --set train.mode=separate --set run.task_runner=dask --set run.dask_workers=3
   --set run.gpus=1``: the three Freeze trainings as three Prefect tasks on a Dask LocalCluster of three
   worker processes, all on GPU 0 at once (each worker holds its own ``gpu-<i>`` slot; the upstream stages
   are reused from run 1).

Each run's figures are read from what it sealed, not from its console: the ``seconds`` of every stage
folder it produced (``manifest.json``), the detect stage's ``detection.json`` (latency at batch 1 and
device), the train stage's history (each shared-trunk epoch's seconds). For run 2, the temporary Prefect
server's own database (``<store>/prefect/prefect.db``) says when each ``train-freeze<i>`` task ran and in which
state it ended, and its log table holds each task's "train: branch ... on cuda:0 (GPU slot i)" line and its
per-epoch lines: whether the three trainings overlapped, and each one's epoch seconds, are read from there.

``--runs`` picks the runs, so that a short GPU lease can take them in separate calls (run 2 alone computes
its own upstream stages). Prints one JSON line per run (``gpu_pipeline_shared``, ``gpu_pipeline_separate``),
each with the commit under test (``MAMMO_COMMIT``). Usage: python bench/gpu_pipeline.py
[-p params/paper_phantom.yaml] [--store DIR] [--log-dir DIR] [--runs shared separate] [--timeout-s SHARED SEPARATE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from mammo_core.storage.stage_files import DETECT, TRAIN  # noqa: E402
from mammo_core.storage.store import MANIFEST, ArtifactStore  # noqa: E402

SEPARATE = ["--until", "train", "--set", "train.mode=separate", "--set", "run.task_runner=dask",
            "--set", "run.dask_workers=3", "--set", "run.gpus=1"]
BRANCH_LINE = re.compile(r"train: branch (\w+) on (\S+) \(GPU slot (\d+)\)")
EPOCH_LINE = re.compile(r"train: branch \w+ epoch (\d+) val_acc \S+ \(([\d.]+) s\)")


def stage_folders(store: Path) -> dict[str, set[Path]]:
    """Every sealed stage folder in the store, per stage (the layout is ``ArtifactStore``'s)."""
    from tasks.registry import STAGES

    artifacts = ArtifactStore(store)
    return {stage: {f for f in artifacts.stage_dir(stage).iterdir() if (f / MANIFEST).is_file()}
            for stage in STAGES if artifacts.stage_dir(stage).is_dir()}


def new_folders(before: dict[str, set[Path]], after: dict[str, set[Path]]) -> dict[str, Path]:
    """The folder each stage sealed between two snapshots (one per stage and run)."""
    out = {}
    for stage, folders in after.items():
        added = sorted(folders - before.get(stage, set()))
        if added:
            out[stage] = added[-1]
    return out


def run_cli(args: list[str], store: Path, log: Path, timeout_s: float) -> tuple[int | str, float]:
    """``python -m flows.cli run ARGS --store STORE``: exit code (``"timed out"`` past ``timeout_s``, after which
    it is stopped as a user would stop it, Ctrl-C to its process group) and wall seconds; console in ``log``."""
    cmd = [sys.executable, "-m", "flows.cli", "run", *args, "--store", str(store)]
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code: int | str = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            code = "timed out"
    return code, round(time.perf_counter() - started, 1)


def stage_seconds(folders: dict[str, Path]) -> dict[str, float]:
    """Each sealed stage's own seconds, in the order the stages were sealed."""
    ordered = sorted(folders.items(), key=lambda item: (item[1] / MANIFEST).stat().st_mtime)
    return {stage: round(float(json.loads((f / MANIFEST).read_text())["seconds"]), 1) for stage, f in ordered}


def epoch_seconds(folder: Path | None) -> list[float] | None:
    """Seconds of each shared-trunk training epoch (all three branches), from the train stage's history."""
    if folder is None or not (folder / TRAIN.history).is_file():
        return None
    history = json.loads((folder / TRAIN.history).read_text())
    first = next(iter(history.values()), [])
    return [round(float(epoch["seconds"]), 1) for epoch in first]


def detection_summary(folder: Path | None) -> dict | None:
    """Latency at batch 1 and the test mAP50 per detector, as the detect stage sealed them."""
    if folder is None or not (folder / DETECT.summary).is_file():
        return None
    d = json.loads((folder / DETECT.summary).read_text())
    rows = {r["model"]: r for r in d["rows"]}
    return {"device": d["device"], "latency_models": d["latency_models"], "input_hw": d["latency_input_hw"],
            "latency_ms": {m: round(r["latency_ms"], 2) for m, r in rows.items()},
            "latency_ratio_vs_r50": round(d["latency_ratio_vs_r50"], 3) if d["latency_ratio_vs_r50"] else None,
            "test_map50": {m: r.get("map50") for m, r in rows.items()},
            "epochs": d["training"]["epochs"], "profile_seconds": d["profile_seconds"]}


def branch_tasks(store: Path) -> dict:
    """The ``train-freeze<i>`` task runs in the store's Prefect database: when, where and how each ended, and
    whether all of them were running at one moment."""
    import sqlite3

    db = store / "prefect" / "prefect.db"
    if not db.is_file():
        return {"branch_tasks": None}
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        runs = con.execute("SELECT id, name, start_time, end_time, state_type FROM task_run "
                           "WHERE name LIKE 'train-%' ORDER BY start_time").fetchall()
        lines: dict[str, list[str]] = {}
        for run_id, message in con.execute("SELECT task_run_id, message FROM log "
                                           "WHERE message LIKE 'train: branch %'"):
            lines.setdefault(run_id, []).append(message)
    tasks = {}
    for run_id, name, start, end, state in runs:
        messages = lines.get(run_id, [])
        where = next((m for m in map(BRANCH_LINE.search, messages) if m), None)
        epochs = sorted((int(m.group(1)), float(m.group(2))) for m in map(EPOCH_LINE.search, messages) if m)
        tasks[name] = {"state": state, "start": start, "end": end,
                       "seconds": _between(start, end) if start and end else None,
                       "device": where.group(2) if where else None,
                       "gpu_slot": int(where.group(3)) if where else None,
                       "epoch_seconds": [seconds for _, seconds in epochs]}
    timed = [t for t in tasks.values() if t["start"] and t["end"]]
    overlap = _between(max(t["start"] for t in timed), min(t["end"] for t in timed)) if timed else None
    return {"branch_tasks": tasks, "all_running_at_once": bool(len(timed) == 3 and overlap and overlap > 0),
            "overlap_s": overlap}


def _between(start: str, end: str) -> float:
    """Seconds from one Prefect database timestamp to another (ISO strings of one format: they sort as times)."""
    return round((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds(), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-p", "--params", default="params/paper_phantom.yaml")
    ap.add_argument("--store", default=None, help="a fresh folder (default: a new temporary one)")
    ap.add_argument("--log-dir", default=None, help="where the consoles are written (default: the store)")
    ap.add_argument("--runs", nargs="+", choices=("shared", "separate"), default=["shared", "separate"])
    ap.add_argument("--timeout-s", type=float, nargs=2, default=(1800.0, 900.0), metavar=("SHARED", "SEPARATE"),
                    help="each run is stopped (SIGINT, as Ctrl-C) after this long; its figures are still read")
    args = ap.parse_args()
    store = Path(args.store or tempfile.mkdtemp(prefix="mammo-gpu-"))
    logs = Path(args.log_dir or store)
    logs.mkdir(parents=True, exist_ok=True)
    import torch

    common = {"params": args.params, "torch": torch.__version__, "commit": os.environ.get("MAMMO_COMMIT", "?"),
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    if "shared" in args.runs:
        before = stage_folders(store)
        code, wall = run_cli(["-p", args.params], store, logs / "run_shared.log", args.timeout_s[0])
        sealed = new_folders(before, stage_folders(store))
        print(json.dumps({"bench": "gpu_pipeline_shared", **common, "command": f"mammo run -p {args.params}",
                          "exit_code": code, "wall_s": wall, "stage_seconds": stage_seconds(sealed),
                          "train_epoch_seconds": epoch_seconds(sealed.get("train")),
                          "detect": detection_summary(sealed.get("detect"))}), flush=True)
    if "separate" in args.runs:
        before = stage_folders(store)
        code, wall = run_cli(["-p", args.params, *SEPARATE], store, logs / "run_separate.log", args.timeout_s[1])
        sealed = new_folders(before, stage_folders(store))
        print(json.dumps({"bench": "gpu_pipeline_separate", **common,
                          "command": " ".join(["mammo run -p", args.params, *SEPARATE]), "exit_code": code,
                          "wall_s": wall, "stage_seconds": stage_seconds(sealed), **branch_tasks(store)}), flush=True)


if __name__ == "__main__":
    main()
