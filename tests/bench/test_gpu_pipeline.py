"""bench/gpu_pipeline.py reads its figures from what the runs sealed and from Prefect's own database."""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gpu_pipeline", REPO / "bench" / "gpu_pipeline.py")
gpu_pipeline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_pipeline)


def _seal(store: Path, stage: str, key: str, seconds: float, when: float, **files: dict) -> Path:
    folder = store / "stages" / stage / key
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"seconds": seconds}))
    for name, content in files.items():
        (folder / name.replace("_json", ".json")).write_text(json.dumps(content))
    os.utime(folder / "manifest.json", (when, when))
    return folder


def test_each_run_is_credited_with_the_folders_it_sealed_in_sealing_order(tmp_path):
    _seal(tmp_path, "acquire", "a1", 5.0, 1000)
    before = gpu_pipeline.stage_folders(tmp_path)
    (tmp_path / "stages" / "train" / "unsealed").mkdir(parents=True)  # no manifest: a half-written folder
    _seal(tmp_path, "train", "t1", 20.0, 1003, history_json={"freeze1": [{"seconds": 7.25}, {"seconds": 6.5}]})
    _seal(tmp_path, "curate", "c1", 3.0, 1001)
    sealed = gpu_pipeline.new_folders(before, gpu_pipeline.stage_folders(tmp_path))
    assert list(gpu_pipeline.stage_seconds(sealed).items()) == [("curate", 3.0), ("train", 20.0)]
    assert gpu_pipeline.epoch_seconds(sealed["train"]) == [7.2, 6.5]
    assert gpu_pipeline.epoch_seconds(None) is None


def test_detection_summary_reads_detection_json(tmp_path):
    folder = _seal(tmp_path, "detect", "d1", 9.0, 1000, detection_json={
        "device": "cuda", "latency_models": "inference copies", "latency_input_hw": [1024, 640],
        "rows": [{"model": "ours", "latency_ms": 13.456, "map50": 0.1},
                 {"model": "frcnn_r50", "latency_ms": 12.9, "map50": 0.2}],
        "latency_ratio_vs_r50": 1.04310, "training": {"epochs": 2}, "profile_seconds": {"latency_s": 3.0}})
    summary = gpu_pipeline.detection_summary(folder)
    assert summary["latency_ms"] == {"ours": 13.46, "frcnn_r50": 12.9} and summary["latency_ratio_vs_r50"] == 1.043
    assert summary["test_map50"] == {"ours": 0.1, "frcnn_r50": 0.2}


def _prefect_db(store: Path, runs: list[tuple], logs: list[tuple]) -> None:
    (store / "prefect").mkdir(parents=True)
    with sqlite3.connect(store / "prefect" / "prefect.db") as con:
        con.execute("CREATE TABLE task_run (id TEXT, name TEXT, start_time TEXT, end_time TEXT, state_type TEXT)")
        con.execute("CREATE TABLE log (task_run_id TEXT, message TEXT)")
        con.executemany("INSERT INTO task_run VALUES (?, ?, ?, ?, ?)", runs)
        con.executemany("INSERT INTO log VALUES (?, ?)", logs)


def test_branch_tasks_overlap_is_read_from_prefects_database(tmp_path):
    _prefect_db(tmp_path, [
        ("1", "train-freeze1", "2026-12-04 14:58:03.739853", "2026-12-04 14:59:08.053972", "COMPLETED"),
        ("2", "train-freeze2", "2026-12-04 14:57:58.798715", "2026-12-04 14:58:58.788976", "COMPLETED"),
        ("3", "train-freeze3", "2026-12-04 14:58:03.655742", "2026-12-04 14:59:07.640210", "COMPLETED"),
        ("4", "curate", "2026-12-04 14:50:00.000000", "2026-12-04 14:50:10.000000", "COMPLETED"),
    ], [("1", "train: branch freeze1 on cuda:0 (GPU slot 0)"), ("2", "train: branch freeze2 on cuda:0 (GPU slot 2)"),
        ("2", "train: branch freeze2 epoch 2 val_acc 0.625 (1.5 s)"),
        ("2", "train: branch freeze2 epoch 1 val_acc 0.031 (12.25 s)")])
    out = gpu_pipeline.branch_tasks(tmp_path)
    assert set(out["branch_tasks"]) == {"train-freeze1", "train-freeze2", "train-freeze3"}
    assert out["branch_tasks"]["train-freeze2"] | {"start": None, "end": None} == {
        "state": "COMPLETED", "start": None, "end": None, "seconds": 60.0, "device": "cuda:0", "gpu_slot": 2,
        "epoch_seconds": [12.25, 1.5]}  # in epoch order, whatever the log's order
    assert out["branch_tasks"]["train-freeze1"]["epoch_seconds"] == []
    assert out["branch_tasks"]["train-freeze3"]["device"] is None  # no log line: said, not guessed
    assert out["all_running_at_once"] and out["overlap_s"] == 55.0  # 14:58:03.74 .. 14:58:58.79


def test_branch_tasks_one_after_the_other_do_not_overlap(tmp_path):
    _prefect_db(tmp_path, [
        ("1", "train-freeze1", "2026-12-04 10:00:00.000000", "2026-12-04 10:00:10.000000", "COMPLETED"),
        ("2", "train-freeze2", "2026-12-04 10:00:10.500000", "2026-12-04 10:00:20.000000", "COMPLETED"),
        ("3", "train-freeze3", "2026-12-04 10:00:20.500000", "2026-12-04 10:00:30.000000", "COMPLETED"),
    ], [])
    out = gpu_pipeline.branch_tasks(tmp_path)
    assert not out["all_running_at_once"] and out["overlap_s"] < 0
    assert gpu_pipeline.branch_tasks(tmp_path / "elsewhere") == {"branch_tasks": None}
