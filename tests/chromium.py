"""Open a local HTML file in headless Chromium and record what happened.

Talks the Chrome DevTools Protocol over `--remote-debugging-pipe` (JSON messages separated by
NUL bytes on file descriptors 3 and 4), so no websocket library and no port are needed.
`open_page(path)` returns a `PageReport`: console errors, uncaught exceptions, every request
the page (and its same-process frames) made, a screenshot and the result of a JS expression.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--remote-debugging-pipe",
    "--window-size=1200,900",
]
LOCAL_SCHEMES = ("file:", "data:", "about:", "blob:")


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@dataclass
class PageReport:
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    screenshot: np.ndarray | None = None  # [height, width, channels] floats in [0, 1]
    value: object = None  # result of the `ready` expression once true

    @property
    def network_requests(self) -> list[str]:
        """Requests for anything that is not a local file or inline data."""
        return [url for url in self.requests if not url.startswith(LOCAL_SCHEMES)]


class _Pipe:
    """CDP over the two pipes: `call` sends a command and waits for its reply, keeping events."""

    def __init__(self, write_fd: int, read_fd: int):
        self.write_fd, self.read_fd = write_fd, read_fd
        self.buffer = b""
        self.events: list[dict] = []
        self.next_id = 0

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self.read_fd, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, session: str | None = None, timeout: float = 30, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._read_message(deadline))


def _launch(profile: str) -> tuple[subprocess.Popen, _Pipe]:
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()

    def place_fds():  # Chromium reads commands from fd 3 and writes replies to fd 4
        os.dup2(to_child_r, 3)
        os.dup2(from_child_w, 4)

    proc = subprocess.Popen(
        [chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=place_fds, pass_fds=(3, 4), start_new_session=True,  # kept open (and inheritable) after place_fds
    )
    os.close(to_child_r)
    os.close(from_child_w)
    return proc, _Pipe(to_child_w, from_child_r)


def _decode_png(data: str) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(io.BytesIO(base64.b64decode(data)), format="png")


def _collect(report: PageReport, events: list[dict]) -> None:
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Network.requestWillBeSent":
            report.requests.append(params["request"]["url"])
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            report.console_errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            report.console_errors.append(details.get("exception", {}).get("description", details["text"]))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            report.console_errors.append(params["entry"]["text"])


def open_page(path: Path, ready: str = "true", timeout: float = 60) -> PageReport:
    """Load `path`, wait until the JS expression `ready` is truthy (polling), take a screenshot.

    Raises TimeoutError if `ready` never becomes truthy.
    """
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc, pipe = _launch(profile)
        try:
            target = pipe.call("Target.createTarget", url="about:blank")["targetId"]
            session = pipe.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Network", "Log"):
                pipe.call(f"{domain}.enable", session=session)
            pipe.call("Page.navigate", session=session, url=Path(path).resolve().as_uri())
            pipe.wait_for("Page.loadEventFired", timeout)
            deadline = time.monotonic() + timeout
            while True:
                value = pipe.call("Runtime.evaluate", session=session, expression=ready, returnByValue=True)
                value = value["result"].get("value")
                if value:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the page never satisfied: {ready}")
                time.sleep(0.2)
            shot = pipe.call("Page.captureScreenshot", session=session, format="png")["data"]
            report = PageReport(screenshot=_decode_png(shot), value=value)
            _collect(report, pipe.events)
            return report
        finally:
            _close(proc, pipe)


def _close(proc: subprocess.Popen, pipe: _Pipe) -> None:
    """Ask the browser to quit; kill its process group (its own session) if it does not."""
    try:
        pipe.call("Browser.close", timeout=5)
        proc.wait(timeout=10)
    except (OSError, RuntimeError, TimeoutError, subprocess.TimeoutExpired):
        pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    os.close(pipe.write_fd)
    os.close(pipe.read_fd)


def is_blank(image: np.ndarray) -> bool:
    """True when every pixel has the same colour."""
    pixels = image[..., :3].reshape(-1, 3)
    return bool(np.all(pixels == pixels[0]))
