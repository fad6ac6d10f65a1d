"""A headless Chromium driven over the DevTools protocol, for tests that check pages as a reader sees them.

Why not Playwright or Selenium: both bring a driver of their own (Playwright a Node.js build
and, by default, its own browser download; Selenium a chromedriver), while Chromium already
speaks the DevTools protocol over a websocket and ``websocket-client`` is in the environment
(JupyterLab's server needs it). The protocol calls used here are ``Page.navigate``,
``Runtime.evaluate`` and ``Page.captureScreenshot``; console messages, uncaught exceptions and
failed loads arrive as events and are kept for the test to check.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

#: Flags for a quiet, reproducible headless run that never reaches the network on its own.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-default-apps", "--hide-scrollbars", "--mute-audio")


def chromium_binary() -> str | None:
    """Debian's ``chromium`` (or another Chromium/Chrome on PATH), else None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Chromium:
    """One headless Chromium with a fresh profile; use as a context manager.

    >>> with Chromium(tmp_path / "profile") as browser:          # doctest: +SKIP
    ...     browser.open("file:///.../index.html")
    ...     browser.evaluate("document.title")
    """

    def __init__(self, user_data_dir: Path, width: int = 1280, height: int = 1600,
                 timeout: float = 60.0):
        import websocket

        binary = chromium_binary()
        if binary is None:
            raise FileNotFoundError("no chromium on PATH")
        self.timeout = timeout
        user_data_dir = Path(user_data_dir)
        user_data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(user_data_dir.parent / f"{user_data_dir.name}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={user_data_dir}", "--remote-debugging-port=0",
             f"--window-size={width},{height}", "about:blank"],
            stdout=self._log, stderr=subprocess.STDOUT)
        port_file = user_data_dir / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"chromium did not start (see {self._log.name})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list",
                                                   timeout=timeout))
        page = next(t for t in targets if t.get("type") == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=timeout,
                                              suppress_origin=True)
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride",
                  width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one protocol command and return its result (events on the way are kept)."""
        self._next_id += 1
        self.ws.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def _pump(self, seconds: float) -> None:
        """Collect events for ``seconds`` (scripts that run after the load event)."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.ws.settimeout(left)
            try:
                self.events.append(json.loads(self.ws.recv()))
            except Exception:  # websocket timeout: nothing more arrived
                break
        self.ws.settimeout(self.timeout)

    def open(self, url: str, settle: float = 1.0) -> None:
        """Load ``url`` and wait for its load event (images included), then ``settle`` s."""
        self.events.clear()
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + self.timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not finish loading in {self.timeout:.0f} s")
            self.events.append(json.loads(self.ws.recv()))
        self._pump(settle)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} raised: {result['exceptionDetails']}")
        return result["result"].get("value")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads since the last :meth:`open`."""
        found = []
        for e in self.events:
            method, p = e.get("method"), e.get("params", {})
            if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                found.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                    for a in p.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                details = p.get("exceptionDetails", {})
                found.append("exception: " + str(details.get("exception", {}).get(
                    "description", details.get("text"))))
            elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                entry = p["entry"]
                found.append(f"log: {entry.get('text')} {entry.get('url', '')}".strip())
        return found

    def screenshot(self, path: Path) -> Path:
        """A PNG of the viewport (``width`` x ``height`` CSS pixels) at ``path``."""
        data = self.call("Page.captureScreenshot", format="png")["data"]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def close(self) -> None:
        """Close the browser (politely, then by signal) and its log."""
        try:
            if getattr(self, "ws", None) is not None:
                self.ws.send(json.dumps({"id": 0, "method": "Browser.close"}))
                self.ws.close()
        except Exception:  # the browser may already be gone
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log.close()

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
