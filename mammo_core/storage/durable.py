"""Durable filesystem steps: atomic file writes, fsync of files and folders, and an atomic swap of two folders.

Why: ``os.rename`` is atomic against a crash of the process, not against a power loss. Until a file's data
and the folder entry naming it are fsynced, the kernel may persist the rename before the data, and a
sealed folder can come back after a reboot with empty or truncated files under a valid manifest. So the
seal fsyncs every file, then every folder, before its rename, and the folder holding the rename after it.

Every file the project writes goes through :func:`atomic_path` (or :func:`write_bytes_atomic` /
:func:`write_text_atomic` built on it): a temporary sibling, renamed over the target only when the write
finished, so a reader or a killed run never sees half a file, and a failed write leaves no temporary behind.

``exchange`` swaps two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``): a ``--force``
replacement then never has a moment where neither the old nor the new folder is at the final path.
"""

from __future__ import annotations

import ctypes
import errno
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write; renamed over ``path`` when the block ends, removed on error.

    The temporary name is hidden (leading dot, which store listings skip), unique per call (threads and
    processes may write siblings at once) and keeps the suffix, for writers that pick a format from it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically; with ``fsync`` the data is on disk before the rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str, fsync: bool = True) -> Path:
    """UTF-8 ``text`` to ``path`` atomically (see :func:`write_bytes_atomic`)."""
    return write_bytes_atomic(path, text.encode("utf-8"), fsync)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush one file's data and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (names created, renamed or removed in it) to the disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every folder (deepest first), then ``root`` itself."""
    folders = []
    for dirpath, _dirnames, filenames in os.walk(root):
        folders.append(dirpath)
        for name in filenames:
            fsync_file(os.path.join(dirpath, name))
    for folder in sorted(folders, key=len, reverse=True):
        fsync_dir(folder)


def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # libc older than glibc 2.28, or not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap the paths ``a`` and ``b`` (both must exist); False when the system cannot.

    False (nothing changed) on kernels, libcs or filesystems without ``RENAME_EXCHANGE``; the caller then
    falls back to two renames and recovers from a kill between them. Any other failure raises ``OSError``.
    """
    if _RENAMEAT2 is None:
        return False
    rc = _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))
