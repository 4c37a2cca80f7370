import json
import os
import subprocess
import sys
import threading

import pytest

from mammo_core.storage import store as store_mod
from mammo_core.storage.store import ArtifactStore, IntegrityError, canonical_json, stage_key
from tests.helpers.paths import REPO


def test_key_depends_on_each_input():
    base = stage_key("curate", "code1", {"a": 1, "b": [1, 2]}, {"acquire": "k1"})
    assert base == stage_key("curate", "code1", {"b": [1, 2], "a": 1}, {"acquire": "k1"})  # order-free
    others = {
        stage_key("patches", "code1", {"a": 1, "b": [1, 2]}, {"acquire": "k1"}),
        stage_key("curate", "code2", {"a": 1, "b": [1, 2]}, {"acquire": "k1"}),
        stage_key("curate", "code1", {"a": 2, "b": [1, 2]}, {"acquire": "k1"}),
        stage_key("curate", "code1", {"a": 1, "b": [1, 2]}, {"acquire": "k2"}),
    }
    assert base not in others and len(others) == 4


def test_source_digest_follows_code(tmp_path, monkeypatch):
    mod_file = tmp_path / "fake_stage_mod.py"
    mod_file.write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import fake_stage_mod

    d1 = store_mod.source_digest([fake_stage_mod])
    mod_file.write_text("X = 2\n")
    assert store_mod.source_digest([fake_stage_mod]) != d1


def test_seal_writes_manifest_last_and_atomically(tmp_path):
    art = ArtifactStore(tmp_path)
    tmp = art.begin("curate", "k1")
    (tmp / "a.txt").write_text("hello")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "b.bin").write_bytes(b"\x00" * 10)
    assert art.find("curate", "k1") is None  # not visible before sealing
    folder = art.seal("curate", "k1", tmp, params={"x": 1}, upstream={"acquire": "a"},
                      metrics={"m": 2}, mlflow_run_id="r1")
    assert not tmp.exists()
    m = json.loads((folder.path / "manifest.json").read_text())
    assert {f["path"] for f in m["files"]} == {"a.txt", "sub/b.bin"}
    assert m["files"][0]["size"] == 5
    assert m["params"] == {"x": 1} and m["upstream"] == {"acquire": "a"} and m["metrics"] == {"m": 2.0}
    assert m["mlflow_run_id"] == "r1"
    art.verify(folder)
    (folder.path / "a.txt").write_text("HELLO")
    with pytest.raises(IntegrityError, match="a.txt does not match"):
        art.verify(folder)


def test_folder_without_manifest_is_never_found(tmp_path):
    art = ArtifactStore(tmp_path)
    (art.final_path("curate", "k") ).mkdir(parents=True)
    assert art.find("curate", "k") is None


