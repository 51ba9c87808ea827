"""Autoscaling on Ray Serve (`--min-replicas 1 --max-replicas 2`) with a tiny model on a local Ray cluster:
load adds a replica, new sessions are placed on it, and when the load is gone the replica is drained and
removed while its sessions are mid-answer; their next rounds resume elsewhere and every answer equals the
target's own greedy output. Short delays and metric pushes make the controller act in seconds, not the
minutes an operator would use.
"""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest

from tests.live_server import LiveServer, tiny_checkpoint
from tests.tiny_models import TorchDrafter
from wisp_cloud.cluster.placement import STATS_PERIOD_S, split_session_id
from wisp_cloud.estimator import TimeEstimator
from wisp_cloud.generate import generate
from wisp_edge.client import SESSION_HEADER, HttpVerifier
from wisp_edge.engine import FixedLength, SpeculativeEngine

LIVE = os.environ.get("WISP_RAY_TESTS", "1") != "0"
# Ray Serve's handles and replicas report requests in flight every 10 s by default; every 0.5 s here.
FAST_METRICS = {"RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
                "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"}


def _running(url: str) -> list[dict]:
    return [r for r in httpx.get(f"{url}/health", timeout=30).json()["replicas"] if r["state"] == "running"]


def _exactly(url: str, count: int) -> list[dict] | None:
    running = _running(url)
    return running if len(running) == count else None


def _wait(predicate, what: str, timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    pytest.fail(f"timed out waiting for {what}")


def _load(url: str, stop: threading.Event) -> None:
    """One client's closed loop of verify rounds, each a round trip that counts as a request in flight."""
    with httpx.Client(base_url=url, timeout=60) as http:
        while not stop.is_set():
            reply = http.post("/v1/sessions", json={"prompt_ids": [1, 17, 42, 9]})
            if reply.status_code != 201:
                time.sleep(0.1)
                continue
            sid, position = reply.json()["session_id"], reply.json()["position"]
            for round_id in range(40):
                if stop.is_set():
                    break
                reply = http.post(f"/v1/sessions/{sid}/verify", headers={SESSION_HEADER: sid},
                                  json={"position": position, "round_id": round_id, "draft_ids": [5, 6, 7]})
                if reply.status_code != 200:
                    break
                position = reply.json()["position"]
            http.delete(f"/v1/sessions/{sid}", headers={SESSION_HEADER: sid})


def test_load_adds_a_replica_and_a_drained_one_costs_no_token(tmp_path):
    if not LIVE:
        pytest.skip("live Ray cluster tests skipped (WISP_RAY_TESTS=0)")
    model_dir = tiny_checkpoint(tmp_path / "tiny-target", max_seq_len=256)
    profile = tmp_path / "profile.json"
    TimeEstimator((1.0, 0.01, 0.0, 0.0, 0.0), metadata={"device": "cpu", "dtype": "float32"}).save(profile)
    with LiveServer("--min-replicas", "1", "--max-replicas", "2", "--target-ongoing-requests", "1",
                    "--upscale-delay-s", "0", "--downscale-delay-s", "4", "--autoscale-look-back-s", "1",
                    "--model", str(model_dir), "--profile", str(profile), "--threads", "1",
                    "--kv-budget-mb", "64", "--log-level", "warning", env=FAST_METRICS,
                    log_path=tmp_path / "server.log") as live:
        first = _wait(lambda: _running(live.url), "the first replica")
        assert len(first) == 1  # min_replicas: one until there is load

        from wisp_cloud.model.loader import load_model

        model = load_model(model_dir)
        eos = tuple(model.args.eos_token_ids)
        prompts = [[1, 300 + i, 12, 4, 5] for i in range(4)]
        want = [generate(model, p, max_new_tokens=24, eos_ids=eos) for p in prompts]
        backends = [HttpVerifier(live.url, max_wait_s=120) for _ in prompts]
        streams = [SpeculativeEngine(TorchDrafter(model), b, FixedLength(3), draft_ahead=False,
                                     eos_ids=eos).generate(p, max_new_tokens=24) for b, p in zip(backends, prompts)]

        stop = threading.Event()
        clients = [threading.Thread(target=_load, args=(live.url, stop)) for _ in range(4)]
        for client in clients:
            client.start()
        try:
            both = _wait(lambda: _exactly(live.url, 2), "a second replica")
            added = next(r["id"] for r in both if r["id"] != first[0]["id"])
            _wait(lambda: added in _replicas_answering(live.url), "the proxy to route to the new replica")
        finally:
            stop.set()
            for client in clients:
                client.join()
        time.sleep(2 * STATS_PERIOD_S + 0.2)  # every replica has reported its load since the last newcomer
        got = [[next(s).id, next(s).id] for s in streams]  # every session open and mid-answer
        holders = [split_session_id(next(iter(b._sessions.values())).server_id)[0] for b in backends]
        assert set(holders) == {r["id"] for r in both}, holders  # newcomers went to both, the new one included

        # No load now: after the down-scale delay (4 s) Ray drains one replica and removes it.
        left = _wait(lambda: _exactly(live.url, 1), "the scale-down", timeout_s=180)
        for i, stream in enumerate(streams):
            got[i] += [t.id for t in stream]
        assert got == want  # the answers of the target alone
        removed = {r["id"] for r in both} - {left[0]["id"]}
        for holder, backend in zip(holders, backends):
            assert (backend.resumes >= 1) == (holder in removed), (holders, [b.resumes for b in backends])


def _replicas_answering(url: str) -> set[str]:
    """Which replicas Serve's proxy hands new sessions to (the `x-wisp-replica` header of a few opens)."""
    seen = set()
    with httpx.Client(base_url=url, timeout=30) as http:
        for _ in range(4):
            reply = http.post("/v1/sessions", json={"prompt_ids": [1, 2, 3]})
            if reply.status_code == 201:
                seen.add(reply.headers.get("x-wisp-replica"))
                sid = reply.json()["session_id"]
                http.delete(f"/v1/sessions/{sid}", headers={SESSION_HEADER: sid})
    return seen
