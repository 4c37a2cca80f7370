"""Ctrl-C and SIGTERM during ``mammo run``: stop at a clean point within seconds, never mid-write.

The first SIGINT or SIGTERM sets the process-wide stop request (:mod:`mammo_core.runtime.stop_request`); the
running stage notices it between two batches (or two images), removes its temporary folder, keeps its
checkpoints for the resume and marks its MLflow run KILLED; the flow then marks the parent run KILLED and
the CLI prints the resume command. Nothing is killed mid-write, so the store stays consistent.

A deadline backs this up: if the run has not ended ``grace_s`` seconds after the signal (a stage stuck in
one long C call, a loop without a check), or on a second Ctrl-C, :meth:`Interrupts.stop_now` marks every
MLflow run this process still holds open KILLED and ends the process at once. That is as safe as a kill:
sealing is atomic, a half-written stage folder is a ``.tmp-`` sibling the next run sweeps away.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable

from mammo_core.runtime import stop_request

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
GRACE_S = 7.0  # the bound is 10 s from the signal to the exit; the hard stop itself takes < 1 s

_installed: Interrupts | None = None


class Interrupts:
    """The SIGINT/SIGTERM handlers of one ``mammo run`` (install them from the main thread)."""

    def __init__(self, say: Callable[[str], None], on_stop_now: Callable[[], None], grace_s: float = GRACE_S):
        self._say = say
        self._on_stop_now = on_stop_now
        self._grace_s = grace_s
        self.signum: int | None = None
        self._stopping_now = threading.Lock()

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum or signal.SIGINT, 130)

    def install(self) -> None:
        """Take SIGINT and SIGTERM (again: Prefect's flow engine swaps its own SIGTERM handler in)."""
        global _installed
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)
        _installed = self

    def uninstall(self) -> None:
        """Give SIGINT and SIGTERM back to Python's defaults (a CLI called in-process, by a test)."""
        global _installed
        if threading.current_thread() is not threading.main_thread() or _installed is not self:
            return
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _installed = None

    def _handle(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if stop_request.requested():
            self._say(f"{name} again: stopping now")
            threading.Thread(target=self.stop_now, daemon=True).start()
            return
        self.signum = signum
        stop_request.request(name)
        self._say(f"{name} received: stopping at the next safe point (within {self._grace_s:g} s; "
                  f"Ctrl-C again to stop at once)")
        timer = threading.Timer(self._grace_s, self.stop_now)
        timer.daemon = True
        timer.start()

    def stop_now(self) -> None:
        """Mark what is still open KILLED (``on_stop_now``) and end the process without further clean-up."""
        if not self._stopping_now.acquire(blocking=False):
            return
        try:
            self._on_stop_now()
        except Exception as exc:  # the exit must happen whatever the tracking store says
            self._say(f"while stopping: {type(exc).__name__}: {exc}")
        finally:
            sys.stderr.flush()
            os._exit(self.exit_code)


def reinstall() -> None:
    """Take the signals back inside a flow: Prefect's flow engine installs its own SIGTERM handler, which
    raises in the main thread and leaves the stage threads running. A no-op outside ``mammo run``."""
    if _installed is not None:
        _installed.install()
