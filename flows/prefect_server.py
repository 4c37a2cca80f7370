"""Start Prefect's temporary server on a thread while ``mammo run`` creates MLflow's database.

Why: without ``PREFECT_API_URL`` a run needs Prefect's temporary server, a uvicorn subprocess that imports
Prefect's server and migrates its database: the largest fixed cost of a run. Prefect starts it lazily,
when the flow asks for its first client, and the flow then creates and migrates MLflow's database: two
waits one after the other. Prefect keeps one such server per process (``SubprocessASGIServer`` is a
per-port singleton), so starting it here is the same server the flow then uses, and the two start-ups
overlap on two cores. The CLI starts it only after its checks, so that a refused run writes nothing.
"""

from __future__ import annotations

import contextlib
import threading


def start_in_background() -> threading.Thread | None:
    """Begin starting the temporary server when the flow will need one; ``None`` when it will not.

    Must be called after ``environment.configure`` (Prefect reads its settings once, when imported) and
    joined (:func:`ready`) before the flow runs: Prefect marks the server running as soon as it launches
    it, and a flow starting meanwhile would talk to a server that does not answer yet. The thread is not a
    daemon, so even on an early exit the interpreter waits for it, and Prefect's own exit hook then stops
    the server (no orphan). A failed start is left to the flow: Prefect retries there and reports it.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None

    # Imported here, on the calling thread: importing it on the new thread while this one imports MLflow
    # (both load SQLAlchemy) breaks on a partially initialised module.
    from prefect.server.api.server import SubprocessASGIServer

    def start() -> None:
        with contextlib.suppress(Exception):  # the flow's own start raises it, with Prefect's message
            SubprocessASGIServer().start()

    thread = threading.Thread(target=start, name="prefect-server-start")
    thread.start()
    return thread


def ready(thread: threading.Thread | None) -> None:
    """Wait until the background start (if any) has finished, successfully or not."""
    if thread is not None:
        thread.join()
