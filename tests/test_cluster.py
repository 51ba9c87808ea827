"""Many verifier replicas behind one endpoint (`wisp-cloud serve --replicas 2`, Ray Serve) on a local Ray
cluster, with a tiny random model that has the target's vocabulary: every round of a session stays on the
replica that holds it, new sessions spread, a SIGKILLed replica costs no token (the edge resumes and the
answer is unchanged) and is restarted by Ray, and a full fleet refuses with 429 + Retry-After. One
cluster for the module (its start is most of the time); the placement rules are tested without Ray.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.live_server import LiveServer, tiny_checkpoint
from tests.tiny_models import TorchDrafter
from wisp_cloud.cluster.placement import STATS_PERIOD_S, ReplicaLoad, avoid_key, avoided, owner_of, rank, session_id, split_session_id, target_key
from wisp_cloud.estimator import TimeEstimator
from wisp_cloud.generate import generate
from wisp_edge.client import HttpVerifier
from wisp_edge.engine import FixedLength, SpeculativeEngine

REPLICAS = 2
MAX_QUEUE = 1  # per replica: a second waiting job refuses newcomers, so a burst meets a full fleet


# --- the placement rules, pure -----------------------------------------------------------------------

def test_a_session_id_names_its_replica_and_a_foreign_id_names_none():
    sid = session_id("r1abc", "0f0f")
    assert split_session_id(sid) == ("r1abc", "0f0f") and owner_of(sid) == "r1abc"
    assert owner_of(target_key("r2")) == "r2"
    assert owner_of("0f0f0f") is None and owner_of("") is None  # a single-process server's id: placed by load
    assert owner_of(avoid_key(["r1", "r2"])) is None and avoided(avoid_key(["r1", "r2"])) == {"r1", "r2"}


def test_new_sessions_go_to_the_least_loaded_replica_and_a_burst_spreads():
    loads = {"a": ReplicaLoad(backlog_ms=40.0, round_ms=5.0), "b": ReplicaLoad(backlog_ms=0.0, round_ms=5.0)}
    assert rank(loads, {}) == [["b"], ["a"]]
    assert rank(loads, {"b": 9}) == [["a"], ["b"]]  # nine placed on b since its report: 45 ms > 40 ms
    idle = {"a": ReplicaLoad(kv_used_bytes=600, kv_budget_bytes=1000, sessions=3),
            "b": ReplicaLoad(kv_used_bytes=100, kv_budget_bytes=1000, sessions=3)}
    assert rank(idle, {})[0] == ["b"]  # equal backlog: the one with more free KV
    assert rank({"a": ReplicaLoad(), "b": ReplicaLoad()}, {"a": 1})[0] == ["b"]  # no reports yet: by count


def test_one_replica_does_not_import_ray():
    code = ("import sys; import wisp_cloud.server, wisp_cloud.cli; from wisp_cloud.settings import ServeSettings;"
            "assert not ServeSettings().clustered; "
            "sys.exit(1 if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ, "WISP_REPLICAS": "1"}).returncode == 0


# --- a live cluster ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-target", max_seq_len=256)


LIVE = os.environ.get("WISP_RAY_TESTS", "1") != "0"  # WISP_RAY_TESTS=0 skips the live cluster (about 45 s)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_dir):
    if not LIVE:
        pytest.skip("live Ray cluster tests skipped (WISP_RAY_TESTS=0)")
    where = tmp_path_factory.mktemp("cluster")
    profile = where / "profile.json"  # a fixed estimator: nothing to measure at start
    TimeEstimator((1.0, 0.01, 0.0, 0.0, 0.0), metadata={"device": "cpu", "dtype": "float32"}).save(profile)
    with LiveServer("--replicas", str(REPLICAS), "--model", str(tiny_model_dir), "--profile", str(profile),
                    "--threads", "1", "--max-queue", str(MAX_QUEUE), "--kv-budget-mb", "64", "--log-level", "warning",
                    log_path=where / "server.log") as live:
        _wait_for_replicas(live.url)  # /health is 200 from the first replica up
        yield live


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from wisp_cloud.model.loader import load_model

    return load_model(tiny_model_dir)


def _replicas(url: str) -> list[dict]:
    health = httpx.get(f"{url}/health", timeout=30).json()
    return [r for r in health["replicas"] if r["state"] == "running"]


def _wait_for_replicas(url: str, gone: str | None = None, timeout_s: float = 240.0) -> list[dict]:
    """Until every replica runs and Serve's proxy routes to each (it learns of a new replica a little later
    than the replicas do): a few sessions opened and closed, and the `x-wisp-replica` header of the
    answers names each replica."""
    deadline = time.monotonic() + timeout_s
    while True:
        replicas = _replicas(url)
        ids = {r["id"] for r in replicas}
        if len(replicas) == REPLICAS and gone not in ids:
            answered = set()
            for _ in range(2 * REPLICAS):
                opened = httpx.post(f"{url}/v1/sessions", json={"prompt_ids": [1, 2, 3]}, timeout=30)
                if opened.status_code == 201:
                    answered.add(opened.headers.get("x-wisp-replica"))
                    sid = opened.json()["session_id"]
                    httpx.delete(f"{url}/v1/sessions/{sid}", headers={"x-session-id": sid}, timeout=30)
            if answered == ids:
                # Those sessions count as placed on their replicas until each reports its load again.
                time.sleep(2 * STATS_PERIOD_S + 0.2)
                return replicas
        if time.monotonic() > deadline:
            pytest.fail(f"{REPLICAS} replicas{f' without {gone}' if gone else ''} not running: {replicas}")
        time.sleep(0.25)


def test_health_and_metrics_list_every_replica(cluster):
    replicas = _replicas(cluster.url)
    assert len(replicas) == REPLICAS and len({r["pid"] for r in replicas}) == REPLICAS
    assert all(r["pid"] != cluster.pid for r in replicas)  # separate processes
    text = httpx.get(f"{cluster.url}/metrics", timeout=30).text
    for r in replicas:
        assert f'wisp_kv_budget_bytes{{replica="{r["id"]}"}}' in text
    assert httpx.get(f"{cluster.url}/openapi.json").json()["paths"]["/v1/sessions/{session_id}/verify"]


def _verify_requests_served(metrics: str) -> dict[str, float]:
    """Verify requests answered 200 by each replica's own HTTP app, from the merged /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    served: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "wisp_http_requests_total" and labels.get("route", "").endswith("/verify") \
                    and labels.get("status") == "200":
                served[labels["replica"]] = served.get(labels["replica"], 0.0) + sample.value
    return served


