"""The verifier as `wisp-cloud serve` builds it, served over loopback HTTP from a thread of the test process.

The same runtime, app and uvicorn server as the command line, in-process so that a test can break the
server's acceptance code on purpose (monkeypatch) and watch a statistical test notice it; tests/live_server.py
runs the real command in a subprocess for everything else.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import uvicorn

from tests.live_server import TARGET, free_port
from wisp_cloud.runtime import build_runtime
from wisp_cloud.settings import ServeSettings


class InProcessServer:
    def __init__(self, *, profile: Path, threads: int = 1, **settings) -> None:
        self.port = free_port()
        self.settings = ServeSettings(model=TARGET, port=self.port, threads=threads, profile=profile,
                                      log_level="warning", **settings)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "InProcessServer":
        app = build_runtime(self.settings).app()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="inprocess-verifier", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process verifier did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._thread.join(30)
