"""Faults between a real edge (the shipped 4-bit drafter, `HttpVerifier`) and a real verifier (the shipped
target): whatever the network or the server does, the edge's final text equals the undisturbed run's,
and the edge reports what it survived (`engine.stats.faults`).

- the network, through a loopback proxy (`tests/fault_proxy.py`): a slow link, requests cut before the
  server sees them, replies cut after it did the work, a stalled link longer than the client's
  timeout, refused connections;
- the session's KV evicted under memory pressure in the middle of the answer;
- the verifier killed with SIGKILL in the middle of the answer and started again on the same port.
(`tests/test_server_resilience.py` holds the gentler versions: a clean restart, a lone eviction.)
"""

from __future__ import annotations

import threading
import time

import httpx

from tests.fault_proxy import FaultProxy
from tests.live_server import LiveServer
from wisp_edge.client import HttpVerifier
from wisp_edge.engine import FixedLength, SpeculativeEngine
from tests.results import record

QUESTION = "Explain how a rainbow forms, step by step."
MAX_TOKENS = 56
SURVIVED: dict[str, int] = {}  # faults injected and survived, for the README (`-s` prints them)


def _engine(url: str, pair, **client) -> tuple[SpeculativeEngine, HttpVerifier]:
    backend = HttpVerifier(url, **client)
    return SpeculativeEngine(pair.drafter, backend, FixedLength(3), eos_ids=pair.eos_ids,
                             vocab_fingerprint=pair.vocab_fingerprint), backend


def _undisturbed(url: str, pair, prompt: list[int]) -> list[int]:
    engine, backend = _engine(url, pair)
    with backend:
        ids = [t.id for t in engine.generate(prompt, max_new_tokens=MAX_TOKENS)]
    assert not any(engine.stats.faults.values()), engine.stats.faults
    return ids


def _later(seconds: float, action) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(seconds), action()), daemon=True)
    thread.start()
    return thread


def test_network_faults_and_an_eviction_cost_latency_never_tokens(tmp_path, profile_path, q4_pair,
                                                                  target_model):
    bytes_per_token = target_model.kv_bytes_per_token
    # --kv-keep-active-s 0: a session between two rounds may be evicted for a newcomer, so one can be forced.
    with LiveServer("--threads", "1", "--profile", str(profile_path), "--kv-budget-mb", "8", "--kv-block-tokens",
                    "16", "--kv-keep-active-s", "0", "--log-level", "warning", log_path=tmp_path / "log") as server, \
            FaultProxy(server.port) as proxy:
        prompt = q4_pair.chat_prompt_ids(QUESTION)
        want = _undisturbed(server.url, q4_pair, prompt)
        assert len(want) == MAX_TOKENS  # long enough for every fault below

        def evict() -> None:
            """Another client's prompt needs more KV than is free: the idle edge session is evicted."""
            health = httpx.get(f"{server.url}/health").json()
            free_tokens = (health["kv_budget_bytes"] - health["kv_used_bytes"]) // bytes_per_token
            with httpx.Client(base_url=server.url, timeout=60) as http:
                r = http.post("/v1/sessions", json={"prompt_ids": [1] + [28] * int(free_tokens + 8)})
                assert r.status_code == 201, r.text
                http.delete(f"/v1/sessions/{r.json()['session_id']}")

        # Injected after the given round: (name, action). A delay slows rounds; a stall outlasts the
        # client's 2 s timeout; refusals last 1 s; cuts hit one connection each.
        faults = {1: ("delay", lambda: proxy.delay(0.4)),
                  2: ("cut request", lambda: (proxy.release(), proxy.cut_requests(1))),
                  3: ("cut reply", lambda: proxy.cut_replies(1)),
                  4: ("stall", lambda: (proxy.stall(), _later(3.0, proxy.release))),
                  6: ("eviction", evict),
                  7: ("refused connections", lambda: (proxy.refuse(True), _later(1.0, proxy.release))),
                  8: ("cut reply", lambda: proxy.cut_replies(1))}
        engine, backend = _engine(proxy.url, q4_pair, timeout_s=2.0, backoff_s=0.1, max_wait_s=60)
        got, injected = [], []
        with backend:
            for token in engine.generate(prompt, max_new_tokens=MAX_TOKENS):
                got.append(token.id)
                done = len(engine.stats.rounds)
                if done in faults and token.round == done:
                    name, action = faults.pop(done)
                    action()
                    injected.append(name)
        proxy.release()
        assert q4_pair.drafter.detokenize(got) == q4_pair.drafter.detokenize(want)
        assert got == want
        assert not faults, f"the answer ended before faults {faults} were injected"
        faults_seen = engine.stats.faults
        assert faults_seen["retries"] >= 4, faults_seen  # cut request, cut reply x2, stall, refusals
        assert faults_seen["replayed_rounds"] >= 2, faults_seen  # the cut replies' rounds were not redone
        assert faults_seen["resumes"] >= 1, faults_seen  # the eviction
        counts = proxy.counts
        assert counts["cut_requests"] == 1 and counts["cut_replies"] == 2, counts
        assert counts["stalled_chunks"] >= 1 and counts["delayed_chunks"] >= 2 and counts["refused"] >= 1, counts
        assert engine.stats.summary()["faults"] == faults_seen  # what `wisp-edge generate --json` prints
        SURVIVED.update({f"proxy {k}": v for k, v in counts.items() if k != "connections"})
        SURVIVED["eviction"] = 1
        print(f"\ninjected {injected}; edge reports {faults_seen}; proxy {dict(counts)}")
        record("faults", network={"injected": injected, "edge_reports": faults_seen, "proxy": dict(counts),
                                  "identical": True})


def test_sigkill_mid_generation_then_restart_on_the_same_port(tmp_path, profile_path, q4_pair):
    server = LiveServer("--threads", "1", "--profile", str(profile_path), "--log-level", "warning",
                        log_path=tmp_path / "log").start()
    try:
        prompt = q4_pair.chat_prompt_ids(QUESTION)
        want = _undisturbed(server.url, q4_pair, prompt)
        engine, backend = _engine(server.url, q4_pair, backoff_s=0.2, max_wait_s=120)
        got: list[int] = []
        failure: list[BaseException] = []

        def run() -> None:
            try:
                got.extend(t.id for t in engine.generate(prompt, max_new_tokens=MAX_TOKENS))
            except BaseException as exc:  # noqa: BLE001  (re-raised by the test below)
                failure.append(exc)

        edge = threading.Thread(target=run)
        edge.start()
        deadline = time.monotonic() + 120
        while len(engine.stats.rounds) < 3 and edge.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.03)  # most likely inside a round: drafting or in flight
        port = server.port
        server.kill()
        killed_after = len(engine.stats.rounds)
        time.sleep(1.0)  # the edge retries into a closed port meanwhile
        server.start()
        assert server.port == port
        edge.join(180)
        backend.close()
        assert not failure, failure
        assert killed_after < len(engine.stats.rounds), "the kill came after the answer ended"
        assert got == want
        assert q4_pair.drafter.detokenize(got) == q4_pair.drafter.detokenize(want)
        faults = engine.stats.faults
        assert faults["retries"] >= 1 and faults["resumes"] == 1, faults
        SURVIVED["sigkill + restart"] = 1
        print(f"\nSIGKILL after round {killed_after}; edge reports {faults}; all faults survived: {SURVIVED}")
        record("faults", sigkill={"killed_after_round": killed_after, "edge_reports": dict(faults),
                                  "identical": True})
    finally:
        server.stop()
