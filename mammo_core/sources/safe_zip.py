"""Extract a zip archive that came from the network without trusting its entry names.

A downloaded archive is input, not code: an entry named ``../x`` or ``/etc/x`` or a symlink entry would
write outside the target folder ("zip slip"), and a small archive can expand to terabytes ("zip bomb").
Every entry is checked before a single byte is written, the bytes actually written are counted (the
sizes declared in the archive can lie), and the result appears at ``dest`` in one rename, so a folder
at ``dest`` is always a complete extraction.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from mammo_core.errors import BadItem

DEFAULT_MAX_TOTAL_BYTES = 4 * 1024**3  # one CBIS series is at most a few hundred MB
DEFAULT_MAX_ENTRIES = 10_000
_CHUNK = 1 << 20


def _entry_relpath(info: zipfile.ZipInfo, archive: str) -> PurePosixPath | None:
    """The safe relative path of one entry (None for a directory entry); BadItem when unsafe."""
    raw = info.filename
    name = raw.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise BadItem(raw, f"absolute path in zip {archive}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BadItem(raw, f"'..' in entry name of zip {archive}")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise BadItem(raw, f"symlink entry in zip {archive}")
    if "\x00" in name:
        raise BadItem(raw, f"NUL byte in entry name of zip {archive}")
    if not parts or info.is_dir():
        return None
    return PurePosixPath(*parts)


def extract_zip_safely(
    zip_path: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_entries: int = DEFAULT_MAX_ENTRIES,
) -> list[Path]:
    """Extract ``zip_path`` into the new folder ``dest`` and return the extracted files, sorted.

    Raises BadItem (naming the entry) for an absolute path, a ``..`` component, a symlink, an entry that
    resolves outside ``dest``, a duplicated name, or an archive that expands beyond ``max_total_bytes``
    or holds more than ``max_entries`` entries. ``dest`` must not exist; on any error nothing is left
    behind. zipfile.BadZipFile propagates for a corrupt archive (e.g. a truncated download).
    """
    zip_path = Path(zip_path)
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(f"extraction target already exists: {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path) as archive:
        infos = archive.infolist()
        if len(infos) > max_entries:
            raise BadItem(zip_path.name, f"{len(infos)} entries exceed the limit of {max_entries}")
        plan: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
        seen: set[str] = set()
        declared = 0
        for info in infos:
            rel = _entry_relpath(info, zip_path.name)
            if rel is None:
                continue
            key = rel.as_posix().lower()  # case-insensitive file systems would merge these
            if key in seen:
                raise BadItem(info.filename, f"duplicate entry in zip {zip_path.name}")
            seen.add(key)
            declared += info.file_size
            if declared > max_total_bytes:
                raise BadItem(info.filename, f"zip {zip_path.name} expands beyond {max_total_bytes} bytes")
            plan.append((info, rel))

        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".extracting", dir=dest.parent))
        try:
            tmp_real = tmp.resolve()
            written = 0
            for info, rel in plan:
                target = tmp / rel
                if not target.resolve().is_relative_to(tmp_real):
                    raise BadItem(info.filename, f"entry resolves outside the target ({zip_path.name})")
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                except (FileExistsError, NotADirectoryError) as exc:
                    raise BadItem(info.filename, f"clashes with an entry of zip {zip_path.name}") from exc
                if target.exists():
                    raise BadItem(info.filename, f"clashes with an entry of zip {zip_path.name}")
                with archive.open(info) as src, open(target, "xb") as out:
                    while chunk := src.read(_CHUNK):
                        written += len(chunk)
                        if written > max_total_bytes:
                            raise BadItem(
                                info.filename, f"zip {zip_path.name} expands beyond {max_total_bytes} bytes"
                            )
                        out.write(chunk)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return sorted(dest / rel for _, rel in plan)
