"""Render an HTML file in headless Chromium and collect what its console reports.

Talks the DevTools protocol over a pipe (``--remote-debugging-pipe``): no
network port, no extra package. Console calls, uncaught exceptions and log
entries (failed resource loads among them) are collected; a full-page PNG
screenshot is written. Test support (the report pages' console check), not installed with the package.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-pipe",
)


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary, or None (``EMBEDLENS_CHROMIUM`` overrides)."""
    env = os.environ.get("EMBEDLENS_CHROMIUM")
    if env:
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class _Pipe:
    def __init__(self, proc: subprocess.Popen, write_fd: int, read_fd: int):
        self.proc, self.w, self.r = proc, write_fd, read_fd
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> int:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        return self.next_id

    def recv(self, timeout: float) -> dict:
        import select

        end = time.time() + timeout
        while b"\0" not in self.buf:
            left = end - time.time()
            if left <= 0:
                raise TimeoutError("no answer from Chromium")
            ready, _, _ = select.select([self.r], [], [], left)
            if ready:
                chunk = os.read(self.r, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30.0) -> dict:
        i = self.send(method, params, session)
        while True:
            msg = self.recv(timeout)
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 30.0) -> dict:
        for i, ev in enumerate(self.events):
            if ev.get("method") == method:
                return self.events.pop(i)
        end = time.time() + timeout
        while True:
            msg = self.recv(max(0.01, end - time.time()))
            if msg.get("method") == method:
                return msg
            self.events.append(msg)


def render(html_file: str | Path, screenshot: str | Path, width: int = 1280, height: int = 900, chromium: str | None = None) -> list[str]:
    """Open `html_file` in headless Chromium, save a full-page screenshot, return console problems.

    Returns:
        one line per console error or warning, uncaught exception, or log
        entry of level error/warning (e.g. a resource that failed to load).

    Raises:
        FileNotFoundError: no Chromium found.
    """
    binary = chromium or find_chromium()
    if binary is None:
        raise FileNotFoundError("no Chromium found (install Debian's chromium package or set EMBEDLENS_CHROMIUM)")
    url = Path(html_file).resolve().as_uri()
    profile = tempfile.mkdtemp(prefix="embedlens-chromium-")
    to_chrome_r, to_chrome_w = os.pipe()
    from_chrome_r, from_chrome_w = os.pipe()

    def child_fds():  # Chromium reads commands on fd 3 and writes answers on fd 4
        import fcntl

        a = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)  # out of the way first: the pipes may be fds 3/4 themselves
        b = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
        os.dup2(a, 3)
        os.dup2(b, 4)

    proc = subprocess.Popen(
        [binary, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=(3, 4, to_chrome_r, from_chrome_w),  # 3 and 4 kept open after preexec_fn
        preexec_fn=child_fds,
    )
    os.close(to_chrome_r)
    os.close(from_chrome_w)
    pipe = _Pipe(proc, to_chrome_w, from_chrome_r)
    problems: list[str] = []
    try:
        target = pipe.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            pipe.call(f"{domain}.enable", session=session)
        pipe.call("Page.navigate", {"url": url}, session=session)
        pipe.wait_for("Page.loadEventFired")
        metrics = pipe.call("Page.getLayoutMetrics", session=session)
        size = metrics.get("cssContentSize") or metrics.get("contentSize")
        shot = pipe.call(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True, "clip": {"x": 0, "y": 0, "width": width, "height": min(size["height"], 16000), "scale": 1}},
            session=session,
        )
        Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
        for ev in pipe.events:
            m, p = ev.get("method"), ev.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
                problems.append(f"console.{p['type']}: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                problems.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") in ("error", "warning"):
                e = p["entry"]
                problems.append(f"log.{e['level']}: {e.get('text')} {e.get('url', '')}".strip())
    finally:
        try:
            pipe.send("Browser.close")
            proc.wait(timeout=10)
        except Exception:
            proc.kill()
            proc.wait()
        os.close(to_chrome_w)
        os.close(from_chrome_r)
        shutil.rmtree(profile, ignore_errors=True)
    return problems
