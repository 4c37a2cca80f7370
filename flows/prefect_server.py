"""The temporary Prefect server of one ``mammo run``, started by us as a child that cannot outlive us.

Why not Prefect's own temporary server (``SubprocessASGIServer``, started on the first API call when no
``PREFECT_API_URL`` is set):

- it is a plain child process in our process group: Ctrl-C reaches it too, it stops at once, and
  Prefect's event and log workers in this process then retry the dead server for half a minute before
  the run can end;
- after a SIGKILL of ``mammo run`` nothing stops it: it stays behind, an orphan listening on its port;
- it starts only when the flow begins, so its start-up (seconds: imports, database migrations) adds to
  every run instead of overlapping with ours.

Here the same server (``prefect.server.api.server:create_app`` under uvicorn, with the environment Prefect
gives its temporary server) runs in its own session, so a Ctrl-C to ``mammo run``'s process group is
handled by ``mammo run`` alone, which stops the server last, after Prefect's workers have drained. The
server asks the kernel to kill it when its parent dies (:mod:`mammo_core.runtime.process_lifetime`), so a
SIGKILL leaves nothing behind. It is started before Prefect is imported (``PREFECT_API_URL`` must be set
by then) and imports its (heavy) modules while this process imports and checks the store; it touches
its database and log in the store only once told to go (:meth:`LocalServer.go`), after the checks passed:
a run refused by its checks leaves the store as it was.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from mammo_core.runtime.process_lifetime import die_with_parent

_STOP_WAIT_S = 3.0
# What Prefect sets for its own temporary server (prefect/server/api/server.py, SubprocessASGIServer).
_SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


class ServerFailed(RuntimeError):
    """The temporary Prefect server did not come up (its exit code and output are in the message)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalServer:
    """A temporary Prefect server, importing until :meth:`go`; :meth:`stop` ends it (also run at exit)."""

    def __init__(self, log_path: Path):
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self._log_path = log_path
        parent = os.getpid()
        project = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (project, os.environ.get("PYTHONPATH", "")) if p)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flows.prefect_server", str(self.port), str(log_path)],
            env={**os.environ, **_SERVER_ENV, "PYTHONPATH": path}, stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C to our process group is ours to handle, not the server's
            preexec_fn=lambda: die_with_parent(parent),
        )
        atexit.register(self.stop)

    def serve_when_alone(self, timeout_s: float, give_up: Callable[[], bool] = lambda: False,
                         while_booting: Callable[[], None] = lambda: None) -> None:
        """:meth:`go`, ``while_booting()``, then :meth:`wait_ready`, while no other run of this store is
        starting its server.

        ``while_booting``: work of ours that the server's start (seconds) would otherwise only wait for.

        Why: every run's server opens the same database (``PREFECT_HOME`` is in the store) and migrates it
        on start; two migrating one fresh SQLite file at once fail (one exits with code 3). An flock on
        ``server-start.lock`` beside the log serialises the starts; the kernel drops it if we die. Polled, so
        that ``give_up()`` (a stop request) ends the wait at once.
        """
        lock_path = self._log_path.parent / "server-start.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if give_up():
                        return
                    time.sleep(0.1)
            self.go()
            while_booting()
            self.wait_ready(timeout_s, give_up)
        finally:
            os.close(fd)  # releases the lock

    def go(self) -> None:
        """Let the server open its database and serve (it has been importing meanwhile)."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(b"go\n")
            self.process.stdin.close()
        except BrokenPipeError:
            pass  # it exited already: wait_ready reports its exit code

    def wait_ready(self, timeout_s: float, give_up: Callable[[], bool] = lambda: False) -> None:
        """Block until the server answers its health check; raise :class:`ServerFailed` if it cannot.

        ``give_up()`` is polled while waiting (a stop request): when it turns true, return at once.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not give_up():
            code = self.process.poll()
            if code is not None:
                raise ServerFailed(f"the temporary Prefect server exited with code {code} before it was ready "
                                   f"(port {self.port}; its output: {self._log_path}){_last_lines(self._log_path)}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        if not give_up():
            raise ServerFailed(f"the temporary Prefect server did not answer within {timeout_s:g} s "
                               f"(port {self.port}; its output: {self._log_path})")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a few seconds; idempotent."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(_STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _last_lines(path: Path, count: int = 12) -> str:
    """The end of the server's log, to show beside its exit code (empty when it wrote nothing)."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()[-count:]
    except OSError:
        return ""
    return "".join(f"\n  {line}" for line in lines)


def _serve(port: int, log_path: Path) -> None:
    """The server process: import, wait for the go, then serve on 127.0.0.1:``port`` (log to ``log_path``).

    An import that fails (a missing or incompatible package) is written to the log after the go, like
    everything else the server says: its stdout and stderr go nowhere before that, and the parent's error
    message sends the user to the log.
    """
    try:
        import uvicorn
        from prefect.server.api.server import create_app  # the slow part, done while the parent checks the store
    except BaseException:
        failed_import = traceback.format_exc()
    else:
        failed_import = None
    if sys.stdin.readline().strip() != "go":
        return  # the run was refused by its checks (or ended): nothing was written
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if failed_import is not None:
        sys.stderr.write(f"the Prefect server's modules did not import:\n{failed_import}")
        sys.stderr.flush()
        sys.exit(1)
    uvicorn.run(create_app, factory=True, host="127.0.0.1", port=port, log_level="error", lifespan="on")


def start(store: Path) -> LocalServer | None:
    """Start the server and point Prefect at it, unless ``PREFECT_API_URL`` names a server already.

    Prefect reads ``PREFECT_API_URL`` once, on import: when it is imported already (the CLI called
    in-process by a test), None too, and Prefect starts its own temporary server as before.
    """
    if os.environ.get("PREFECT_API_URL") or "prefect" in sys.modules:
        return None
    server = LocalServer(store / "prefect" / "server.log")
    os.environ["PREFECT_API_URL"] = server.api_url
    return server


if __name__ == "__main__":
    _serve(int(sys.argv[1]), Path(sys.argv[2]))
