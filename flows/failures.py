"""Failures of the environment (tracking database, Prefect API, store, disk) as one line: cause and fix.

Why: a corrupt ``mlflow.db``, an unreachable Prefect server, a foreign folder in the store or a full disk
are not bugs of a stage, and a traceback through Prefect and SQLAlchemy hides the one thing the user has
to do. :func:`preflight` checks what can be checked before anything is written (so the store is left as
it was); :func:`explain` turns the same causes met during a run into the same kind of line. The CLI prints
the line and exits with code 2.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

DB_LOCK_WAIT_ENV = "MAMMO_DB_LOCK_WAIT_S"
DEFAULT_DB_LOCK_WAIT_S = 30.0


class EnvironmentFailure(RuntimeError):
    """Something outside the pipeline's code stops the run; the message names the cause and the fix."""


def check_tracking_db(db: Path) -> None:
    """The embedded MLflow database, if present, is an SQLite file that this process can write to.

    Read-only checks plus an immediately rolled-back write transaction: nothing in the file changes.
    """
    if not db.is_file():
        return
    wait_s = float(os.environ.get(DB_LOCK_WAIT_ENV) or DEFAULT_DB_LOCK_WAIT_S)
    began = time.monotonic()
    try:
        con = sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=wait_s, isolation_level=None)
    except sqlite3.Error as exc:
        raise EnvironmentFailure(f"cannot open the tracking database {db} ({exc}): check its permissions") from exc
    try:
        try:
            con.execute("BEGIN IMMEDIATE")  # waits up to wait_s for a writer, then "database is locked"
            con.execute("ROLLBACK")
            verdict = con.execute("PRAGMA quick_check").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise EnvironmentFailure(
                    f"the tracking database {db} is locked by another process (waited "
                    f"{time.monotonic() - began:.0f} s): let it finish or stop it (`fuser {db}` names it), "
                    f"then run again") from exc
            raise _corrupt(db, exc) from exc
        except sqlite3.DatabaseError as exc:
            raise _corrupt(db, exc) from exc
        if verdict != "ok":
            raise _corrupt(db, verdict)
    finally:
        con.close()


def _corrupt(db: Path, why: object) -> EnvironmentFailure:
    return EnvironmentFailure(
        f"the tracking database {db} is damaged ({why}): restore it from a backup, or move it aside to start "
        f"a new tracking history (sealed stages under {db.parent / 'stages'} stay reusable)")


def check_prefect_api(timeout_s: float = 5.0) -> None:
    """``PREFECT_API_URL``, when set, answers its health check."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return
    import httpx

    health = f"{url.rstrip('/')}/health"
    try:
        response = httpx.get(health, timeout=timeout_s)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise EnvironmentFailure(
            f"PREFECT_API_URL={url} is unreachable ({type(exc).__name__}: {exc}): start that server "
            f"(`prefect server start`) or unset PREFECT_API_URL so that mammo run starts a temporary one") from exc


def check_final_paths(store_root: Path, keys: dict[str, str], stages: Iterable[str]) -> None:
    """No folder without a manifest sits at the final path of a stage this run may write."""
    from mammo_core.storage.store import ArtifactStore, UnsealedFolder

    art = ArtifactStore(store_root)
    for stage in stages:
        try:
            art.check_final_path(stage, keys[stage])
        except UnsealedFolder as exc:
            raise EnvironmentFailure(f"stage {stage}: {exc}") from exc


def preflight(store_root: Path, tracking_uri: str, keys: dict[str, str], stages: Iterable[str],
              check_api: bool = True) -> None:
    """Every check above, before the run writes anything.

    ``check_api=False``: ``PREFECT_API_URL`` names the temporary server this run started itself
    (flows/prefect_server.py), which may still be starting; its own start-up reports its failures.
    """
    if tracking_uri.startswith("sqlite:///"):
        check_tracking_db(Path(tracking_uri[len("sqlite:///"):]))
    if check_api:
        check_prefect_api()
    check_final_paths(store_root, keys, stages)


def explain(exc: BaseException, store_root: Path, resume_hint: str) -> str | None:
    """One line (cause; fix) for an environment failure met during a run, else None (a stage's own error)."""
    from mammo_core.storage.store import UnsealedFolder

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return (f"disk full while writing to the store {store_root} ({seen.strerror}); nothing was sealed "
                    f"half-written: free space there (`df -h {store_root}`), then {resume_hint}")
        if isinstance(seen, UnsealedFolder):
            return f"{seen}; then {resume_hint}"
        if isinstance(seen, EnvironmentFailure):
            return str(seen)
        if "database is locked" in str(seen):
            return (f"the tracking database stayed locked by another process ({seen}): let it finish or stop "
                    f"it, then {resume_hint}")
        if "file is not a database" in str(seen) or "database disk image is malformed" in str(seen):
            return (f"the tracking database is damaged ({seen}): restore it from a backup or move it aside, "
                    f"then {resume_hint}")
        seen = seen.__cause__ or seen.__context__
    return None
