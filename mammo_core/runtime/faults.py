"""Fault injection points, so that tests can kill or fail a run at a named place.

Why: the resume and kill-anywhere guarantees (a SIGKILL during an HDF5 write, a checkpoint write, MLflow
logging, or a stage that fails once) can only be tested if the test can stop the run at that exact place.
The code calls :func:`at` at those places; nothing happens unless the environment variable
``MAMMO_FAULT`` is set, which only the tests do.

``MAMMO_FAULT`` holds comma-separated ``ACTION:POINT`` items. ACTION is ``kill`` (SIGKILL this process, no
clean-up runs), ``fail`` (raise :class:`InjectedFault`), ``full`` (raise the ``OSError`` ENOSPC of a full
disk), ``locked`` (raise SQLite's ``OperationalError: database is locked``), ``hang`` (sleep forever, as a
stuck decoder) or ``slow`` (sleep ``MAMMO_FAULT_SLOW_S`` seconds, default 0.5, then go on: a slow step,
so that a test can send a signal while the run is inside a loop). POINT is a name passed to
:func:`at`, such as ``stage:train:start``, ``stage:train:end``, ``stage:train:sealed`` (sealed, its MLflow
run not yet ended), ``h5:write``, ``checkpoint:write``, ``mlflow:log``, ``mlflow:db-write`` (inside an SQL
write to the MLflow database, before its commit), ``store:seal:<stage>``, ``store:swap`` (inside a
``--force`` replacement); a trailing ``*`` matches any suffix (``stage:*``). ``MAMMO_FAULT_SKIP=N`` lets the
first N matching calls pass, so a test can hit the third checkpoint write rather than the first. When
``MAMMO_FAULT_ONCE`` names a file, the fault fires only if that file does not exist yet, and creates it:
the rerun then goes through. When ``MAMMO_FAULT_REACHED`` names a file, the first fault that acts writes
the point's name there: a test waits for that file to know the run has reached the point.
"""

from __future__ import annotations

import errno
import os
import signal
import sqlite3
import time
from fnmatch import fnmatchcase
from pathlib import Path

ENV = "MAMMO_FAULT"
SKIP_ENV = "MAMMO_FAULT_SKIP"
ONCE_ENV = "MAMMO_FAULT_ONCE"
REACHED_ENV = "MAMMO_FAULT_REACHED"
SLOW_ENV = "MAMMO_FAULT_SLOW_S"

_passed: dict[str, int] = {}


class InjectedFault(RuntimeError):
    """Raised at a fault point set to ``fail`` (never in normal runs)."""


def _matching_action(point: str, spec: str) -> str | None:
    for item in spec.split(","):
        action, _, pattern = item.strip().partition(":")
        if pattern and fnmatchcase(point, pattern):
            return action
    return None


def at(point: str) -> None:
    """A named place where a test may kill or fail this process; a no-op unless ``MAMMO_FAULT`` is set."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    action = _matching_action(point, spec)
    if action is None:
        return
    skip = int(os.environ.get(SKIP_ENV, "0") or 0)
    seen = _passed.get(spec, 0)
    _passed[spec] = seen + 1
    if seen < skip:
        return
    once = os.environ.get(ONCE_ENV)
    if once:
        marker = Path(once)
        if marker.exists():
            return
        marker.write_text(point)
    reached = os.environ.get(REACHED_ENV)
    if reached and not Path(reached).exists():
        Path(reached).write_text(point)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "fail":
        raise InjectedFault(f"injected fault at {point} ({ENV}={spec})")
    elif action == "full":
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected at {point})")
    elif action == "locked":
        raise sqlite3.OperationalError("database is locked")
    elif action == "hang":
        while True:
            time.sleep(60)
    elif action == "slow":
        time.sleep(float(os.environ.get(SLOW_ENV, "0.5")))
    else:
        raise ValueError(f"{ENV}: unknown action {action!r} in {spec!r}; use kill, fail, full, locked, hang or slow")
