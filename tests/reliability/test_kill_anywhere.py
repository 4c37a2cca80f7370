"""Kill-anywhere: SIGKILL the smoke pipeline at named points, rerun, and end where an unkilled run ends.

Why this shape (it must stay cheap, the whole suite has a 20-minute budget on 2 cores):

- The reference is the session's uninterrupted full smoke run (``smoke_store`` in conftest, shared with
  other tests). The killed chain stops at ``--until classify``: classify is the last stage of the
  classification chain, and the detect and baselines stages share the same runtime, store and checkpoint
  code (and have their own resume tests), so stopping there exercises every kind of kill point at about
  half the cost of a full run.
- ONE store that is killed repeatedly: run 1 dies at point A, its rerun dies at point B, ... each rerun
  resumes from whatever the previous kill left, which is the situation a user is in after a crash;
  finally a clean rerun completes.
- Kill points of the store itself: after a seal but before its MLflow run is finished, inside an MLflow
  database write, inside a ``--force`` swap (mammo_core/storage/store.py); each ends with the old or the new sealed
  folder in place and, after the rerun, every sealed stage's MLflow run FINISHED.
- The kill comes from the process itself (``MAMMO_FAULT=kill:<point>``, :mod:`mammo_core.runtime.faults`), so it
  lands at an exact place (inside a stage, inside an HDF5 chunk write, between a checkpoint's temporary
  file and its rename, inside MLflow logging, after a stage's work but before its seal). The marker file
  (``MAMMO_FAULT_ONCE``) records the point that fired, so a kill that never fired cannot pass.

After every kill: no folder at a final stage path lacks its manifest, every sealed folder's files match
their manifest (sha256 and size, no extra file), and the stage the kill landed in is not sealed. At the
end: the same stage keys as the reference, the same metrics (timings excepted), train resumed from a
checkpoint rather than epoch 0, and an MLflow database in which every sealed stage's run is FINISHED.

The outcome is built once per session (``kill_anywhere`` fixture in conftest) so the reliability summary
(tests/reliability/test_reliability.py) counts the same kills without running them again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.helpers.paths import REPO, SMOKE

UNTIL = "classify"
STAGES = ("acquire", "curate", "patches", "augment", "train", "features", "hashing", "classify")
ARGS = ("run", "-p", str(SMOKE), "--until", UNTIL)
RUN_TIMEOUT_S = 600
# Metrics that measure the clock or the resume itself, not the result.
TIMING_METRIC = re.compile(r"(seconds|_ms|latency.*|per_second|resumed_from_epoch)$")
pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class KillPoint:
    """Where one run of the chain dies: ``fault`` for MAMMO_FAULT, the first matches skipped, the stage hit.

    ``sealed``: the kill lands after ``stage`` is sealed (so it counts as sealed); ``args``: extra CLI
    arguments of that run (``--force``).
    """

    label: str
    fault: str
    skip: int
    stage: str
    sealed: bool = False
    args: tuple[str, ...] = ()

    @property
    def sealed_after(self) -> list[str]:
        """The stages sealed once this kill has happened."""
        return list(STAGES[: STAGES.index(self.stage) + (1 if self.sealed else 0)])


# In chain order: each run resumes from what the previous kill left. The first MLflow log call of a fresh
# store is acquire's own metrics (later runs log cache-hit child runs first), the first HDF5 chunk write
# after curate is the patches file, and the smoke schedule writes one checkpoint per epoch (2 epochs):
# skipping one lands the kill after epoch 2's checkpoint is on disk but before it is renamed into place.
# Then features is sealed but killed before its MLflow run ends (the next run finishes that run instead of
# marking it KILLED); that next run dies inside its first MLflow database write (closing the orphaned runs,
# between the SQL statement and its commit); then `--force features` dies inside the swap of the new sealed
# folder with the old one (after the exchange, before the old one is removed).
KILL_PLAN = (
    KillPoint("mlflow logging inside acquire", "kill:mlflow:log", 0, "acquire"),
    KillPoint("curate stage start", "kill:stage:curate:start", 0, "curate"),
    KillPoint("HDF5 chunk write in patches", "kill:h5:write", 0, "patches"),
    KillPoint("checkpoint write mid-training (epoch 2)", "kill:checkpoint:write", 1, "train"),
    KillPoint("features sealed, its MLflow run not yet finished", "kill:stage:features:sealed", 0, "features",
              sealed=True),
    KillPoint("inside an MLflow database write (before commit)", "kill:mlflow:db-write", 0, "hashing"),
    KillPoint("inside the --force swap of features", "kill:store:swap", 0, "features", sealed=True,
              args=("--force", "features")),
    KillPoint("hashing stage end, before its seal", "kill:stage:hashing:end", 0, "hashing"),
)


@dataclass
class KillRecord:
    point: KillPoint
    returncode: int
    fired_at: str | None
    sealed_after: list[str]
    problems: list[str]

    @property
    def survived(self) -> bool:
        return (self.returncode == -signal.SIGKILL and self.fired_at == self.point.fault.split(":", 1)[1]
                and not self.problems and self.sealed_after == self.point.sealed_after)


@dataclass
class KillAnywhereOutcome:
    reference: Path
    killed: Path
    kills: list[KillRecord] = field(default_factory=list)
    final_returncode: int | None = None
    final_output: str = ""
    final_problems: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "kill_points": [k.point.label for k in self.kills],
            "kill_points_survived": sum(k.survived for k in self.kills) if self.final_returncode == 0 else 0,
            "final_problems": self.final_problems,
            # folders killed runs left behind (never sealed, never at a final path): disk that no code reclaims
            "abandoned_temporary_folders": sorted(p.parent.name for p in (self.killed / "stages").glob("*/.tmp-*")),
        }


def env_for(store: Path, fault: KillPoint | None = None, marker: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "MAMMO_FAULT"))}
    env.update(MAMMO_STORE=str(store), COLUMNS="200")
    if fault is not None:
        assert marker is not None
        env.update(MAMMO_FAULT=fault.fault, MAMMO_FAULT_SKIP=str(fault.skip), MAMMO_FAULT_ONCE=str(marker))
    return env


def run_cli(env: dict[str, str], log: Path, extra_args: tuple[str, ...] = ()) -> tuple[int, str]:
    """Run ``mammo run`` in its own session; after it ends, kill what it may have orphaned.

    Output goes to a file, not a pipe: a process killed with SIGKILL leaves its children (the temporary
    Prefect server, pool workers) holding a pipe open, and reading it to EOF would wait for them.
    """
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *ARGS, *extra_args], cwd=REPO, env=env, text=True,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=RUN_TIMEOUT_S)
        finally:
            with contextlib.suppress(ProcessLookupError):  # the group is gone when nothing was orphaned
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, log.read_text(encoding="utf-8", errors="replace")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sealed_stages(store: Path) -> list[str]:
    return [s for s in STAGES if any((p / "manifest.json").is_file() for p in _final_folders(store, s))]


def _final_folders(store: Path, stage: str) -> list[Path]:
    parent = store / "stages" / stage
    return [p for p in parent.iterdir() if not p.name.startswith(".")] if parent.is_dir() else []


def store_problems(store: Path) -> list[str]:
    """Every way the store breaks the sealing contract (empty when consistent); computed from the files."""
    problems = []
    for stage in STAGES:
        for folder in _final_folders(store, stage):
            manifest_path = folder / "manifest.json"
            if not manifest_path.is_file():
                problems.append(f"{folder}: at a final path without manifest.json (partial folder)")
                continue
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            if manifest.get("key") != folder.name or manifest.get("stage") != stage:
                problems.append(f"{folder}: manifest names {manifest.get('stage')}/{manifest.get('key')}")
            listed = {entry["path"]: entry for entry in manifest.get("files", [])}
            on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
            for extra in sorted(on_disk - set(listed) - {"manifest.json"}):
                problems.append(f"{folder}: {extra} is not in the manifest")
            for rel, entry in listed.items():
                f = folder / rel
                if not f.is_file():
                    problems.append(f"{folder}: {rel} listed but missing")
                elif f.stat().st_size != entry["size"] or _sha256(f) != entry["sha256"]:
                    problems.append(f"{folder}: {rel} does not match its manifest sha256/size")
    return problems


def _sealed(store: Path, stage: str) -> Path:
    (folder,) = [p for p in _final_folders(store, stage) if (p / "manifest.json").is_file()]
    return folder


def manifests(store: Path) -> dict[str, dict]:
    out = {}
    for stage in STAGES:
        folders = [p for p in _final_folders(store, stage) if (p / "manifest.json").is_file()]
        assert len(folders) == 1, f"{stage}: expected one sealed folder, found {folders}"
        out[stage] = json.loads((folders[0] / "manifest.json").read_text(encoding="utf-8"))
    return out


def result_metrics(manifest: dict) -> dict[str, float]:
    return {k: v for k, v in manifest["metrics"].items() if not TIMING_METRIC.search(k)}


def mlflow_problems(store: Path) -> list[str]:
    """Each sealed stage's MLflow run exists and FINISHED; the last parent run FINISHED (database readable)."""
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    problems = []
    for stage, manifest in manifests(store).items():
        run = client.get_run(manifest["mlflow_run_id"])
        if run.info.status != "FINISHED":
            problems.append(f"{stage}: MLflow run {run.info.run_id} is {run.info.status}")
        if run.data.tags.get("stage_key") != manifest["key"]:
            problems.append(f"{stage}: MLflow run tagged {run.data.tags.get('stage_key')}, manifest {manifest['key']}")
    exp = client.get_experiment_by_name("mammo-fusion")
    parents = [r for r in client.search_runs([exp.experiment_id], max_results=1000,
                                             order_by=["attributes.start_time DESC"])
               if "mlflow.parentRunId" not in r.data.tags]
    if not parents or parents[0].info.status != "FINISHED":
        problems.append(f"last parent run is {parents[0].info.status if parents else 'missing'}")
    # the killed runs' processes are gone: the next run marked their MLflow runs KILLED, none shows as running
    running = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'", max_results=1000)
    problems += [f"run {r.info.run_id} ({r.info.run_name}) still RUNNING" for r in running]
    return problems


