"""A fingerprint of a dataset folder the user owns, for the acquire key.

Why: with ``cbis-local`` / ``cbis-jpeg`` the data lives outside the store, and the params only name its
folder. Adding, deleting or replacing a file there must re-run acquire and everything after it, or a
"cached" model would silently describe data that no longer exists. Paths, sizes and modification times
(nanoseconds) catch every ordinary change for the price of one ``stat`` per file (about a second per
100 000 files); the description tables (CSV, JSON, text: what decides the labels) are hashed in full as
well, because they are small and a same-size edit within the mtime resolution is conceivable there. Image
content is not hashed: 160 GB on every key computation would cost more than the stage.

The files considered are those the inventory (:func:`mammo_core.data.layouts.build_inventory`) lists: hidden
entries and ``*.part`` downloads are skipped, so a download in progress does not change the key.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from mammo_core.storage.store import file_sha256

CONTENT_HASHED_SUFFIXES = frozenset({".csv", ".tsv", ".json", ".txt"})


def data_fingerprint(root: str | os.PathLike[str]) -> dict[str, Any]:
    """{"root", "files", "bytes", "digest"} of the folder; {"root", "missing": True} when it is absent."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        return {"root": str(root), "missing": True}
    h = hashlib.sha256()
    files = total = 0
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or name.endswith(".part"):
                continue
            path = Path(folder, name)
            try:
                stat = path.stat()
            except FileNotFoundError:  # removed while walking
                continue
            if not path.is_file():
                continue
            rel = path.relative_to(root).as_posix()
            content = file_sha256(path) if path.suffix.lower() in CONTENT_HASHED_SUFFIXES else ""
            h.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\0{content}\n".encode())
            files += 1
            total += stat.st_size
    return {"root": str(root), "files": files, "bytes": total, "digest": h.hexdigest()}
