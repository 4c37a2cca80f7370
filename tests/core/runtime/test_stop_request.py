"""The pieces behind a clean Ctrl-C, on small synthetic work (the real signals: tests/reliability/test_interrupts.py).

- a stop request ends curate's worker pool (mammo_core.runtime.isolation) within a poll interval, killing its workers;
- a child started with die_with_parent ends when its parent is SIGKILLed;
- flows.interrupts: a signal sets the stop request; a run that does not stop in time is ended by the deadline,
  after the hard-stop callback ran, with the signal's exit code.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

from mammo_core.runtime import stop_request
from mammo_core.runtime.isolation import run_isolated
from tests.helpers.paths import REPO


def _sleepy(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_a_stop_request_ends_the_worker_pool_and_its_workers():
    stop_request.clear()
    timer = threading.Timer(0.5, stop_request.request, args=("SIGINT",))
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(stop_request.StopRequested, match="stopped by SIGINT during the worker pool"):
            run_isolated(_sleepy, [30.0, 30.0, 30.0], workers=2, time_limit_s=120)
    finally:
        timer.cancel()
        stop_request.clear()
    assert time.monotonic() - started < 5, "the pool waited for its items instead of stopping"
    assert multiprocessing.active_children() == []


def test_the_pool_runs_normally_without_a_stop_request():
    stop_request.clear()
    assert run_isolated(_sleepy, [0.0, 0.01], workers=2, time_limit_s=60) == [0.0, 0.01]


def test_a_child_that_asked_to_die_with_its_parent_dies_on_its_sigkill(tmp_path):
    pid_file = tmp_path / "child.pid"
    parent = textwrap.dedent(f"""
        import os, subprocess, sys, time
        from mammo_core.runtime.process_lifetime import die_with_parent
        me = os.getpid()
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                                 preexec_fn=lambda: die_with_parent(me), start_new_session=True)
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        child = psutil.Process(int(pid_file.read_text()))
        proc.kill()
        proc.wait()
        gone, alive = psutil.wait_procs([child], timeout=5)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], "the child outlived its parent"
    finally:
        proc.kill()
        proc.wait()


def test_a_run_that_does_not_stop_in_time_is_ended_by_the_deadline(tmp_path):
    """A loop that never checks the stop request: the deadline runs the hard stop and exits with 143."""
    marker = tmp_path / "stop_now_ran"
    script = textwrap.dedent(f"""
        import sys, time
        from flows.interrupts import Interrupts
        from mammo_core.runtime import stop_request
        guard = Interrupts(lambda line: print(line, file=sys.stderr, flush=True),
                           lambda: open({str(marker)!r}, "w").write(stop_request.reason()), grace_s=1.0)
        guard.install()
        print("ready", flush=True)
        while True:  # a stage stuck in one long call
            time.sleep(0.05)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert time.monotonic() - sent < 5
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 143
    assert marker.read_text() == "SIGTERM"
    assert "SIGTERM received: stopping at the next safe point" in proc.stderr.read()
