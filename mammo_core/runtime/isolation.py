"""Run one function over many items in worker processes, so that one item cannot take the others down.

Why not ``ProcessPoolExecutor``: when one of its workers dies (killed for memory, a decoder crash) every
pending future fails with ``BrokenProcessPool`` and nobody can say which item did it; and it has no way
to stop an item that never returns. Here each worker runs one item at a time and the parent knows which,
so:

- a worker that dies takes only its own item with it; the item is tried once more *alone* (no other
  worker running, so memory pressure from the others cannot be the cause), then given up with the
  reason (the signal that ended the worker);
- an item running longer than ``time_limit_s`` has its worker killed (which works even inside C code
  that never returns to Python), and is treated like a death: retried once alone, then given up.

A worker that dies is replaced; the other items go on in parallel. A stop request
(:mod:`mammo_core.runtime.stop_request`, Ctrl-C) ends the pool within a fraction of a second: the workers ignore
SIGINT themselves (the parent decides), are killed, and :class:`~mammo_core.runtime.stop_request.StopRequested` is
raised. Workers die with the parent even when it is SIGKILLed (:mod:`mammo_core.runtime.process_lifetime`).
The function must be picklable (a module-level function) and should turn its own errors into values;
an exception it raises anyway becomes :class:`ItemFailed` for that item only.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from mammo_core.runtime import stop_request
from mammo_core.runtime.process_lifetime import die_with_parent

_JOIN_S = 5.0
_STOP_POLL_S = 0.25  # how often a waiting pool looks at the stop request


@dataclass(frozen=True)
class ItemFailed:
    """The result of an item given up: its worker died or ran out of time (twice), or the function raised."""

    reason: str


def _serve(conn: Connection, fn: Callable[[Any], Any], initializer: Callable[[], None] | None,
           parent_pid: int) -> None:
    """Worker loop: one (index, item) at a time until told to stop (None) or the parent goes away."""
    die_with_parent(parent_pid)
    # A Ctrl-C reaches the whole process group: the parent stops the pool (and kills this worker); the
    # worker must not die of it on its own, or the parent would take it for a crash of its item.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if initializer is not None:
        initializer()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        index, item = message
        try:
            result = fn(item)
        except Exception as exc:  # the function's own surprise is one item's failure, not the worker's
            result = ItemFailed(f"{type(exc).__name__}: {exc}")
        conn.send((index, result))


class _Worker:
    """One worker process, its pipe, and the item it is running (None when idle)."""

    def __init__(self, fn: Callable[[Any], Any], initializer: Callable[[], None] | None):
        self.conn, child = multiprocessing.Pipe()
        self.process = multiprocessing.Process(target=_serve, args=(child, fn, initializer, os.getpid()),
                                               daemon=True)
        self.process.start()
        child.close()
        self.index: int | None = None
        self.deadline = 0.0

    def give(self, index: int, item: Any, time_limit_s: float) -> None:
        self.index, self.deadline = index, time.monotonic() + time_limit_s
        self.conn.send((index, item))

    def death_reason(self) -> str:
        self.process.join(_JOIN_S)
        code = self.process.exitcode
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            hint = ", often the out-of-memory killer" if -code == signal.SIGKILL else ""
            return f"its worker process died ({name}{hint})"
        return f"its worker process died (exit code {code})"

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(_JOIN_S)
        self.conn.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.process.join(_JOIN_S)
        self.kill()


def _run_phase(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    indices: Sequence[int],
    n_workers: int,
    time_limit_s: float,
    initializer: Callable[[], None] | None,
    on_result: Callable[[int, Any], None],
) -> dict[int, str]:
    """Run ``indices`` on up to ``n_workers`` workers; returns the items lost (index -> reason)."""
    pending = deque(indices)
    slots: list[_Worker | None] = [None] * max(1, min(n_workers, len(indices)))
    lost: dict[int, str] = {}

    def lose(slot: int, reason: str) -> None:
        worker = slots[slot]
        assert worker is not None and worker.index is not None
        lost[worker.index] = reason
        worker.kill()
        slots[slot] = None  # replaced lazily, only if items remain

    try:
        while True:
            stop_request.check("the worker pool")
            for slot, worker in enumerate(slots):
                if pending and (worker is None or worker.index is None):
                    worker = slots[slot] = worker or _Worker(fn, initializer)
                    index = pending.popleft()
                    try:
                        worker.give(index, items[index], time_limit_s)
                    except OSError:
                        worker.index = index
                        lose(slot, worker.death_reason())
            busy = [(slot, w) for slot, w in enumerate(slots) if w is not None and w.index is not None]
            if not busy:
                if pending:
                    continue
                return lost
            timeout = min(_STOP_POLL_S, max(0.0, min(w.deadline for _, w in busy) - time.monotonic()))
            # bounded wait: nothing may have happened yet, then the loop only looks at the stop request again
            wait([w.conn for _, w in busy] + [w.process.sentinel for _, w in busy], timeout)
            for slot, worker in busy:
                if worker.conn.poll():
                    try:
                        index, result = worker.conn.recv()
                    except (EOFError, OSError):
                        lose(slot, worker.death_reason())
                        continue
                    worker.index = None
                    on_result(index, result)
                elif not worker.process.is_alive():
                    lose(slot, worker.death_reason())
                elif time.monotonic() >= worker.deadline:
                    lose(slot, f"it ran longer than the time limit of {time_limit_s:g} s per item")
    finally:
        stopping = stop_request.requested()
        for worker in slots:
            if worker is not None:
                worker.kill() if stopping else worker.stop()


def run_isolated(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    workers: int,
    time_limit_s: float,
    initializer: Callable[[], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Any]:
    """``[fn(item) for item in items]`` in worker processes; an item given up yields :class:`ItemFailed`.

    ``progress(done, total)`` is called in this process after each item settles (result or given up).
    """
    results: list[Any] = [None] * len(items)
    done = 0

    def settle(index: int, result: Any) -> None:
        nonlocal done
        results[index] = result
        done += 1
        if progress:
            progress(done, len(items))

    if not items:
        return results
    lost = _run_phase(fn, items, range(len(items)), workers, time_limit_s, initializer, settle)
    for index, first in sorted(lost.items()):
        again = _run_phase(fn, items, [index], 1, time_limit_s, initializer, settle)
        if again:
            settle(index, ItemFailed(f"{again[index]}; first attempt: {first}; given up after a retry alone"))
    return results
