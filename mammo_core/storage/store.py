"""The artifact store: content-derived stage keys and atomic, manifest-sealed stage folders.

Layout (DESIGN.md §3)::

    <store>/stages/<stage>/<key>/          finished output; manifest.json is written last
    <store>/stages/<stage>/.tmp-<key>-*    work in progress, renamed into place when sealed

A folder at the final path always holds a manifest, because the rename is the last step; a crash leaves
only a ``.tmp-`` sibling that the next attempt ignores and :meth:`ArtifactStore.sweep_abandoned` removes.
When two processes produce the same key at once, the first rename wins and the loser discards its copy:
same key means same inputs, so the two outputs are interchangeable.

Durability: every file and folder of a new seal is fsynced before the rename and the stage folder after
it (:mod:`mammo_core.storage.durable`), so a power loss cannot leave a manifest that names unwritten data. A
``--force`` replacement swaps the new sealed folder with the old one in one ``renameat2(RENAME_EXCHANGE)``
and removes the old one afterwards; where the filesystem cannot exchange, the old folder is renamed aside
first and, should the process die before the new one is in place, the next look-up renames it back.
Either way a kill at any point leaves the old or the new sealed folder at the final path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from mammo_core.runtime import faults
from mammo_core.storage import durable
from mammo_core.storage.durable import write_text_atomic

MANIFEST = "manifest.json"
_HASH_CHUNK = 1 << 20


def canonical_json(value: Any) -> str:
    """Stable JSON (sorted keys, no whitespace) so equal params always hash equal."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def source_digest(modules: Iterable[ModuleType]) -> str:
    """sha256 over the source files of the modules a stage runs, in a stable order.

    Only the code a stage actually runs enters its key, so editing a test or another stage's module
    re-runs nothing here.
    """
    h = hashlib.sha256()
    for module in sorted(set(modules), key=lambda m: m.__name__):
        path = getattr(module, "__file__", None)
        if not path:
            raise ValueError(f"module {module.__name__} has no source file to hash")
        h.update(module.__name__.encode())
        h.update(b"\0")
        h.update(Path(path).read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def stage_key(stage: str, code_digest: str, params: Mapping[str, Any], upstream: Mapping[str, str],
              inputs: Mapping[str, Any] | None = None) -> str:
    """Key of a stage = sha256(stage name, code, its params section, the keys of its upstream stages, and
    ``inputs``: what else decides its output, such as library versions, data and weight fingerprints)."""
    fields = {"stage": stage, "code": code_digest, "params": params, "upstream": dict(sorted(upstream.items()))}
    if inputs is not None:
        fields["inputs"] = dict(inputs)
    payload = canonical_json(fields)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON through a temporary sibling and ``os.replace``: readers never see half a file."""
    write_text_atomic(path, json.dumps(value, indent=2, sort_keys=True, default=str))


def private_umask(current: int) -> int:
    """The umask a store is written under, given the process's ``current`` one.

    Why: the store holds images derived from patient data. Nothing in it is ever open to others. The
    group gets what ``current`` grants only when ``current`` already closes "other" entirely (a team's
    deliberate 007 or 027 on a shared group folder); the stock 022/002 closes nothing, so it gives
    owner-only folders (0700) and files (0600). Never more open than ``current`` allows.
    """
    return current if current & 0o007 == 0o007 else current | 0o077


def make_private(root: Path) -> Path:
    """Write everything from now on under :func:`private_umask` and create ``root`` (or close it) accordingly.

    The umask is per process and inherited, so what MLflow, Prefect, SQLite and the worker processes
    started afterwards create is covered too, not only this module's files. An existing root of ours that
    is more open (a store from before this rule) is closed: nothing below it can then be reached by others.
    """
    mask = private_umask(os.umask(0o077))
    os.umask(mask)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    info = root.stat()
    if info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) & mask:
        os.chmod(root, stat.S_IMODE(info.st_mode) & ~mask)
    return root


@dataclass(frozen=True)
class StageFolder:
    """A finished stage output and its manifest."""

    stage: str
    key: str
    path: Path
    manifest: dict[str, Any]

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.manifest.get("metrics", {}))

    @property
    def mlflow_run_id(self) -> str | None:
        return self.manifest.get("mlflow_run_id")


_HOST = socket.gethostname().replace("/", "_") or "localhost"


def _tmp_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) of a ``.tmp-<key>-<host>-<pid>-<hex>`` folder name; None for any other name."""
    if not name.startswith(".tmp-"):
        return None
    parts = name[len(".tmp-"):].split("-")
    if len(parts) < 4 or not parts[-2].isdigit():
        return None
    return "-".join(parts[1:-2]), int(parts[-2])


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class IntegrityError(RuntimeError):
    """A sealed stage folder does not match its manifest."""


class UnsealedFolder(RuntimeError):
    """A folder sits at a stage's final path without a manifest: not made by a seal, never overwritten."""


class ArtifactStore:
    """The ``stages/`` tree under a store root."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def stage_dir(self, stage: str) -> Path:
        return self.root / "stages" / stage

    def final_path(self, stage: str, key: str) -> Path:
        return self.stage_dir(stage) / key

    def find(self, stage: str, key: str) -> StageFolder | None:
        """The finished folder for (stage, key), or None. A folder without manifest is never returned.

        A sealed folder that a killed ``--force`` left aside (see :meth:`seal`) is first put back.
        """
        path = self.final_path(stage, key)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file() and not path.exists():
            self._restore_aside(stage, key)
        if not manifest_path.is_file():
            return None
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        return StageFolder(stage=stage, key=key, path=path, manifest=manifest)

    def _restore_aside(self, stage: str, key: str) -> bool:
        """Rename a sealed ``.old-<key>-*`` folder back to the empty final path; True if one was restored.

        Why: without ``RENAME_EXCHANGE`` a forced replacement renames the old folder aside before renaming
        the new one in; a kill between the two would otherwise leave no folder at the final path.
        """
        final = self.final_path(stage, key)
        parent = self.stage_dir(stage)
        if not parent.is_dir():
            return False
        for aside in sorted(parent.glob(f".old-{key}-*")):
            if (aside / MANIFEST).is_file():
                try:
                    os.rename(aside, final)
                except OSError:  # a concurrent replacement put a folder there meanwhile
                    return False
                durable.fsync_dir(parent)
                return True
        return False

    def check_final_path(self, stage: str, key: str) -> None:
        """:class:`UnsealedFolder` when something without a manifest occupies the final path of (stage, key).

        Why: such a folder (a hand copy, a restore from a backup that lost files) can neither be reused nor
        replaced without deleting data mammo did not write; the user decides, with a message saying how.
        """
        path = self.final_path(stage, key)
        if path.exists() and not (path / MANIFEST).is_file():
            raise UnsealedFolder(
                f"{path} has no {MANIFEST}, so it was not sealed by mammo (a partial copy or restore?): "
                f"move it out of {path.parent} or delete it, then run again")

    def begin(self, stage: str, key: str) -> Path:
        """A fresh temporary folder for producing (stage, key)."""
        parent = self.stage_dir(stage)
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".tmp-{key}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        return tmp

    def sweep_abandoned(self, stage: str) -> int:
        """Remove temporary folders whose producer is gone: a process of this host that no longer runs.

        Why: a killed run leaves its ``.tmp-`` folder behind (it never reaches the rename), and nothing else
        would ever reclaim that disk. A folder of a live process, or of another host sharing the store, is
        left alone; so is a folder named in an older format that does not say who made it.
        """
        parent = self.stage_dir(stage)
        if not parent.is_dir():
            return 0
        removed = 0
        for child in parent.iterdir():
            if child.name.startswith(".old-"):
                final = self.final_path(stage, child.name[len(".old-"):].rsplit("-", 1)[0])
                if (final / MANIFEST).is_file() or not (child / MANIFEST).is_file():
                    shutil.rmtree(child, ignore_errors=True)  # replaced, or never sealed
                    removed += 1
                elif not final.exists():
                    self._restore_aside(stage, final.name)
                continue
            owner = _tmp_owner(child.name)
            if owner is not None and owner[0] == _HOST and not _process_alive(owner[1]):
                shutil.rmtree(child, ignore_errors=True)
                removed += 1
        return removed

    def sweep_all(self) -> int:
        """:meth:`sweep_abandoned` for every stage folder (a run start: stages it reuses are swept too)."""
        root = self.root / "stages"
        if not root.is_dir():
            return 0
        return sum(self.sweep_abandoned(p.name) for p in sorted(root.iterdir()) if p.is_dir())

    def check_sizes(self, folder: StageFolder) -> None:
        """Every file of the manifest is present with its recorded size (cheap; :meth:`verify` hashes too).

        Why: a finished stage is reused by every later run; a file deleted or truncated since sealing
        would otherwise surface as an obscure error in a downstream stage, or not at all.
        """
        for entry in folder.manifest.get("files", []):
            f = folder.path / entry["path"]
            if not f.is_file() or f.stat().st_size != entry["size"]:
                state = "missing" if not f.is_file() else f"{f.stat().st_size} bytes, sealed with {entry['size']}"
                raise IntegrityError(f"{folder.path}: {entry['path']} is {state}; re-run the stage with "
                                     f"`mammo run --force {folder.stage}`")

    def seal(
        self,
        stage: str,
        key: str,
        tmp: Path,
        *,
        params: Mapping[str, Any],
        upstream: Mapping[str, str],
        metrics: Mapping[str, float],
        mlflow_run_id: str | None,
        extra: Mapping[str, Any] | None = None,
        replace: bool = False,
    ) -> StageFolder:
        """Write the manifest last, fsync everything, then rename ``tmp`` into place.

        ``replace`` (``--force``) swaps ``tmp`` with an existing folder atomically and removes the old one
        after (:meth:`_publish_replacing`); otherwise an existing folder wins and ``tmp`` is discarded.
        """
        tmp = Path(tmp)
        self.check_final_path(stage, key)
        files = []
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = f.relative_to(tmp).as_posix()
            files.append({"path": rel, "size": f.stat().st_size, "sha256": file_sha256(f)})
        manifest = {
            "stage": stage,
            "key": key,
            "created_unix": time.time(),
            "params": dict(params),
            "upstream": dict(upstream),
            "metrics": {k: float(v) for k, v in metrics.items()},
            "mlflow_run_id": mlflow_run_id,
            "files": files,
            **(dict(extra) if extra else {}),
        }
        faults.at(f"store:seal:{stage}")
        durable.fsync_tree(tmp)  # data before the manifest can name it ...
        write_json_atomic(tmp / MANIFEST, manifest)
        durable.fsync_dir(tmp)  # ... and the manifest before the rename publishes it
        final = self.final_path(stage, key)
        if replace and final.exists():
            self._publish_replacing(tmp, final)
        else:
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / MANIFEST).is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another producer won; same key, same content
        durable.fsync_dir(final.parent)
        found = self.find(stage, key)
        assert found is not None
        return found

    def _publish_replacing(self, tmp: Path, final: Path) -> None:
        """Put the sealed ``tmp`` at ``final`` in place of the sealed folder there; remove the old one after.

        One atomic exchange where the filesystem has it: before it the old folder is at ``final``, after it
        the new one is and the old one sits under ``tmp``'s name, which the sweep removes if this process
        dies before it does. Otherwise two renames; :meth:`find` and the sweep put the old folder back if
        a kill lands between them.
        """
        if durable.exchange(tmp, final):
            durable.fsync_dir(final.parent)
            faults.at("store:swap")
            shutil.rmtree(tmp, ignore_errors=True)  # tmp's name now holds the old folder
            return
        aside = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
        os.rename(final, aside)
        faults.at("store:swap")
        os.rename(tmp, final)
        durable.fsync_dir(final.parent)
        shutil.rmtree(aside, ignore_errors=True)

    def verify(self, folder: StageFolder, sha256_of: Callable[[Path], str] = file_sha256) -> None:
        """Check every file listed in the manifest: present, same size, same sha256.

        ``sha256_of`` may remember hashes of unchanged files (:class:`mammo_core.storage.verified_files.VerifiedFiles`).
        The error names the file and the command that replaces the folder.
        """
        fix = f"re-run the stage with `mammo run --force {folder.stage}`"
        for entry in folder.manifest.get("files", []):
            f = folder.path / entry["path"]
            if not f.is_file():
                raise IntegrityError(f"{folder.path}: missing {entry['path']}; {fix}")
            if f.stat().st_size != entry["size"]:
                raise IntegrityError(f"{folder.path}: {entry['path']} does not match its manifest "
                                     f"({f.stat().st_size} bytes, sealed with {entry['size']}); {fix}")
            if sha256_of(f) != entry["sha256"]:
                raise IntegrityError(f"{folder.path}: {entry['path']} does not match its manifest "
                                     f"(sha256 differs: changed since it was sealed); {fix}")
