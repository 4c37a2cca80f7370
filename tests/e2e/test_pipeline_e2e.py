"""End to end: `mammo run -p params/smoke.yaml` through a real Prefect flow and real MLflow store.

The fresh run is the session's ``smoke_store`` (conftest), shared with other modules; the tests here work on
a copy of it: later tests exercise caching, param changes and Prefect-database loss on top of it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tasks import registry
from tasks.registry import ORDER
from tests.helpers.paths import REPO, SMOKE

pytestmark = pytest.mark.slow
STAGES = [spec.name for spec in ORDER]


def statuses(**given: str) -> dict[str, str]:
    """Expected table: ``default`` for every stage unless named (e.g. statuses(acquire="cached"))."""
    default = given.pop("default")
    return {name: given.get(name, default) for name in STAGES}


def mammo(store: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["MAMMO_STORE"] = str(store)
    env["COLUMNS"] = "200"
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"mammo {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def stage_rows(output: str) -> dict[str, str]:
    """stage -> status from the printed table."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.replace("┃", "│").split("│") if c.strip()]
        if len(cells) == 4 and cells[1] in ("ran", "cached", "failed"):
            rows[cells[0]] = cells[1]
    return rows


def client_for(store: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{store / 'mlflow.db'}")


def runs_of(store: Path) -> list:
    client = client_for(store)
    exp = client.get_experiment_by_name("mammo-fusion")
    return client.search_runs([exp.experiment_id], max_results=1000, order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="module")
def store(smoke_store, tmp_path_factory) -> Path:
    """A copy of the session's fresh smoke run (conftest), which the tests below rerun and change."""
    from tests.helpers.smoke_store import copy_store

    return copy_store(smoke_store, tmp_path_factory.mktemp("e2e") / "store")


def test_first_run_runs_every_stage_and_seals_folders(store):
    out = (store / "first_run.txt").read_text()
    assert stage_rows(out) == statuses(default="ran")
    for stage in STAGES:
        folders = [p for p in (store / "stages" / stage).iterdir() if not p.name.startswith(".")]
        assert len(folders) == 1
        manifest = json.loads((folders[0] / "manifest.json").read_text())
        assert manifest["stage"] == stage and manifest["key"] == folders[0].name
        assert manifest["mlflow_run_id"]
        assert all(len(f["sha256"]) == 64 for f in manifest["files"])
    curate = next(p for p in (store / "stages" / "curate").iterdir() if not p.name.startswith("."))
    for name in ("images.parquet", "lesions.parquet", "quarantine.parquet", "curation_report.json"):
        assert (curate / name).is_file(), name
    images = pd.read_parquet(curate / "images.parquet")
    lesions = pd.read_parquet(curate / "lesions.parquet")
    assert len(images) > 0 and len(lesions) >= len(images)
    assert set(images["split"]) <= {"train", "val", "test"}
    assert images.groupby("patient_id")["split"].nunique().max() == 1
    assert ((lesions["x1"] > lesions["x0"]) & (lesions["y1"] > lesions["y0"])).all()
    assert (lesions["x1"] <= lesions["image_id"].map(images.set_index("image_id")["width"])).all()


def test_mlflow_parent_and_child_runs(store):
    runs = runs_of(store)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) >= 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect_flow_run_id"]
    assert parent.data.tags["params_file"].endswith("smoke.yaml")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    by_name = {r.data.tags["mlflow.runName"]: r for r in children}
    assert set(by_name) == set(STAGES)
    curate = by_name["curate"]
    assert curate.data.tags["cache_hit"] == "false"
    assert curate.data.metrics["curate/images"] > 0
    assert "curate.max_side" in curate.data.params
    folder = store / "stages" / "curate" / curate.data.tags["stage_key"]
    assert json.loads((folder / "manifest.json").read_text())["mlflow_run_id"] == curate.info.run_id
    assert curate.inputs.dataset_inputs, "curated tables are logged as dataset inputs"