def test_rounds_stay_on_their_replica_and_sessions_spread(cluster):
    with httpx.Client(base_url=cluster.url, timeout=30) as http:
        before = _verify_requests_served(http.get("/metrics").text)
        sessions = []
        for i in range(6):
            reply = http.post("/v1/sessions", json={"prompt_ids": [1, 100 + i, 7, 9]})
            assert reply.status_code == 201, reply.text
            sessions.append([reply.json()["session_id"], reply.json()["position"]])
        owners = [split_session_id(sid)[0] for sid, _ in sessions]
        assert len(set(owners)) == REPLICAS and max(owners.count(o) for o in set(owners)) <= 4
        for round_id in range(6):
            for entry in sessions:
                sid, position = entry
                # With the header (as the edge client sends it) Serve's proxy routes the round to the session's
                # replica; without it (the last round) any replica takes it and passes it to the owner.
                headers = {"x-session-id": sid} if round_id < 5 else {}
                reply = http.post(f"/v1/sessions/{sid}/verify", headers=headers,
                                  json={"position": position, "round_id": round_id, "draft_ids": [5, 6, 7]})
                assert reply.status_code == 200, reply.text  # another replica would not know the session
                entry[1] = reply.json()["position"]
        counts = {r["id"]: r["sessions"] for r in _replicas(cluster.url)}
        assert sorted(counts.values()) == sorted(owners.count(o) for o in set(owners))
        # The five rounds with the header reached their replica's own HTTP app straight from the proxy: each
        # replica served five verify requests per session it holds, plus at most the six header-less ones.
        served = _verify_requests_served(http.get("/metrics").text)
        for replica, held in counts.items():
            assert 5 * held <= served.get(replica, 0) - before.get(replica, 0) <= 5 * held + len(sessions), served
        for sid, _ in sessions:
            assert http.delete(f"/v1/sessions/{sid}").status_code == 204
        assert http.delete(f"/v1/sessions/{sessions[0][0]}").status_code in (404, 410)


def test_a_full_fleet_refuses_new_sessions_with_retry_after(cluster):
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=cluster.url, timeout=60) as http:
            prompts = [[1, *range(300 + 200 * i, 300 + 200 * i + 200)] for i in range(16)]
            return await asyncio.gather(*(http.post("/v1/sessions", json={"prompt_ids": p}) for p in prompts))

    replies = asyncio.run(burst())
    codes = [r.status_code for r in replies]
    assert 201 in codes and 429 in codes, codes
    refused = next(r for r in replies if r.status_code == 429)
    assert refused.json()["error"]["code"] == "overloaded" and int(refused.headers["retry-after"]) >= 1
    with httpx.Client(base_url=cluster.url, timeout=30) as http:
        for r in replies:
            if r.status_code == 201:
                http.delete(f"/v1/sessions/{r.json()['session_id']}")


def test_a_killed_replica_costs_no_token_and_ray_restarts_it(cluster, tiny_model):
    prompts = [[1, 200 + i, 33, 4, 5] for i in range(4)]
    eos = tuple(tiny_model.args.eos_token_ids)
    want = [generate(tiny_model, p, max_new_tokens=24, eos_ids=eos) for p in prompts]
    backends = [HttpVerifier(cluster.url, max_wait_s=120) for _ in prompts]
    engines = [SpeculativeEngine(TorchDrafter(tiny_model), b, FixedLength(3), draft_ahead=False,
                                 eos_ids=eos) for b in backends]
    streams = [e.generate(p, max_new_tokens=24) for e, p in zip(engines, prompts)]
    got = [[next(s).id] for s in streams]  # every session open, its first token out
    holder = {i: split_session_id(next(iter(b._sessions.values())).server_id)[0] for i, b in enumerate(backends)}
    before = _replicas(cluster.url)
    victim = holder[0]
    os.kill(next(r["pid"] for r in before if r["id"] == victim), signal.SIGKILL)
    for i, stream in enumerate(streams):
        got[i] += [t.id for t in stream]
    assert got == want  # the answers of the undisturbed run
    affected = [i for i in holder if holder[i] == victim]
    assert all(backends[i].resumes >= 1 for i in affected)
    assert all(backends[i].resumes == 0 for i in holder if i not in affected)
    _wait_for_replicas(cluster.url, gone=victim)  # Ray has started a replacement