def test_concurrent_producers_one_winner(tmp_path):
    art = ArtifactStore(tmp_path)
    barrier = threading.Barrier(4)
    results = []

    def produce(i):
        tmp = art.begin("s", "same")
        (tmp / "out.txt").write_text("same content")
        barrier.wait()
        results.append(art.seal("s", "same", tmp, params={}, upstream={}, metrics={}, mlflow_run_id=f"r{i}"))

    threads = [threading.Thread(target=produce, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    assert len({r.mlflow_run_id for r in results}) == 1  # everyone sees the winner's manifest
    leftovers = [p for p in art.stage_dir("s").iterdir() if p.name != "same"]
    assert leftovers == []
    art.verify(results[0])


def test_force_replaces_existing(tmp_path):
    art = ArtifactStore(tmp_path)
    for content, replace in (("v1", False), ("v2", True)):
        tmp = art.begin("s", "k")
        (tmp / "out.txt").write_text(content)
        art.seal("s", "k", tmp, params={}, upstream={}, metrics={}, mlflow_run_id=content, replace=replace)
    assert (art.final_path("s", "k") / "out.txt").read_text() == "v2"


def test_sweep_removes_only_folders_whose_producer_is_gone(tmp_path):
    art = ArtifactStore(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = art.begin("s", "k")  # this process: still running
    killed = live.with_name(live.name.replace(f"-{os.getpid()}-", f"-{dead.pid}-"))
    killed.mkdir()
    elsewhere = live.with_name(f".tmp-k-other-host-{dead.pid}-abcd1234")  # another host on a shared store
    elsewhere.mkdir()
    aside = live.with_name(".old-k-abcd1234")  # a forced replace killed before its clean-up
    aside.mkdir()
    assert art.sweep_abandoned("s") == 2
    assert live.exists() and elsewhere.exists()
    assert not killed.exists() and not aside.exists()


def test_reuse_check_names_a_file_changed_after_sealing(tmp_path):
    art = ArtifactStore(tmp_path)
    tmp = art.begin("s", "k")
    (tmp / "out.txt").write_text("sealed")
    folder = art.seal("s", "k", tmp, params={}, upstream={}, metrics={}, mlflow_run_id=None)
    art.check_sizes(folder)
    (folder.path / "out.txt").write_text("truncated")
    with pytest.raises(IntegrityError, match=r"out.txt is 9 bytes, sealed with 6; .*--force s"):
        art.check_sizes(folder)
    (folder.path / "out.txt").unlink()
    with pytest.raises(IntegrityError, match="out.txt is missing"):
        art.check_sizes(folder)


def test_canonical_json_stable():
    assert canonical_json({"b": 1, "a": [1, {"d": 2, "c": 3}]}) == '{"a":[1,{"c":3,"d":2}],"b":1}'


# --------------------------------------------------------------------------------------------------
# Durable seals and a --force replacement that survives a kill anywhere

_SEAL_SCRIPT = """
import sys
from mammo_core.storage import durable
from mammo_core.storage.store import ArtifactStore
root, content, replace, exchange = sys.argv[1:5]
if exchange == "no":  # a filesystem without renameat2(RENAME_EXCHANGE)
    durable.exchange = lambda a, b: False
art = ArtifactStore(root)
tmp = art.begin("s", "k")
(tmp / "out.txt").write_text(content)
(tmp / "sub").mkdir()
(tmp / "sub" / "more.bin").write_bytes(content.encode() * 50_000)
art.seal("s", "k", tmp, params={}, upstream={}, metrics={}, mlflow_run_id=content, replace=replace == "yes")
"""


def _seal_in_process(root, content: str, replace: bool, exchange: bool, fault: str | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAMMO_FAULT")}
    if fault:
        env["MAMMO_FAULT"] = fault
    proc = subprocess.run([sys.executable, "-c", _SEAL_SCRIPT, str(root), content, "yes" if replace else "no",
                           "yes" if exchange else "no"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, -9), proc.stderr
    return proc.returncode


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
@pytest.mark.parametrize("point", ["store:seal:s", "store:swap"])
def test_sigkill_inside_a_forced_replacement_keeps_the_old_or_the_new_folder(tmp_path, exchange, point):
    assert _seal_in_process(tmp_path, "v1", replace=False, exchange=exchange) == 0
    assert _seal_in_process(tmp_path, "v2", replace=True, exchange=exchange, fault=f"kill:{point}") == -9
    art = ArtifactStore(tmp_path)
    found = art.find("s", "k")
    assert found is not None, f"killed at {point}: no sealed folder at the final path"
    art.verify(found)
    # before the swap the old folder is in place; after the exchange the new one; between two renames the
    # old one, put back by the look-up
    expected = "v2" if (point == "store:swap" and exchange) else "v1"
    assert found.mlflow_run_id == expected and (found.path / "out.txt").read_text() == expected
    assert art.sweep_all() >= 1, "the killed process's leftover is reclaimed"
    assert sorted(p.name for p in art.stage_dir("s").iterdir()) == ["k"]
    assert _seal_in_process(tmp_path, "v3", replace=True, exchange=exchange) == 0
    assert (art.final_path("s", "k") / "out.txt").read_text() == "v3"
    assert sorted(p.name for p in art.stage_dir("s").iterdir()) == ["k"]


def test_seal_fsyncs_every_file_and_folder_before_its_rename(tmp_path, monkeypatch):
    from mammo_core.storage import durable

    events: list[tuple[str, str]] = []
    for name in ("fsync_file", "fsync_dir"):
        real = getattr(durable, name)
        monkeypatch.setattr(durable, name, lambda p, real=real, name=name: (events.append((name, str(p))), real(p)))
    real_rename = os.rename
    monkeypatch.setattr(store_mod.os, "rename", lambda a, b: (events.append(("rename", str(a))), real_rename(a, b)))
    art = ArtifactStore(tmp_path)
    tmp = art.begin("s", "k")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "a.bin").write_bytes(b"x" * 100)
    (tmp / "b.txt").write_text("b")
    art.seal("s", "k", tmp, params={}, upstream={}, metrics={}, mlflow_run_id=None)
    renamed_at = events.index(("rename", str(tmp)))
    synced = {p for kind, p in events[:renamed_at] if kind.startswith("fsync")}
    assert {str(tmp / "sub" / "a.bin"), str(tmp / "b.txt"), str(tmp / "sub"), str(tmp)} <= synced
    assert ("fsync_dir", str(art.stage_dir("s"))) in events[renamed_at:], "the rename itself is made durable"
    manifest_synced = [i for i, (kind, p) in enumerate(events) if kind == "fsync_dir" and p == str(tmp)]
    assert manifest_synced[-1] < renamed_at


def test_a_folder_without_manifest_at_the_final_path_is_never_overwritten(tmp_path):
    art = ArtifactStore(tmp_path)
    final = art.final_path("s", "k")
    final.mkdir(parents=True)
    (final / "mine.txt").write_text("user data")
    tmp = art.begin("s", "k")
    (tmp / "out.txt").write_text("new")
    with pytest.raises(store_mod.UnsealedFolder, match=r"s/k has no manifest.json.*move it out"):
        art.seal("s", "k", tmp, params={}, upstream={}, metrics={}, mlflow_run_id=None, replace=True)
    assert sorted(p.name for p in final.iterdir()) == ["mine.txt"]
@pytest.mark.parametrize(("current", "expected"), [
    (0o022, 0o077), (0o002, 0o077), (0o000, 0o077), (0o077, 0o077),  # no team rule: owner only
    (0o027, 0o027), (0o007, 0o007), (0o037, 0o037),  # a team umask that closes "other": group as it says
])
def test_private_umask_never_opens_to_others_and_group_only_as_a_team_umask_says(current, expected):
    assert store_mod.private_umask(current) == expected
    assert store_mod.private_umask(expected) == expected  # idempotent: a second call changes nothing


@pytest.mark.parametrize(("umask", "folder", "file"), [(0o022, 0o700, 0o600), (0o027, 0o750, 0o640)])
def test_make_private_creates_and_closes_the_store(tmp_path, umask, folder, file):
    """In a child process (the umask is per process): a fresh store and an old, world-readable one."""
    old = tmp_path / "old"
    old.mkdir()
    old.chmod(0o755)
    code = (
        "import os, sys, sqlite3\n"
        "from pathlib import Path\n"
        "from mammo_core.storage.store import make_private\n"
        f"os.umask({umask})\n"
        "for root in map(Path, sys.argv[1:]):\n"
        "    make_private(root)\n"
        "    (root / 'stages' / 'curate').mkdir(parents=True)\n"
        "    (root / 'stages' / 'curate' / 'images.parquet').write_bytes(b'x')\n"
        "    sqlite3.connect(root / 'mlflow.db').execute('create table t (x)')\n"
    )
    fresh = tmp_path / "fresh" / "store"
    subprocess.run([sys.executable, "-c", code, str(fresh), str(old)], check=True, cwd=REPO,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    for root in (fresh, old):
        modes = {p.relative_to(root).as_posix(): p.stat().st_mode & 0o777 for p in root.rglob("*")}
        assert modes == {"stages": folder, "stages/curate": folder, "stages/curate/images.parquet": file,
                         "mlflow.db": file}
        assert root.stat().st_mode & 0o777 == folder


@pytest.mark.slow
def test_a_fresh_smoke_run_store_is_private(smoke_store):
    """Every folder and file a full run leaves (stages, MLflow, Prefect, scratch, logs) is closed to others."""
    current = os.umask(0o077)
    os.umask(current)
    allowed = 0o777 & ~store_mod.private_umask(current)  # 0o700 under the usual 022
    made_by_the_fixture = {smoke_store / "first_run.txt"}
    paths = [p for p in smoke_store.rglob("*") if p not in made_by_the_fixture and not p.is_symlink()]
    assert len(paths) > 300 and any(p.name == "mlflow.db" for p in paths)
    assert any("prefect" in p.relative_to(smoke_store).parts for p in paths)
    too_open = {p.relative_to(smoke_store).as_posix(): oct(p.stat().st_mode & 0o777) for p in paths
                if p.stat().st_mode & 0o777 & ~allowed or p.stat().st_mode & 0o007}
    assert too_open == {}
