"""Task runners from params: the Dask runner (LocalCluster of processes, one ``GPU`` resource per worker)
trains the three `separate` branches as three tasks and seals the same weights as the thread runner.

`--until train` is enough: the runner only changes how stages and trainings are scheduled, and train is
the stage that the Dask path splits; later stages consume its sealed weights unchanged.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from mammo_core.training import devices
from tests.e2e.test_pipeline_e2e import SMOKE, mammo, runs_of, stage_rows

SEPARATE = ("--set", "train.mode=separate")


def test_assigned_gpu_prefers_the_pinned_index_then_the_worker_name():
    assert devices.assigned_gpu(3, env={"MAMMO_GPU": "1"}) == 1
    assert devices.assigned_gpu("2", env={}) == 2
    assert devices.assigned_gpu("tcp-worker", env={}) is None
    with pytest.raises(ValueError, match="MAMMO_GPU"):
        devices.assigned_gpu(0, env={"MAMMO_GPU": "gpu0"})


def test_device_for_maps_the_gpu_onto_visible_devices_and_refuses_cuda_without_one():
    assert devices.device_for("auto", 5, cuda_devices=4) == "cuda:1"
    assert devices.device_for("auto", None, cuda_devices=2) == "cuda"
    assert devices.device_for("auto", 0, cuda_devices=0) == "cpu"
    assert devices.device_for("cpu", 0, cuda_devices=4) == "cpu"
    with pytest.raises(RuntimeError, match="no CUDA device"):
        devices.device_for("cuda", 0, cuda_devices=0)


def _weights(store):
    folder = next((store / "stages" / "train").glob("*/manifest.json")).parent
    weights = torch.load(folder / "weights.pt", weights_only=True)
    return json.loads((folder / "manifest.json").read_text()), weights


@pytest.mark.slow
def test_dask_runner_trains_three_branch_tasks_with_gpu_resources_and_same_weights(tmp_path):
    store = tmp_path / "store"
    mammo(store, "run", "-p", str(SMOKE), "--until", "train", *SEPARATE)
    thread_manifest, thread_weights = _weights(store)

    proc = mammo(store, "run", "-p", str(SMOKE), "--until", "train", *SEPARATE, "--force", "train",
                 "--set", "run.task_runner=dask", "--set", "run.gpus=1")
    out = proc.stdout + proc.stderr
    assert stage_rows(out)["train"] == "ran"
    dask_manifest, dask_weights = _weights(store)
    assert dask_manifest["mlflow_run_id"] != thread_manifest["mlflow_run_id"], "train was produced again"
    # one task per branch, each inside a GPU slot given by its Dask worker (2 workers -> slots 0 and 1)
    placed = dict(re.findall(r"train: branch (freeze\d) on cpu \(GPU slot (\d)\)", out))
    assert sorted(placed) == ["freeze1", "freeze2", "freeze3"], out[-3000:]
    assert set(placed.values()) <= {"0", "1"}
    assert "LocalCluster" in out or "distributed.scheduler" in out
    assert dask_weights.keys() == thread_weights.keys()
    for name, tensor in thread_weights.items():
        assert torch.equal(tensor, dask_weights[name]), name
    # the branch tasks report to the flow's own Prefect server: no worker started a server of its own
    assert len(set(re.findall(r"Starting temporary server on (\S+)", out))) == 1
    train_runs = [r for r in runs_of(store) if r.data.tags.get("mlflow.runName") == "train"]
    assert len(train_runs) == 2 and all(r.info.status == "FINISHED" for r in train_runs)


@pytest.mark.slow
def test_process_runner_reproduces_the_thread_runners_stages(smoke_store, tmp_path):
    """`run.task_runner=process` runs stages in worker processes; patches and augment come out the same.

    A copy of the session's smoke run (thread runner) is the reference; patches and augment are forced
    again under the process runner: they are the first stages that read and write HDF5 through the worker
    boundary, and their metrics count every patch.
    """
    from tests.helpers.smoke_store import copy_store

    store = copy_store(smoke_store, tmp_path / "store")

    def metrics(stage: str) -> dict[str, float]:
        (folder,) = [p for p in (store / "stages" / stage).iterdir() if (p / "manifest.json").is_file()]
        found = json.loads((folder / "manifest.json").read_text())["metrics"]
        return {k: v for k, v in found.items() if not k.endswith("seconds")}

    before = {stage: metrics(stage) for stage in ("patches", "augment")}
    proc = mammo(store, "run", "-p", str(SMOKE), "--until", "augment", "--force", "patches",
                 "--set", "run.task_runner=process")
    assert stage_rows(proc.stdout + proc.stderr) == {"acquire": "cached", "curate": "cached", "patches": "ran",
                                                     "augment": "ran"}
    assert {stage: metrics(stage) for stage in ("patches", "augment")} == before
    assert before["patches"], "the patches stage records its counts"
