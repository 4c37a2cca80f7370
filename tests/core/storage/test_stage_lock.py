"""The per-(stage, key) lock: real processes, real flock, a real SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from mammo_core.storage import stage_lock

_HOLDER = """
import os, signal, sys, time
from mammo_core.storage import stage_lock
root, mode, ready = sys.argv[1:4]
with stage_lock.hold(root, "train", "k1", notify=print):
    open(ready, "w").close()
    if mode == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(2.0)
    open(ready + ".done", "w").close()  # last thing under the lock
"""


def _start_holder(tmp_path, mode: str) -> subprocess.Popen:
    ready = tmp_path / f"ready-{mode}"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path), mode, str(ready)])
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None or mode == "die", "the holder ended before taking the lock"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return proc


def test_second_producer_waits_for_the_first_and_names_it(tmp_path):
    holder = _start_holder(tmp_path, "hold")
    messages: list[str] = []
    began = time.monotonic()
    with stage_lock.hold(tmp_path, "train", "k1", notify=messages.append):
        waited = time.monotonic() - began
        assert (tmp_path / "ready-hold.done").exists(), "the lock was granted only after the holder was done"
    assert holder.wait(timeout=60) == 0
    assert waited > 0.5
    assert len(messages) == 1 and f"pid {holder.pid}" in messages[0] and "waiting" in messages[0]
    assert stage_lock.lock_path(tmp_path, "train", "k1").read_bytes() == b"", "a clean release leaves no owner"


def test_lock_of_a_killed_owner_is_reclaimed_with_a_message(tmp_path):
    holder = _start_holder(tmp_path, "die")
    assert holder.wait(timeout=60) == -signal.SIGKILL
    owner = json.loads(stage_lock.lock_path(tmp_path, "train", "k1").read_text())
    assert owner["pid"] == holder.pid
    messages: list[str] = []
    began = time.monotonic()
    with stage_lock.hold(tmp_path, "train", "k1", notify=messages.append):
        assert time.monotonic() - began < 5, "the kernel released the dead owner's lock: no waiting"
        now = json.loads(stage_lock.lock_path(tmp_path, "train", "k1").read_text())
        assert now["pid"] == os.getpid()
    assert len(messages) == 1 and "reclaimed a stale lock" in messages[0] and f"pid {holder.pid}" in messages[0]


def test_liveness_does_not_trust_host_and_pid(tmp_path):
    """A record naming a live process (here: this one, as in a container sharing pid numbers) is still stale
    when no process holds the flock."""
    path = stage_lock.lock_path(tmp_path, "train", "k1")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"host": os.uname().nodename, "pid": os.getppid(), "since_unix": 0}))
    messages: list[str] = []
    with stage_lock.hold(tmp_path, "train", "k1", notify=messages.append):
        pass
    assert len(messages) == 1 and "reclaimed a stale lock" in messages[0]
