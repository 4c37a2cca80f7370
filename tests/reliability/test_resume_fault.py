"""A stage that fails once, then `mammo run --resume <parent run>`; and `--force STAGE`.

Partial runs (`--until augment`) keep this fast: resuming is decided by the flow for every stage alike, so
a fault at `patches` (third stage, with finished stages before it and a stage after it) exercises every
case the full pipeline has: reused finished stages, the failed stage retried, and later stages run.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tests.e2e.test_pipeline_e2e import SMOKE, client_for, mammo, runs_of, stage_rows

pytestmark = pytest.mark.slow
RESUME = re.compile(r"mammo run --resume ([0-9a-f]{32})")


@pytest.fixture(scope="module")
def failed_then_resumed(tmp_path_factory) -> dict:
    store = tmp_path_factory.mktemp("resume")
    marker = store / "fault-fired"
    os.environ["MAMMO_FAULT"] = "fail:stage:patches:start"
    os.environ["MAMMO_FAULT_ONCE"] = str(marker)
    try:
        failed = mammo(store, "run", "-p", str(SMOKE), "--until", "augment", check=False)
    finally:
        del os.environ["MAMMO_FAULT"], os.environ["MAMMO_FAULT_ONCE"]
    found = RESUME.search(failed.stderr.replace("\n", " "))
    assert failed.returncode == 1 and found, failed.stdout + failed.stderr
    parent = found.group(1)
    status_after_failure = client_for(store).get_run(parent).info.status
    resumed = mammo(store, "run", "--resume", parent)
    return {"store": store, "failed": failed, "resumed": resumed, "parent": parent, "marker": marker,
            "status_after_failure": status_after_failure}


def test_failed_run_prints_resume_command_and_marks_the_parent_failed(failed_then_resumed):
    r = failed_then_resumed
    assert r["marker"].read_text() == "stage:patches:start"  # the injected fault is what stopped it
    assert stage_rows(r["failed"].stdout + r["failed"].stderr) == {"acquire": "ran", "curate": "ran",
                                                                   "patches": "failed"}
    assert "injected fault at stage:patches:start" in r["failed"].stderr
    assert r["status_after_failure"] == "FAILED"


def test_resume_continues_from_the_failed_stage_inside_the_same_parent_run(failed_then_resumed):
    r = failed_then_resumed
    rows = stage_rows(r["resumed"].stdout + r["resumed"].stderr)
    assert rows == {"acquire": "cached", "curate": "cached", "patches": "ran", "augment": "ran"}
    runs = runs_of(r["store"])
    parents = [x for x in runs if "mlflow.parentRunId" not in x.data.tags]
    assert [p.info.run_id for p in parents] == [r["parent"]], "the UI shows one pipeline run"
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["resume_count"] == "1"
    assert parent.data.tags["params_file"].endswith("smoke.yaml")  # recovered, not given again
    children = sorted((x.data.tags["mlflow.runName"], x.info.status) for x in runs if x is not parent)
    # finished stages keep their one child run (no duplicate cache-hit run inside the same parent);
    # the failed attempt stays visible next to the retry
    assert children == [("acquire", "FINISHED"), ("augment", "FINISHED"), ("curate", "FINISHED"),
                        ("patches", "FAILED"), ("patches", "FINISHED")]
    local = client_for(r["store"]).download_artifacts(parent.info.run_id, "stages.json", str(r["store"]))
    stages = json.loads(Path(local).read_text())["stages"]
    assert [s["stage"] for s in stages] == ["acquire", "curate", "patches", "augment"]


def test_resume_of_an_unknown_run_is_refused_with_its_id(failed_then_resumed):
    proc = mammo(failed_then_resumed["store"], "run", "--resume", "0" * 32, check=False)
    assert proc.returncode == 2
    assert "0" * 32 in proc.stderr and "not found" in proc.stderr


def test_force_reruns_the_stage_and_its_descendants_even_when_cached(failed_then_resumed):
    store = failed_then_resumed["store"]
    manifest = next((store / "stages" / "patches").glob("*/manifest.json"))
    before = json.loads(manifest.read_text())["mlflow_run_id"]
    proc = mammo(store, "run", "-p", str(SMOKE), "--until", "augment", "--force", "patches")
    assert stage_rows(proc.stdout + proc.stderr) == {"acquire": "cached", "curate": "cached", "patches": "ran",
                                                     "augment": "ran"}
    after = json.loads(manifest.read_text())["mlflow_run_id"]
    assert after != before, "the forced stage was produced again and re-sealed in place"


def test_force_train_ignores_checkpoints_left_in_scratch(smoke_store_copy):
    """A checkpoint an earlier attempt left (here: junk that resuming would refuse) is discarded by --force."""
    import torch

    store = smoke_store_copy
    (old,) = (store / "stages" / "train").iterdir()
    scratch = store / "scratch" / "train" / old.name
    scratch.mkdir(parents=True)
    (scratch / "checkpoint.pt").write_bytes(b"left by an earlier attempt" * 100)
    before = torch.load(old / "weights.pt", weights_only=True)
    proc = mammo(store, "run", "-p", str(SMOKE), "--only", "train", "--force", "train")
    assert stage_rows(proc.stdout + proc.stderr) == {"train": "ran"}
    assert [p.name for p in (store / "stages" / "train").iterdir()] == [old.name], "swapped in place, no leftover"
    manifest = json.loads((old / "manifest.json").read_text())
    assert manifest["metrics"]["train/resumed_from_epoch"] == 0
    after = torch.load(old / "weights.pt", weights_only=True)
    assert all(torch.equal(before[k], after[k]) for k in before), "trained afresh, to the same weights"
    assert not scratch.exists()
