"""End a finished ``mammo run`` without the interpreter's teardown.

Why: once ``mammo run`` is done (stage folders sealed and synced, MLflow runs ended, Prefect's workers
drained, the temporary server stopped), Python still tears down every module and object it loaded:
torch, MLflow, Prefect, SQLAlchemy, pandas. On a busy 2-core machine that took seconds of the cached
rerun (and of the exit after a Ctrl-C) and does nothing the user needs. :func:`arm` registers an
``atexit`` handler before anything else registers one; handlers run last-registered first, so it runs
after all the others (Prefect's, the server's stop) and ends the process with the command's status.

Only for the command line: a test calling the CLI in its own process must keep its interpreter.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys

_status = [1]  # what an uncaught exception exits with; the command sets its own status


def arm() -> None:
    atexit.register(_exit_now)


def set_status(code: int) -> None:
    _status[0] = int(code)


def _exit_now() -> None:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(_status[0])
