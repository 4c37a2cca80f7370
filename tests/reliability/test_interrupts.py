"""Ctrl-C, SIGTERM and SIGKILL of a real `mammo run`, at three points of the smoke pipeline.

Each test starts ``python -m flows.cli run`` in its own process group on a copy of the session's smoke store
(one copy for the module: a stopped run seals nothing, so the next test finds the store as it was), with
``--only <stage> --force <stage>`` so that only the stage under test runs. A ``slow`` fault point
(:mod:`mammo_core.runtime.faults`) inside the loop under test slows each step a little and writes a marker file when
the run gets there; the test then sends the real signal and checks what a user relies on:

- the process exits within 10 s of the signal, with 130 (SIGINT) or 143 (SIGTERM);
- no process of the run lives on: not its pool workers, not its temporary Prefect server;
- the pipeline's MLflow run and the stage's child run are KILLED, no run of it is left RUNNING;
- the store is consistent: every folder at a final path is sealed and matches its manifest, the stopped
  stage left no temporary folder; training keeps the checkpoint of its finished epoch (the resume needs it);
- the resume command is printed.

SIGKILL cannot be handled; after it, the run's helper processes must still end (they die with their parent).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from mammo_core.storage.store import ArtifactStore
from tests.helpers.paths import REPO, SMOKE
from tests.helpers.smoke_store import copy_store

EXIT_WITHIN_S = 10.0
REACH_TIMEOUT_S = 400.0
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(smoke_store, tmp_path_factory) -> Path:
    return copy_store(smoke_store, tmp_path_factory.mktemp("interrupts") / "store")


@dataclass
class Stopped:
    returncode: int
    seconds_to_exit: float
    output: str
    survivors: list[str]  # processes of the run still alive after it ended
    helpers_seen: int  # descendants the run had when the signal came (pool workers, Prefect server)


def _start(store: Path, stage: str, point: str, skip: int, work: Path) -> tuple[subprocess.Popen, Path, Path]:
    marker, log = work / f"{stage}.reached", work / f"{stage}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "MAMMO_FAULT"))}
    env.update(MAMMO_FAULT=f"slow:{point}", MAMMO_FAULT_SKIP=str(skip), MAMMO_FAULT_REACHED=str(marker),
               MAMMO_FAULT_SLOW_S="0.3", COLUMNS="200")
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", "-p", str(SMOKE), "--store", str(store), "--only", stage,
             "--force", stage], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)  # its own process group: a Ctrl-C goes to the group, as in a terminal
    return proc, marker, log


def _alive(processes: list[psutil.Process]) -> list[str]:
    out = []
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(" ".join(p.cmdline()[:6]))
    return out


def stop_at(store: Path, stage: str, point: str, how: str, work: Path, skip: int = 0) -> Stopped:
    """Run ``--only stage``, wait until ``point`` is reached, stop it ``how``; what was left."""
    proc, marker, log = _start(store, stage, point, skip, work)
    helpers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + REACH_TIMEOUT_S
        while not marker.exists():
            assert proc.poll() is None, f"the run ended before {point}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"{point} not reached in {REACH_TIMEOUT_S} s"
            time.sleep(0.1)
        helpers = psutil.Process(proc.pid).children(recursive=True)
        sent = time.monotonic()
        if how == "SIGINT to the group":
            os.killpg(proc.pid, signal.SIGINT)
        elif how == "SIGTERM":
            proc.send_signal(signal.SIGTERM)
        else:
            proc.kill()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{how}: still running 60 s after the signal:\n{log.read_text()[-4000:]}")
        seconds = time.monotonic() - sent
        psutil.wait_procs(helpers, timeout=5)
        survivors = _alive(helpers)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 0)
            survivors.append(f"a process in the run's group {proc.pid}")
    finally:
        for p in helpers:  # never leave anything behind, whatever the assertions say
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return Stopped(proc.returncode, seconds, log.read_text(encoding="utf-8", errors="replace"), survivors,
                   len(helpers))


def check_graceful(stopped: Stopped, store: Path, stage: str, code: int) -> str:
    """Everything a stopped (not killed) run promises; returns the MLflow id of the stopped stage's run."""
    out = stopped.output
    assert stopped.returncode == code, out[-4000:]
    assert stopped.seconds_to_exit <= EXIT_WITHIN_S, f"exit took {stopped.seconds_to_exit:.1f} s"
    assert not stopped.survivors, f"left running: {stopped.survivors}"
    name = signal.Signals(code - 128).name
    assert f"stopped by {name} during stage {stage}" in out, "the stage did not stop by itself"
    assert "without waiting for the stage" not in out, "the deadline's hard stop ended the run"
    found = re.search(r"mammo run --resume ([0-9a-f]{32}) --store (\S+)", out)
    assert found, f"no resume command printed:\n{out[-3000:]}"
    assert Path(found.group(2)) == store
    parent = found.group(1)
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    assert client.get_run(parent).info.status == "KILLED"
    runs = client.search_runs([client.get_run(parent).info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    stopped_runs = [r for r in runs if r.data.tags.get("stage") == stage and r.data.tags.get("cache_hit") == "false"]
    assert [r.info.status for r in stopped_runs] == ["KILLED"], [r.info.status for r in stopped_runs]
    assert "stopped by" in stopped_runs[0].data.tags.get("ended_by", "")
    art = ArtifactStore(store)
    for folder in sorted((store / "stages").glob("*/*")):
        if folder.name.startswith("."):
            continue
        sealed = art.find(folder.parent.name, folder.name)
        assert sealed is not None, f"{folder}: at a final path without its manifest"
        art.verify(sealed)  # every file matches its manifest (sha256, size), nothing extra
    assert not list((store / "stages" / stage).glob(".tmp-*")), "the stopped stage left its temporary folder"
    return stopped_runs[0].data.tags["stage_key"]


def test_ctrl_c_during_curates_worker_pool(store, tmp_path):
    stopped = stop_at(store, "curate", "curate:image:*", "SIGINT to the group", tmp_path)
    assert stopped.helpers_seen >= 2, "the pool workers and the Prefect server were running"
    check_graceful(stopped, store, "curate", 130)


def test_sigterm_during_a_training_epoch_keeps_the_checkpoint(store, tmp_path):
    # smoke: 136 rows in batches of 32 = 5 batches per epoch; past 6 batches, epoch 1's checkpoint is written
    stopped = stop_at(store, "train", "train:batch", "SIGTERM", tmp_path, skip=6)
    key = check_graceful(stopped, store, "train", 143)
    assert "during training epoch 2" in stopped.output
    scratch = store / "scratch" / "train" / key
    assert any(p.is_file() for p in scratch.rglob("*")), f"the checkpoint of epoch 1 is gone from {scratch}"


def test_ctrl_c_during_detection_training(store, tmp_path):
    stopped = stop_at(store, "detect", "detect:batch", "SIGINT to the group", tmp_path)
    check_graceful(stopped, store, "detect", 130)
    assert "during detector training epoch 1" in stopped.output


def test_sigkill_leaves_no_process_behind(store, tmp_path):
    stopped = stop_at(store, "curate", "curate:image:*", "SIGKILL", tmp_path)
    assert stopped.returncode == -signal.SIGKILL
    assert stopped.helpers_seen >= 2, "the pool workers and the Prefect server were running"
    assert not stopped.survivors, f"orphans after SIGKILL: {stopped.survivors}"
