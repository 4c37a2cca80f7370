"""Helpers for tests that start real server processes (MLflow, Prefect, `mammo ui` / `mammo serve`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Return once ``url`` answers 200; AssertionError (with the server's output) if ``proc`` exits first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            output = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"server exited early with {proc.returncode}: {output}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def wait_until(check, timeout: float, what: str, poll: float = 1.0):
    """The first truthy value of ``check()``, polled every ``poll`` s; AssertionError naming ``what`` at timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def get_json(url: str):
    """The JSON body at ``url``, or None while the server does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except OSError:
        return None


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Terminate a server started by a test; kill it when it does not stop within ``timeout`` s."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without PREFECT_* / MLFLOW_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(extra)
    return env
