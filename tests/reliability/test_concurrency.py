"""Two `mammo run` processes on one fresh store at once: both finish, finished stages are shared.

The per-(stage, key) lock (mammo_core/storage/stage_lock.py) makes the second producer of a key wait and reuse."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.e2e.test_pipeline_e2e import REPO, SMOKE, runs_of
from tests.reliability.test_kill_anywhere import env_for

pytestmark = pytest.mark.slow


def test_two_runs_on_one_fresh_store(tmp_path):
    store = tmp_path / "store"
    base = [sys.executable, "-m", "flows.cli", "run", "-p", str(SMOKE), "--until", "curate"]
    procs = [
        subprocess.Popen(args, cwd=REPO, env=env_for(store), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
        for args in (base, [*base, "--set", "curate.max_side=256"])
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    acquire = [p for p in (store / "stages" / "acquire").iterdir()]
    assert len(acquire) == 1, "same key produced once, no temporary left behind"
    curate = sorted(p.name for p in (store / "stages" / "curate").iterdir())
    assert len(curate) == 2 and not any(name.startswith(".") for name in curate)
    for folder in (store / "stages" / "curate").iterdir():
        assert json.loads((folder / "manifest.json").read_text())["upstream"] == {"acquire": acquire[0].name}
    parents = [r for r in runs_of(store) if "mlflow.parentRunId" not in r.data.tags]
    assert sorted(r.info.status for r in parents) == ["FINISHED", "FINISHED"]


def test_two_identical_runs_until_train_share_every_stage(tmp_path):
    """Same params, same stages, at once: each stage is produced once (the other run waits on its lock and
    reuses it, tagged cache_hit=true with the producer's run), one sealed train folder, both parents end."""
    store = tmp_path / "store"
    args = [sys.executable, "-m", "flows.cli", "run", "-p", str(SMOKE), "--until", "train"]
    procs = [subprocess.Popen(args, cwd=REPO, env=env_for(store), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    train = sorted(p.name for p in (store / "stages" / "train").iterdir())
    assert len(train) == 1 and not train[0].startswith("."), train
    assert (store / "stages" / "train" / train[0] / "manifest.json").is_file()
    runs = runs_of(store)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert sorted(r.info.status for r in parents) == ["FINISHED", "FINISHED"]
    for stage in ("acquire", "curate", "patches", "augment", "train"):
        children = [r for r in runs if r.data.tags.get("stage") == stage]
        produced = [r for r in children if r.data.tags["cache_hit"] == "false"]
        reused = [r for r in children if r.data.tags["cache_hit"] == "true"]
        assert len(produced) == 1 and len(reused) == 1, (stage, [r.data.tags for r in children])
        assert reused[0].data.tags["source_run_id"] == produced[0].info.run_id
        assert {produced[0].data.tags["mlflow.parentRunId"], reused[0].data.tags["mlflow.parentRunId"]} == {
            p.info.run_id for p in parents}
        assert {r.info.status for r in children} == {"FINISHED"}
    assert not any((store / "scratch").rglob("checkpoint*.pt")), "the one training cleaned its scratch"
