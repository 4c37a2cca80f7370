"""Two `mammo run` processes on one fresh store at once: both finish, finished stages are shared."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_kill_anywhere import env_for
from tests.test_pipeline_e2e import REPO, SMOKE, runs_of

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