def run_kill_anywhere(base: Path, reference: Path | None = None) -> KillAnywhereOutcome:
    """Run the kill chain and the final clean rerun; record what happened.

    ``reference`` is a store holding an uninterrupted smoke run (the session's ``smoke_store``: a full run
    covers every stage up to classify with the same params); without it one is run here first.
    """
    outcome = KillAnywhereOutcome(reference=reference or base / "reference", killed=base / "killed")
    if reference is None:
        code, out = run_cli(env_for(outcome.reference), base / "reference.log")
        assert code == 0, f"reference run failed ({code}):\n{out[-4000:]}"
    for i, point in enumerate(KILL_PLAN):
        marker = base / f"fault-{i}.fired"
        code, _ = run_cli(env_for(outcome.killed, point, marker), base / f"kill-{i}.log", point.args)
        outcome.kills.append(KillRecord(
            point=point,
            returncode=code,
            fired_at=marker.read_text() if marker.is_file() else None,
            sealed_after=sealed_stages(outcome.killed),
            problems=store_problems(outcome.killed),
        ))
    outcome.final_returncode, outcome.final_output = run_cli(env_for(outcome.killed), base / "final.log")
    if outcome.final_returncode == 0:
        outcome.final_problems = store_problems(outcome.killed) + mlflow_problems(outcome.killed)
        ref, got = manifests(outcome.reference), manifests(outcome.killed)
        for stage in STAGES:
            if got[stage]["key"] != ref[stage]["key"]:
                outcome.final_problems.append(f"{stage}: key {got[stage]['key']} != reference {ref[stage]['key']}")
            a, b = result_metrics(got[stage]), result_metrics(ref[stage])
            if a != b:
                diff = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
                outcome.final_problems.append(f"{stage}: metrics differ from the reference: {diff}")
    return outcome


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(KILL_PLAN)), ids=[p.label for p in KILL_PLAN])
def test_each_kill_fires_where_planned_and_leaves_a_consistent_store(kill_anywhere, index):
    record = kill_anywhere.kills[index]
    point = record.point
    assert record.returncode == -signal.SIGKILL, f"{point.label}: the run was not killed ({record.returncode})"
    expected = point.fault.split(":", 1)[1]
    assert record.fired_at == expected, f"{point.label}: fired at {record.fired_at!r}"
    assert record.problems == []
    # the kill landed inside the planned stage: everything before it is sealed, it (unless the kill came after
    # its seal) and what follows are not
    assert record.sealed_after == point.sealed_after, record.sealed_after


