"""Stage keys cover what decides a stage's output: code (import closure), libraries, data, weights.

Key computations only (no pipeline run): each test computes the real registry keys for the smoke params,
changes one thing (a module in a copy of the tree, a library version, a file under data.root, a weights
file) and checks exactly which keys moved.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from mammo_core.config import load_params
from mammo_core.storage import code_closure, library_versions
from tasks import registry
from tests.helpers.paths import REPO, SMOKE

ALL = {spec.name for spec in registry.ORDER}


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory) -> Path:
    """The project's packages and tests copied to a temporary folder (edited by the tests below)."""
    root = tmp_path_factory.mktemp("tree")
    for package in (*code_closure.PROJECT_PACKAGES, "tests"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__", "data"))
    return root


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {s for s in before if before[s] != after[s]}


def _append(path: Path, text: str) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(text)


def test_the_closure_finds_what_the_hand_kept_lists_missed() -> None:
    acquire = code_closure.closure("tasks.stages.acquire", REPO).modules
    assert {"mammo_core.sources.phantom_render", "mammo_core.sources.safe_zip",
            "mammo_core.sources.tcia"} <= set(acquire)
    features = code_closure.closure("tasks.stages.features", REPO).modules
    assert "mammo_core.codes.classifiers" in features  # fusion's simplex_grid
    assert "tasks.registry" not in acquire  # the dispatch table would make every stage depend on all others
    assert "mammo_core.detection.engine" not in acquire


def test_relative_and_from_package_imports_are_followed(tmp_path: Path) -> None:
    pkg = tmp_path / "mammo_core" / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / "mammo_core" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\nfrom .c import thing\n\ndef f():\n    from .. import lazy\n")
    (pkg / "b.py").write_text("import numpy\n")
    (pkg / "c.py").write_text("thing = 1\nfrom mammo_core.sub import d\n")
    (pkg / "d.py").write_text("import json\nimport sklearn.svm\n")
    (tmp_path / "mammo_core" / "lazy.py").write_text("")
    (pkg / "unused.py").write_text("")
    found = code_closure.closure("mammo_core.sub.a", tmp_path)
    assert set(found.modules) == {"mammo_core", "mammo_core.sub", "mammo_core.sub.a", "mammo_core.sub.b",
                                  "mammo_core.sub.c", "mammo_core.sub.d", "mammo_core.lazy"}
    assert found.third_party == {"numpy", "sklearn"}


def test_editing_a_module_changes_exactly_the_stages_that_reach_it_and_their_descendants(tree_copy: Path) -> None:
    params = load_params(SMOKE)
    base = registry.stage_keys(params, code_root=tree_copy)
    assert base == registry.stage_keys(params, code_root=tree_copy)  # stable

    _append(tree_copy / "mammo_core" / "detection" / "engine.py", "\n# an edit deep in detect's closure\n")
    after_engine = registry.stage_keys(params, code_root=tree_copy)
    assert changed(base, after_engine) == {"detect", "report"}

    _append(tree_copy / "mammo_core" / "codes" / "classifiers.py", "\n# fusion.simplex_grid lives here\n")
    after_classifiers = registry.stage_keys(params, code_root=tree_copy)
    # detect is not among them: its served model logs through tasks/serving/registration.py, not the classifier's
    assert changed(after_engine, after_classifiers) == {"features", "hashing", "classify", "baselines", "report"}

    _append(tree_copy / "mammo_core" / "sources" / "phantom_render.py", "\n# the phantom's pixels\n")
    after_render = registry.stage_keys(params, code_root=tree_copy)
    assert changed(after_classifiers, after_render) == ALL  # acquire, and everything descends from it

    _append(tree_copy / "tests" / "core" / "storage" / "test_store.py", "\n# a test is no stage's code\n")
    (tree_copy / "mammo_core" / "notes.txt").write_text("not a module")
    assert registry.stage_keys(params, code_root=tree_copy) == after_render


def test_library_versions_enter_the_keys_of_the_stages_that_import_them(monkeypatch) -> None:
    params = load_params(SMOKE)
    base = registry.stage_keys(params)
    real_version = library_versions.metadata.version

    def bumped(dist: str) -> str:
        return "999.0" if dist in bump else real_version(dist)

    monkeypatch.setattr(library_versions.metadata, "version", bumped)
    # scikit-learn: the patches stage's shortcut probe imports it, so patches and everything downstream of it
    for dist, expected in (("scikit-learn", ALL - {"acquire", "curate"}),
                           ("pyarrow", ALL),  # pandas' Parquet backend: the inventory acquire writes
                           ("prefect", set())):  # orchestration never decides numbers
        bump = {dist}
        library_versions.version_of.cache_clear()
        assert changed(base, registry.stage_keys(params)) == expected, dist
    library_versions.version_of.cache_clear()


def _cbis_local_params(root: Path):
    return load_params(SMOKE, ["data.source=cbis-local", f"data.root={root}"])


def test_local_data_changes_the_acquire_key(tmp_path: Path) -> None:
    data = tmp_path / "cbis"
    (data / "P_00001" / "1.2.3").mkdir(parents=True)
    image = data / "P_00001" / "1.2.3" / "1-1.dcm"
    image.write_bytes(b"\0" * 4096)
    table = data / "mass_case_description_train_set.csv"
    table.write_text("patient_id,pathology\nP_00001,MALIGNANT\n")
    params = _cbis_local_params(data)

    def acquire_key() -> str:
        return registry.stage_keys(params)["acquire"]

    base = acquire_key()
    assert registry.stage_keys(params)["curate"] == registry.stage_keys(params)["curate"]

    (data / ".DS_Store").write_bytes(b"x")  # hidden and partial files are not data
    (data / "P_00001" / "1.2.3" / "1-2.dcm.part").write_bytes(b"x")
    assert acquire_key() == base

    extra = data / "P_00001" / "1.2.3" / "1-2.dcm"
    extra.write_bytes(b"\1" * 10)
    added = acquire_key()
    assert added != base
    extra.unlink()
    assert acquire_key() == base  # the same files again: the same key

    stat = image.stat()
    image.write_bytes(b"\7" * 4096)  # replaced, same size
    assert acquire_key() != base
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert acquire_key() == base  # images: paths, sizes and times (no content hash on 160 GB)

    stat = table.stat()
    table.write_text("patient_id,pathology\nP_00001,BENIGN___\n")  # same size, mtime put back
    os.utime(table, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert acquire_key() != base  # the tables are hashed in full


def test_weights_that_fall_back_to_random_init_do_not_share_a_key(tmp_path: Path, monkeypatch) -> None:
    import torch

    r50 = tmp_path / "r50.pth"
    dense = tmp_path / "densenet.pth"
    params = load_params(SMOKE, [f"detect.r50_weights={r50}", f"train.weights={dense}"])
    missing = registry.stage_keys(params)

    torch.save({"w": torch.zeros(3)}, r50)
    with_r50 = registry.stage_keys(params)
    assert changed(missing, with_r50) == {"detect", "report"}
    torch.save({"w": torch.ones(3)}, r50)  # other weights, same size
    assert changed(with_r50, registry.stage_keys(params)) == {"detect", "report"}

    torch.save({"w": torch.zeros(3)}, dense)
    assert "train" in changed(missing, registry.stage_keys(params))

    # the baselines' ImageNet files come from the torch hub cache; absent ones mean random init
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    imagenet = load_params(SMOKE, ["baselines.weights=imagenet"])
    absent = registry.stage_keys(imagenet)
    target = Path(torch.hub.get_dir()) / "checkpoints" / "resnet50-0676ba61.pth"  # where torchvision looks
    target.parent.mkdir(parents=True)
    torch.save({"fc.weight": torch.zeros(1)}, target)
    # detect too: its ResNet-50 baseline (r50_weights: imagenet in smoke) starts from the same file
    assert changed(absent, registry.stage_keys(imagenet)) == {"baselines", "detect", "report"}
