"""Child processes that end with their parent, even when the parent is killed with SIGKILL.

Why: a SIGKILLed ``mammo run`` runs no clean-up, so a helper process it started (the temporary Prefect
server, curate's image workers) would live on as an orphan, holding a port or burning a core. Linux can
deliver a signal to a process when its parent dies (``prctl(PR_SET_PDEATHSIG)``); the child asks for
that as its first act. Elsewhere (macOS) this is a no-op and helpers end when their pipe closes.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
# Loaded once, here, so that a child calling die_with_parent right after fork does no dynamic loading.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent ``parent_pid`` dies.

    Call it in the child (a ``preexec_fn``, or first thing in a worker). If the parent is already gone
    (it died between the fork and this call), the child exits at once.

    The kernel ties this to the *thread* that created the child: start such children from a thread that
    outlives them (the main thread, or a worker thread that waits for them).
    """
    if _LIBC is not None and _LIBC.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != parent_pid:
        os._exit(1)
