"""Durable filesystem steps: fsync of files and folders, and an atomic swap of two folders.

Why: ``os.rename`` is atomic against a crash of the process, not against a power loss. Until a file's data
and the folder entry naming it are fsynced, the kernel may persist the rename before the data, and a
sealed folder can come back after a reboot with empty or truncated files under a valid manifest. So the
seal fsyncs every file, then every folder, before its rename, and the folder holding the rename after it.

``exchange`` swaps two existing paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``): a ``--force``
replacement then never has a moment where neither the old nor the new folder is at the final path.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


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