def test_second_run_is_all_cached_with_child_runs(store):
    before = {r.info.run_id for r in runs_of(store)}
    proc = mammo(store, "run", "-p", str(SMOKE))
    assert stage_rows(proc.stdout + proc.stderr) == statuses(default="cached")
    new = [r for r in runs_of(store) if r.info.run_id not in before]
    parent = next(r for r in new if "mlflow.parentRunId" not in r.data.tags)
    children = {r.data.tags["mlflow.runName"]: r for r in new if "mlflow.parentRunId" in r.data.tags}
    assert set(children) == set(STAGES)
    for run in children.values():
        assert run.data.tags["cache_hit"] == "true"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["source_run_id"] in before
    assert children["curate"].data.metrics["curate/images"] > 0


def test_param_change_reruns_that_stage_and_descendants_only(store):
    """A hashing param re-runs hashing, classify and report; detect and baselines (other branches) are reused."""
    proc = mammo(store, "run", "-p", str(SMOKE), "--set", "hashing.epochs=4")
    expected = {name: ("ran" if name in {"hashing", "classify", "report"} else "cached") for name in STAGES}
    assert registry.descendants("hashing") == {"hashing", "classify", "report"}
    assert stage_rows(proc.stdout + proc.stderr) == expected


def test_deleted_prefect_database_still_skips(store):
    assert (store / "prefect").is_dir(), "the runs above used a Prefect database in the store"
    shutil.rmtree(store / "prefect")
    proc = mammo(store, "run", "-p", str(SMOKE))
    assert stage_rows(proc.stdout + proc.stderr) == statuses(default="cached")


def test_status_lists_stages(store):
    proc = mammo(store, "status", "-p", str(SMOKE))
    assert "acquire" in proc.stdout and "curate" in proc.stdout and "done" in proc.stdout


def test_force_reruns_stage(store):
    proc = mammo(store, "run", "-p", str(SMOKE), "--only", "curate", "--force", "curate")
    assert stage_rows(proc.stdout + proc.stderr) == {"curate": "ran"}
    proc = mammo(store, "run", "-p", str(SMOKE), "--force", "features")
    expected = {name: ("ran" if name in registry.descendants("features") else "cached") for name in STAGES}
    assert stage_rows(proc.stdout + proc.stderr) == expected


def test_bad_params_fail_fast_with_key(store, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SMOKE.read_text() + "\nextra_section:\n  x: 1\n")
    proc = mammo(store, "run", "-p", str(bad), check=False)
    assert proc.returncode == 2
    assert "extra_section: unknown key" in proc.stderr


def test_phantom_patient_names_never_reach_the_store(store):
    """The phantom writes PatientName into every DICOM; it must appear in no output but the raw files."""
    acquire = next(p for p in (store / "stages" / "acquire").iterdir() if not p.name.startswith("."))
    import pydicom

    first = next((acquire / "raw").rglob("*.dcm"))
    name = str(pydicom.dcmread(first, stop_before_pixels=True).PatientName)
    assert name, "phantom DICOMs carry a PatientName"
    needle = name.encode()
    leaks = []
    for path in store.rglob("*"):
        if path.is_file() and "raw" not in path.relative_to(store).parts and needle in path.read_bytes():
            leaks.append(str(path))
    assert leaks == []


def test_similar_finds_training_cases_for_a_phantom_mammogram(store):
    """`mammo similar` on a real phantom DICOM with a lesion box: k training cases, no patient ids."""
    curate = next(p for p in (store / "stages" / "curate").iterdir() if not p.name.startswith("."))
    lesion = pd.read_parquet(curate / "lesions.parquet").query("split == 'test'").iloc[0]
    acquire = next(p for p in (store / "stages" / "acquire").iterdir() if not p.name.startswith("."))
    folder = next((acquire / "raw" / "CBIS-DDSM").glob(f"*_{lesion.image_id}"))
    dicom = next(folder.rglob("*.dcm"))
    box = f"{lesion.x0},{lesion.y0},{lesion.x1},{lesion.y1}"
    proc = mammo(store, "similar", str(dicom), "--box", box, "-k", "3", "-p", str(SMOKE), "--json")
    result = json.loads(proc.stdout)
    cases = result["results"]
    assert result["k"] == 3 and result["database_size"] > 3
    assert [c["rank"] for c in cases] == [1, 2, 3]
    assert all(c["distance"] >= 0 for c in cases)
    assert cases == sorted(cases, key=lambda c: (c["distance"], c["rank"]))
    assert lesion.patient_id not in proc.stdout and "P_0" not in proc.stdout
