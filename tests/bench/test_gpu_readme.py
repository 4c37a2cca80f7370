"""The README's GPU figures are rendered from the GPU checks' JSON lines (bench/gpu_readme.py), never typed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("gpu_readme", REPO / "bench" / "gpu_readme.py")
gpu_readme = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_readme)

DETECT = {"bench": "detect", "argv": ["--params", "params/paper_phantom.yaml", "--repeats", "30"],
          "input_hw": [1024, 640], "repeats": 30, "cudnn_benchmark": True,
          "latency_ms": {"ours": 30.0, "ours_nohash": 28.0, "frcnn_r50": 12.0, "ours_inference": 24.0,
                         "ours_nohash_inference": 22.0, "frcnn_r50_inference": 10.0, "ours_graphed": 6.0,
                         "ours_nohash_graphed": 5.5, "frcnn_r50_graphed": 8.0},
          "graphed_max_score_diff": {"ours": 1e-6, "ours_nohash": None, "frcnn_r50": 2e-6},
          "paper_claim_ms": {"ours": 105, "faster_rcnn": 325}}
PIPELINE = {"bench": "gpu_pipeline", "shared": {
    "command": "mammo run -p params/paper_phantom.yaml", "exit_code": 0, "wall_s": 201.4,
    "stage_seconds": {"acquire": 20.5, "train": 41.25}, "train_epoch_seconds": [9.5, 8.25],
    "detect": {"device": "cuda", "latency_models": "inference copies", "input_hw": [1024, 640],
               "latency_ms": {"ours": 7.0, "frcnn_r50": 9.0}, "latency_ratio_vs_r50": 0.778}},
    "separate": {"command": "mammo run ... separate", "exit_code": "timed out", "wall_s": 80.0,
                 "stage_seconds": {"train": 3.0},
                 "branch_tasks": {"train-freeze1": {"state": "COMPLETED", "seconds": 30.0, "device": "cuda:0",
                                                    "gpu_slot": 0}},
                 "all_running_at_once": True, "overlap_s": 21.5}}


def _write(tmp_path: Path, *rows: dict) -> Path:
    path = tmp_path / "gpu.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_ratios_and_stage_seconds_come_from_the_lines(tmp_path):
    text = gpu_readme.render(gpu_readme.read_results(_write(tmp_path, DETECT, PIPELINE)))
    assert "| ours / ResNet-50 | **2.50** | **2.40** | **0.75** |" in text  # 30/12, 24/10, 6/8
    assert "| ours | 30.0 | 24.0 | 6.0 |" in text
    assert "python bench/detect.py --params params/paper_phantom.yaml --repeats 30" in text
    assert "| acquire | train |" in text and "| 20.5 | 41.2 |" in text
    assert "ours / ResNet-50 **0.78**" in text
    assert "train-freeze1 COMPLETED in 30.0 s on cuda:0 (slot 0)" in text and "at once for 21.5 s" in text
    assert "epochs (all three branches, validation included), seconds: 9.5, 8.2." in text
    assert "finished in 201 s" in text and "stopped by the bench's time limit after 80 s" in text
    assert text.startswith(gpu_readme.BEGIN) and text.endswith(gpu_readme.END)


def test_runs_from_separate_calls_each_name_their_commit(tmp_path):
    machine = {"bench": "machine", "gpu": "H200", "cpu_cores": 16, "torch": "2.11", "cuda": "13.0", "cudnn": 1,
               "python": "3.12", "date": "2026-12-04"}
    shared = {"bench": "gpu_pipeline_shared", **PIPELINE["shared"]}
    separate = {"bench": "gpu_pipeline_separate", **PIPELINE["separate"], "branch_tasks": {
        "train-freeze1": {"state": "COMPLETED", "seconds": 12.0, "device": "cuda:0", "gpu_slot": 0,
                          "epoch_seconds": [3.25, 1.5]}}}
    path = _write(tmp_path, {**machine, "commit": "aaa"}, DETECT, shared, {**machine, "commit": "bbb"}, separate)
    results = gpu_readme.read_results(path)
    assert results["detect"]["commit"] == results["gpu_pipeline_shared"]["commit"] == "aaa"
    assert results["gpu_pipeline_separate"]["commit"] == "bbb"
    text = gpu_readme.render(results)
    assert "(`mammo run -p params/paper_phantom.yaml`; commit aaa, 2026-12-04;" in text
    assert "(`mammo run ... separate`; commit bbb, 2026-12-04)" in text
    assert "train-freeze1 COMPLETED in 12.0 s on cuda:0 (slot 0), epochs 3.2, 1.5 s" in text
    assert "Shared-trunk training (run above) took 41.2 s" in text


def test_missing_checks_are_said_not_invented(tmp_path):
    text = gpu_readme.render(gpu_readme.read_results(_write(tmp_path, DETECT)))
    assert "no `gpu_pipeline_shared` line" in text and "No `machine` line" in text


def test_a_later_line_of_one_bench_replaces_the_earlier(tmp_path):
    later = {**DETECT, "latency_ms": {**DETECT["latency_ms"], "ours_graphed": 4.0}}
    results = gpu_readme.read_results(_write(tmp_path, DETECT, later))
    assert results["detect"]["latency_ms"]["ours_graphed"] == 4.0


def test_a_broken_line_is_named(tmp_path):
    path = tmp_path / "gpu.jsonl"
    path.write_text(json.dumps(DETECT) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"gpu\.jsonl:2"):
        gpu_readme.read_results(path)


def test_section_is_replaced_between_the_markers_only():
    readme = f"intro\n{gpu_readme.BEGIN}\nold\n{gpu_readme.END}\nrest\n"
    assert gpu_readme.replace_section(readme, "NEW") == "intro\nNEW\nrest\n"
    with pytest.raises(ValueError, match="no section"):
        gpu_readme.replace_section("no markers", "NEW")


def test_the_readme_shows_what_the_committed_results_render():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    wanted = gpu_readme.replace_section(readme, gpu_readme.render(gpu_readme.read_results(gpu_readme.RESULTS)))
    assert readme == wanted, "README's GPU figures differ from bench/results/gpu.jsonl: run python bench/gpu_readme.py"
