"""One full smoke run per test session, and cheap private copies of it.

Why: the smoke pipeline (every stage, ~1 min on 2 cores) is what many slow tests need as a starting point
(a finished run to compare against, rerun with one param changed, serve models from, or kill and resume).
Running it once and copying the store keeps the suite inside its time budget. A copy is a real store: its
MLflow database is rewritten to point at the copy's own artifact folder (MLflow stores absolute paths),
and its Prefect folder is dropped (the store, not Prefect's cache, is the source of truth; a copied Prefect
database would hand out results whose paths name the original store).
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path


def _rewrite_paths(db: Path, old: str, new: str) -> int:
    """Replace ``old`` by ``new`` in every text column of every table of an SQLite database."""
    changed = 0
    with sqlite3.connect(db) as con:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            columns = [r[1] for r in con.execute(f'PRAGMA table_info("{table}")')
                       if (r[2] or "").upper().startswith(("VARCHAR", "TEXT", "CHAR"))]
            for column in columns:
                cur = con.execute(f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '
                                  f'WHERE "{column}" LIKE ?', (old, new, f"%{old}%"))
                changed += cur.rowcount
    return changed


def copy_store(source: Path, target: Path) -> Path:
    """A private, independent copy of a finished store at ``target`` (which must not exist)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("prefect"), symlinks=True)
    db = target / "mlflow.db"
    if db.is_file():
        _rewrite_paths(db, str(source.resolve()), str(target.resolve()))
    return target
