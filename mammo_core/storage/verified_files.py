"""sha256 of sealed files, remembered per file state so that reuse re-hashes only what changed.

Why: reuse verifies every sealed file against its manifest (a same-size corruption must not be served),
but re-hashing gigabytes of features and patches on every cached rerun would make "cached" slow. A file's
hash is remembered with its (device, inode, size, mtime_ns, ctime_ns). Any write through the file system
changes mtime and ctime; ctime cannot be set back by a user (``touch -d`` and ``os.utime`` reset mtime
only), and a replaced or copied file has another inode, so a remembered hash is only used for the very
bytes it was computed from. Corruption below the file system (bit rot) is not seen by this cache: it is a
guard against edits, truncations and replacements, as the issue of silently reused damage asks.

The cache is one JSON file per store (``<store>/cache/verified-files.json``), written atomically; two
runs writing it at once lose at most each other's new entries, which only costs a re-hash.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mammo_core.storage.store import file_sha256, write_json_atomic

CACHE_FILE = Path("cache") / "verified-files.json"


def _state(stat: os.stat_result) -> list[int]:
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


class VerifiedFiles:
    """The hash cache of one store; use :meth:`sha256` in place of ``file_sha256`` and :meth:`save` after."""

    def __init__(self, store_root: str | os.PathLike[str]):
        self.path = Path(store_root) / CACHE_FILE
        self.hashed = 0  # files read in full by this instance (for measurements and tests)
        self._changed = False
        try:
            loaded = json.loads(self.path.read_text(encoding="utf-8"))
            self._entries: dict[str, list] = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            self._entries = {}

    def sha256(self, path: Path) -> str:
        """The file's sha256: remembered when its state is unchanged since it was hashed, else read in full."""
        key = str(Path(path).resolve())
        state = _state(os.stat(key))
        entry = self._entries.get(key)
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == state:
            return str(entry[1])
        digest = file_sha256(Path(key))
        self.hashed += 1
        if _state(os.stat(key)) == state:  # not written while being read
            self._entries[key] = [state, digest]
            self._changed = True
        return digest

    def save(self) -> None:
        """Write the cache if anything was added, dropping entries of files that no longer exist."""
        if not self._changed:
            return
        self._entries = {k: v for k, v in self._entries.items() if os.path.exists(k)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, self._entries)
        self._changed = False