def test_rerun_after_the_kills_completes_and_equals_the_uninterrupted_run(kill_anywhere):
    assert kill_anywhere.final_returncode == 0, kill_anywhere.final_output[-4000:]
    assert kill_anywhere.final_problems == []
    got = manifests(kill_anywhere.killed)
    assert got["train"]["metrics"]["train/resumed_from_epoch"] >= 1, "train resumed from its checkpoint"
    ref = manifests(kill_anywhere.reference)
    # torch.save's bytes are not reproducible, its tensors are: compare every tensor, bit for bit
    killed, reference = (torch.load(_sealed(store, "train") / "weights.pt", weights_only=True)
                         for store in (kill_anywhere.killed, kill_anywhere.reference))
    assert killed.keys() == reference.keys()
    assert all(torch.equal(killed[k], reference[k]) for k in killed), "weights after a mid-training kill differ"
    assert result_metrics(got["classify"]) == result_metrics(ref["classify"])
    assert result_metrics(got["classify"])["classify/fusion/test_acc"] > 0
    assert not any((kill_anywhere.killed / "scratch").rglob("checkpoint.pt")), "scratch removed once sealed"


def test_killed_runs_leave_no_temporary_stage_folder_after_the_rerun(kill_anywhere):
    """A killed run's temporary folder is never sealed, and the rerun of that stage reclaims it."""
    for stage in STAGES:
        parent = kill_anywhere.killed / "stages" / stage
        leftovers = [p for p in parent.iterdir() if p.name.startswith(".") and (p / "manifest.json").exists()]
        assert leftovers == [], f"{stage}: a temporary folder carries a manifest: {leftovers}"
    assert kill_anywhere.summary()["abandoned_temporary_folders"] == []
