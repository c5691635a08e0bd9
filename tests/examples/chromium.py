"""A real headless Chromium (Debian's ``chromium`` package) driven over the DevTools
protocol with the ``websockets`` package: open a page, evaluate JavaScript, collect network
events. Only the browser tests use it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

CANDIDATES = ("chromium", "chromium-browser", "/usr/bin/chromium")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--remote-debugging-port=0", "--remote-allow-origins=*")


def chromium_binary() -> str:
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("Chromium is needed for the browser tests and was not found: "
                "apt-get install chromium (scripts/install does it when run as root)")


class DevTools:
    """One DevTools connection to the browser, with one page attached (flat sessions)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self._next_id = 0
        self.session: str | None = None

    def send(self, method: str, params: dict[str, Any] | None = None, *,
             page: bool = True, timeout: float = 30) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method,
                                   "params": params or {}}
        if page and self.session is not None:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"DevTools: no answer to {method} in {timeout} s")
            reply: dict[str, Any] = json.loads(self.ws.recv(timeout=left))
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise AssertionError(f"DevTools: {method} failed: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
            if "method" in reply:
                self.events.append(reply)

    def open_page(self) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, page=False)
        attached = self.send("Target.attachToTarget",
                             {"targetId": target["targetId"], "flatten": True}, page=False)
        self.session = attached["sessionId"]

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression,
                                                "returnByValue": True})
        if "exceptionDetails" in result:
            raise AssertionError(f"page: {expression} raised {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str) -> Any:
        """Evaluate ``expression`` until it is truthy (polling, with a deadline)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@contextmanager
def chromium() -> Iterator[DevTools]:
    """A fresh headless Chromium (own profile dir) with a page attached."""
    binary = chromium_binary()
    profile = Path(tempfile.mkdtemp(prefix="phloem-chromium-"))
    proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        endpoint = _devtools_endpoint(proc, timeout=60)
        with connect(endpoint, max_size=None, open_timeout=30) as ws:
            devtools = DevTools(ws)
            devtools.open_page()
            yield devtools
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


def _devtools_endpoint(proc: subprocess.Popen[str], timeout: float) -> str:
    """Chromium prints 'DevTools listening on ws://...' on stderr once it is up."""
    assert proc.stderr is not None
    found: list[str] = []
    lines: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            match = re.search(r"DevTools listening on (ws://\S+)", line)
            if match and not found:
                found.append(match.group(1))
        # keep draining so Chromium never blocks on a full pipe

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError("Chromium did not start its DevTools endpoint:\n"
                                 + "".join(lines[-30:]))
        time.sleep(0.05)
    return found[0]
