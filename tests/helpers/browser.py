"""A headless Chromium driven over the DevTools protocol, for checks of pages that are JavaScript apps.

Why not ``--dump-dom`` (as tests/core/reporting/test_report_render.py does for the static report): the MLflow UI
builds its pages in the browser, keeps the run table's child rows collapsed until a click, and shows an HTML artifact
in a sandboxed iframe whose document ``--dump-dom`` does not include. The protocol lets a test click,
wait for what the page has laid out, and read inside the iframe. It needs only ``websockets`` (installed
with Prefect) and Debian's chromium (``ensure_chromium``). Chromium stays off the network: every host name
but the local server's resolves to nothing.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

from tests.core.reporting.test_report_render import ensure_chromium

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--window-size=1600,1200",
         "--remote-debugging-port=0",
         # keep the sandboxed artifact iframe in the page's process, so that it is part of the page's frame tree
         "--disable-site-isolation-trials",
         "--disable-features=IsolateOrigins,site-per-process,IsolateSandboxedIframes")


class Browser:
    """One page of a headless Chromium; ``close`` ends the browser process."""

    def __init__(self, workdir: Path, start_timeout: float = 30.0):
        chromium = ensure_chromium()
        profile = workdir / "chromium-profile"
        self.process = subprocess.Popen([str(chromium), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + start_timeout
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"chromium did not open its DevTools port (rc {self.process.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            page = next(t for t in json.load(response) if t["type"] == "page")
        self.socket = connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
        self._next_id = 0
        self.call("Page.enable")
        self.call("Runtime.enable")

    def call(self, method: str, **params: Any) -> dict:
        """Send one protocol command and return its result (events that arrive meanwhile are skipped)."""
        self._next_id += 1
        message_id = self._next_id
        self.socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str, context_id: int | None = None) -> Any:
        """The value of a JavaScript expression in the page (or in the given execution context)."""
        params: dict[str, Any] = {"expression": expression, "returnByValue": True, "awaitPromise": True}
        if context_id is not None:
            params["contextId"] = context_id
        result = self.call("Runtime.evaluate", **params)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def wait_for(self, expression: str, timeout: float = 30.0, context_id: int | None = None) -> Any:
        """Poll until the expression is truthy; its value, or an AssertionError saying what the page showed."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.evaluate(expression, context_id)
            except RuntimeError:
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                text = self.evaluate("document.body ? document.body.innerText.slice(0, 1500) : ''")
                raise AssertionError(f"timed out waiting for {expression!r}; the page shows: {text!r}")
            time.sleep(0.25)

    def frame_context(self, url_prefix: str) -> int:
        """An execution context inside the child frame whose URL starts with ``url_prefix``."""
        tree = self.call("Page.getFrameTree")["frameTree"]
        frames = [child["frame"] for child in tree.get("childFrames", [])]
        frame = next((f for f in frames if f["url"].startswith(url_prefix)), None)
        if frame is None:
            raise AssertionError(f"no frame with a URL starting {url_prefix!r}: {[f['url'] for f in frames]}")
        return self.call("Page.createIsolatedWorld", frameId=frame["id"], worldName="check")["executionContextId"]

    def close(self) -> None:
        try:
            if hasattr(self, "socket"):
                self.socket.close()
        finally:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
