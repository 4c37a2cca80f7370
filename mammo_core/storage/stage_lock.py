"""A per-(stage, key) lock in the store, held while a process produces that stage.

Why: two ``mammo run`` on one store that need the same stage key would otherwise both compute it (the
second one's work thrown away at the seal) and, worse, share its scratch folder (checkpoints) at the same
time. With the lock the second one waits, then finds the first one's sealed folder and reuses it.

Why ``fcntl.flock`` on an open file, not a pid file: the kernel drops the lock when the process holding it
dies, however it dies (SIGKILL, OOM, a container stopped), so a dead owner is never mistaken for a live one
and no hostname + pid guess is needed (containers share both). The file also records who holds the lock,
for the waiting message; an owner record found in a lock that could be taken at once means its owner died
while holding it: a stale lock, reclaimed with a message. The lock files stay (removing a lock file that
another process is about to lock would give two holders); they are a few bytes each.

Limits: flock works across processes of one machine and across containers sharing a local filesystem; on
NFS it depends on the client (Linux maps it to POSIX locks, which the server then keeps).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOCKS = "locks"


def lock_path(store_root: str | Path, stage: str, key: str) -> Path:
    return Path(store_root) / LOCKS / f"{stage}-{key}.lock"


def _owner_record() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since_unix": round(time.time(), 3)}


def _read_owner(fd: int) -> dict[str, Any] | None:
    raw = os.pread(fd, 4096, 0)
    if not raw.strip():
        return None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"record": raw[:200].decode("utf-8", "replace")}


def describe(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "another process"
    since = owner.get("since_unix")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, int | float) else "?"
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')} (since {when})"


@contextmanager
def hold(store_root: str | Path, stage: str, key: str, notify: Callable[[str], None]) -> Iterator[None]:
    """Hold the lock of (stage, key) for the ``with`` body; wait (with a message) while another process does.

    ``notify`` receives one line when this process has to wait and one when it reclaims a stale lock.
    """
    path = lock_path(store_root, stage, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            notify(f"{stage} (key {key}) is being produced by {describe(_read_owner(fd))}: waiting for it to "
                   f"finish, then reusing its result (lock {path})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        stale = _read_owner(fd)
        if stale is not None:
            notify(f"{stage} (key {key}): reclaimed a stale lock of {describe(stale)}, a process that died while "
                   f"producing it; its temporary folder is swept (lock {path})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_owner_record()).encode("utf-8"), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # a clean release leaves no owner record: only a dead holder does
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
