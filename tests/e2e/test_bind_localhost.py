"""Servers the project starts listen on the loopback interface only, unless a user says otherwise.

A store holds patient-derived images and metrics; an MLflow UI or Prefect API reachable from the
network would publish it. Checked from the kernel's socket table (``/proc/net/tcp*``), not from the URL
a server prints: a server bound to 0.0.0.0 still answers on 127.0.0.1, so reaching it proves nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.paths import REPO
from tests.helpers.processes import clean_env, free_port, wait_http

LISTEN = "0A"
LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1 as /proc/net writes them


def listening_addresses(port: int) -> set[str]:
    """Hex local addresses of every TCP socket listening on ``port`` (IPv4 and IPv6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).is_file():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if fields[3] == LISTEN and int(hex_port, 16) == port:
                found.add(address)
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="needs Linux /proc/net/tcp")
def test_mammo_ui_serves_the_store_on_loopback_only(tmp_path):
    port = free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "ui", "--port", str(port), "--store", str(tmp_path / "store")],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env(), start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", ui)
        deadline = time.time() + 10
        while not listening_addresses(port) and time.time() < deadline:
            time.sleep(0.1)
        addresses = listening_addresses(port)
        assert addresses, f"nothing listens on port {port}"
        assert addresses <= LOOPBACK, f"mammo ui listens on {addresses}, not only on loopback"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as resp:
            assert resp.status == 200, "the UI serves the store"
    finally:
        os.killpg(ui.pid, 15)
        ui.wait(timeout=30)


def test_prefect_temporary_server_binds_loopback_after_configure(tmp_path):
    """`mammo run` starts Prefect's temporary server with the settings flows.environment leaves."""
    from flows import environment

    saved = dict(os.environ)
    try:
        for key in [k for k in os.environ if k.startswith("PREFECT_")]:
            del os.environ[key]
        environment.configure(tmp_path / "store")  # writes PREFECT_* into os.environ, as `mammo run` does
        env = dict(os.environ)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    code = "import prefect.settings as s; print(s.get_current_settings().server.api.host)"
    host = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True, timeout=120).stdout.strip()
    assert host == "127.0.0.1"
