"""Is a WISP server up? One probe of `/health`, and a wait for a server that is starting.

The verifier and the edge's local API both answer `GET /health` with 200 once they can serve. The demo,
the chat app and the tests that start servers all wait on it the same way, so the loop lives here.
"""

from __future__ import annotations

import subprocess
import time

import httpx


class ServerExited(RuntimeError):
    """The process that was to serve exited before it answered `/health`."""

    def __init__(self, returncode: int) -> None:
        super().__init__(f"the server exited with code {returncode}")
        self.returncode = returncode


def is_healthy(url: str, timeout_s: float = 2.0, verify: bool | object = True) -> bool:
    """Whether `url` answers `/health` with 200; any connection or HTTP error is a no."""
    try:
        return httpx.get(f"{url.rstrip('/')}/health", timeout=timeout_s, verify=verify).status_code == 200
    except httpx.HTTPError:
        return False


def wait_healthy(url: str, timeout_s: float, *, proc: subprocess.Popen | None = None, interval_s: float = 0.3,
                 verify: bool | object = True) -> bool:
    """Poll `/health` until it answers 200 (True) or `timeout_s` passes (False).

    With `proc`, stop early and raise `ServerExited` when that process dies: waiting out the whole
    timeout for a server that crashed at start-up only hides its error.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise ServerExited(proc.returncode)
        if is_healthy(url, verify=verify):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)
