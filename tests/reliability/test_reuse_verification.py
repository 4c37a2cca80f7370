"""Reuse verifies content: a same-size corruption of a sealed file is refused by name, and --force repairs it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from mammo_core.storage.store import ArtifactStore, IntegrityError, file_sha256
from mammo_core.storage.verified_files import VerifiedFiles


def _flip_one_byte(path: Path, at: int = 0) -> None:
    """Change one byte in place (same size), keeping the modification time as it was."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    with open(path, "r+b") as fh:
        fh.write(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size


def test_the_hash_cache_rehashes_a_file_whose_bytes_changed_even_with_its_mtime_put_back(tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(b"sealed content" * 100)
    first = VerifiedFiles(tmp_path)
    digest = first.sha256(f)
    assert digest == file_sha256(f) and first.hashed == 1
    first.save()

    again = VerifiedFiles(tmp_path)  # a later run: unchanged file, nothing read
    assert again.sha256(f) == digest and again.hashed == 0

    time.sleep(0.01)  # ctime granularity
    _flip_one_byte(f)
    later = VerifiedFiles(tmp_path)
    assert later.sha256(f) == file_sha256(f) != digest and later.hashed == 1

    replaced = tmp_path / "b.bin"
    replaced.write_bytes(f.read_bytes())
    os.replace(replaced, f)  # another inode under the same name
    assert VerifiedFiles(tmp_path).sha256(f) == file_sha256(f)


def test_verify_names_the_file_and_the_force(tmp_path: Path) -> None:
    art = ArtifactStore(tmp_path / "store")
    tmp = art.begin("patches", "k1")
    (tmp / "patches.h5").write_bytes(b"\1" * 1000)
    folder = art.seal("patches", "k1", tmp, params={}, upstream={}, metrics={}, mlflow_run_id=None)
    cache = VerifiedFiles(art.root)
    art.verify(folder, sha256_of=cache.sha256)
    cache.save()
    time.sleep(0.01)
    _flip_one_byte(folder.path / "patches.h5", at=500)
    with pytest.raises(IntegrityError) as err:
        art.verify(folder, sha256_of=VerifiedFiles(art.root).sha256)
    assert "patches.h5 does not match its manifest" in str(err.value)
    assert "`mammo run --force patches`" in str(err.value)


@pytest.mark.slow
def test_a_corrupt_reused_stage_stops_the_run_with_one_line_and_force_repairs_it(smoke_store_copy: Path) -> None:
    from tests.e2e.test_pipeline_e2e import SMOKE, mammo, stage_rows

    store = smoke_store_copy
    report_dir = next(p for p in (store / "stages" / "report").iterdir() if (p / "manifest.json").is_file())
    manifest = json.loads((report_dir / "manifest.json").read_text())
    victim = max(manifest["files"], key=lambda e: e["size"])["path"]
    time.sleep(0.01)
    _flip_one_byte(report_dir / victim, at=7)

    refused = mammo(store, "run", "-p", str(SMOKE), check=False)
    out = refused.stdout + refused.stderr
    assert refused.returncode == 2, out
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    assert victim in lines[0] and "does not match its manifest" in lines[0]
    assert "mammo run --force report" in lines[0]

    repaired = mammo(store, "run", "-p", str(SMOKE), "--force", "report")
    rows = stage_rows(repaired.stdout + repaired.stderr)
    assert rows["report"] == "ran" and {s for s, v in rows.items() if v != "cached"} == {"report"}
    art = ArtifactStore(store)
    folder = art.find("report", report_dir.name)
    assert folder is not None
    art.verify(folder)  # the repaired folder matches its (new) manifest, so the next run reuses it
