"""One process-wide stop request: set when the user interrupts a run, read by long loops between steps.

Why a flag and not an exception from the signal handler: Python runs signal handlers in the main thread
only, while the stages run in worker threads (Prefect's thread runner) and their own worker processes. An
exception raised in the main thread would end the flow but leave a training thread computing to the end
of its stage. Instead the handler (flows/interrupts.py) sets this flag, and every long loop (a training
batch, a detector batch, curate's worker pool) calls :func:`check` between two steps: the stage stops at a
clean point, its temporary folder is removed, and checkpoints of finished epochs stay for the resume.
"""

from __future__ import annotations

import threading

_requested = threading.Event()
_reason: list[str] = []


class StopRequested(Exception):
    """Raised by :func:`check` once a stop was requested (Ctrl-C, SIGTERM)."""


def request(reason: str) -> None:
    """Ask every loop of this process to stop at its next check; the first reason given is kept."""
    if not _requested.is_set():
        _reason.append(reason)
        _requested.set()


def requested() -> bool:
    return _requested.is_set()


def reason() -> str:
    return _reason[0] if _reason else ""


def check(where: str = "") -> None:
    """Raise :class:`StopRequested` if a stop was requested; call it between two units of work."""
    if _requested.is_set():
        place = f" during {where}" if where else ""
        raise StopRequested(f"stopped by {reason()}{place}")


def clear() -> None:
    """Forget a request (tests that request a stop, then go on in the same process)."""
    _requested.clear()
    _reason.clear()
