"""The shared `/health` wait: it returns once a real HTTP server answers, gives up at its deadline, and stops
at once when the process meant to serve has died (instead of waiting out the timeout)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.live_server import free_port
from wisp_edge.health import ServerExited, is_healthy, wait_healthy


def test_wait_healthy_returns_when_a_real_server_answers(tmp_path):
    (tmp_path / "health").write_text("ok")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    assert not is_healthy(url, timeout_s=0.5)  # nothing listens yet
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_healthy(url, 30, proc=proc, interval_s=0.05)
        assert is_healthy(url)
    finally:
        proc.terminate()
        proc.wait(10)


def test_wait_healthy_gives_up_at_its_deadline():
    t0 = time.monotonic()
    assert not wait_healthy(f"http://127.0.0.1:{free_port()}", 0.5, interval_s=0.05)
    assert 0.5 <= time.monotonic() - t0 < 5


def test_a_dead_server_process_ends_the_wait_with_its_exit_code():
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait(30)
    t0 = time.monotonic()
    with pytest.raises(ServerExited) as caught:
        wait_healthy(f"http://127.0.0.1:{free_port()}", 60, proc=proc)
    assert caught.value.returncode == 3 and time.monotonic() - t0 < 5
