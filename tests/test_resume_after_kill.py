"""Kill `mammo run` with SIGKILL while the train stage is between epochs, rerun, compare with no kill.

The rerun must continue from the last checkpoint (not from epoch 0), leave no partial stage folder, and
end with weights bit-identical to an uninterrupted run with the same seed (CPU).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_pipeline_e2e import SMOKE, stage_rows

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
ARGS = ["run", "-p", str(SMOKE), "--until", "train", "--set", "train.epochs=4"]


def env_for(store: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(MAMMO_STORE=str(store), COLUMNS="200")
    return env


def run(store: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *ARGS], cwd=REPO, env=env_for(store),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def train_folder(store: Path) -> Path:
    folders = [p for p in (store / "stages" / "train").iterdir() if not p.name.startswith(".")]
    assert len(folders) == 1
    return folders[0]


def test_killed_training_resumes_and_matches_an_uninterrupted_run(tmp_path):
    killed_store, clean_store = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *ARGS], cwd=REPO, env=env_for(killed_store),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoints = killed_store / "scratch" / "train"
    deadline = time.time() + 600
    try:
        while time.time() < deadline:  # wait for the first epoch's checkpoint, then kill mid-training
            if any(checkpoints.rglob("checkpoint.pt")):
                break
            assert proc.poll() is None, "the run ended before any checkpoint was written"
            time.sleep(0.05)
        else:
            pytest.fail("no training checkpoint appeared")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (killed_store / "stages" / "train").exists() or not any(
        p for p in (killed_store / "stages" / "train").iterdir() if not p.name.startswith(".")
    ), "a killed stage must not leave a sealed folder"

    resumed = run(killed_store)
    assert stage_rows(resumed.stdout + resumed.stderr)["train"] == "ran"
    folder = train_folder(killed_store)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["metrics"]["train/resumed_from_epoch"] >= 1
    assert not (checkpoints / folder.name).exists(), "scratch checkpoints are removed once the stage is sealed"

    run(clean_store)
    clean = train_folder(clean_store)
    assert clean.name == folder.name  # same inputs, same key
    assert json.loads((clean / "manifest.json").read_text())["metrics"]["train/resumed_from_epoch"] == 0
    a = torch.load(folder / "weights.pt", weights_only=True)
    b = torch.load(clean / "weights.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
