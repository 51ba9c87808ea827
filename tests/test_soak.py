"""A bounded soak on the real models: for about a minute (`WISP_SOAK_S`), real edges (the shipped 4-bit
drafter over `HttpVerifier`, a new connection each time) speculate against the shipped target while
other clients open sessions and abandon them (swept by the TTL, evicted by a small KV pool), decode
on the server (streaming, and hanging up mid-stream), and send bad or unauthorised requests.

The server's resident memory and open file descriptors are sampled throughout; after a warm-up
neither may trend upwards. File descriptors must stay flat. Resident memory may step up a little
while the allocator meets new tensor sizes (glibc heap high-water marks, a few MiB at a time), so
the bound is set far below what any per-session leak would cost: one leaked KV cache or session
record per session would add well over a MiB per session, ~100+ MiB over the run. Every speculative
answer must equal the first answer to the same question: nothing lost or duplicated, whatever the churn.
"""

from __future__ import annotations

import os
import statistics
import threading
import time

import httpx

from tests.live_server import LiveServer
from wisp_edge.client import HttpVerifier
from wisp_edge.engine import FixedLength, SpeculativeEngine
from tests.results import record

SOAK_S = float(os.environ.get("WISP_SOAK_S", "60"))
WARMUP_FRACTION = 0.35
RSS_TOLERANCE = 48 * 2**20
KEY = "soak-key"
QUESTIONS = ["What is the capital of France?", "Name a colour of the sky.", "Say hello in Spanish.",
             "What is two plus two?", "Name a fruit that is yellow.", "What do bees make?"]


class _Sampler(threading.Thread):
    def __init__(self, server: LiveServer, every_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.server, self.every_s = server, every_s
        self.samples: list[tuple[float, int, int]] = []  # (t, rss bytes, open fds)
        self.done = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.done.wait(self.every_s):
            self.samples.append((time.monotonic() - t0, self.server.rss_bytes(), self.server.open_fds()))


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope, units of y per unit of x."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


def test_soak_many_sessions_without_growth_in_memory_or_file_descriptors(tmp_path, profile_path, q4_pair):
    prompts = {q: q4_pair.chat_prompt_ids(q) for q in QUESTIONS}
    answers: dict[str, list[int]] = {}
    counts = {"speculative": 0, "abandoned": 0, "centralized": 0, "hung_up": 0, "refused": 0, "compared": 0}
    auth = {"Authorization": f"Bearer {KEY}"}
    env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    with LiveServer("--threads", "1", "--profile", str(profile_path), "--kv-budget-mb", "12",
                    "--kv-block-tokens", "16", "--session-ttl-s", "3", "--log-level", "warning",
                    api_key=KEY, log_path=tmp_path / "log", env=env) as server:
        sampler = _Sampler(server)
        sampler.start()
        deadline = time.monotonic() + SOAK_S
        i = 0
        while time.monotonic() < deadline:
            question = QUESTIONS[i % len(QUESTIONS)]
            with HttpVerifier(server.url, api_key=KEY, max_wait_s=60) as backend:
                engine = SpeculativeEngine(q4_pair.drafter, backend, FixedLength(4), eos_ids=q4_pair.eos_ids,
                                           vocab_fingerprint=q4_pair.vocab_fingerprint)
                got = [t.id for t in engine.generate(prompts[question], max_new_tokens=12)]
            counts["speculative"] += 1
            if question in answers:
                assert got == answers[question], question
                counts["compared"] += 1
            answers.setdefault(question, got)
            with httpx.Client(base_url=server.url, headers=auth, timeout=60) as http:
                if i % 2 == 0:  # opened and never closed: the TTL or the KV pool must reclaim it
                    r = http.post("/v1/sessions", json={"prompt_ids": prompts[question][: 20 + i % 20]})
                    assert r.status_code in (201, 429, 503), r.text
                    counts["abandoned"] += 1
                if i % 3 == 1:
                    r = http.post("/v1/completions", json={"prompt": question, "max_tokens": 6, "temperature": 0.7,
                                                           "stream": i % 2 == 0})
                    assert r.status_code == 200, r.text
                    counts["centralized"] += 1
                if i % 4 == 3:  # a client that hangs up after the first chunk of a stream
                    with http.stream("POST", "/v1/chat/completions",
                                     json={"messages": [{"role": "user", "content": question}], "max_tokens": 40,
                                           "stream": True}) as stream:
                        next(stream.iter_lines())
                    counts["hung_up"] += 1
                if i % 5 == 4:
                    bad = [http.post("/v1/sessions", json={"prompt_ids": [-1]}),
                           http.post("/v1/sessions/nope/verify", json={"position": 1, "round_id": 0, "draft_ids": []}),
                           httpx.get(f"{server.url}/v1/models"),
                           http.post("/v1/sessions", content=b"{", headers={"content-type": "application/json"})]
                    assert [r.status_code for r in bad] == [422, 404, 401, 422]
                    counts["refused"] += len(bad)
            i += 1
        sampler.done.set()
        sampler.join()
        samples = sampler.samples
        health = httpx.get(f"{server.url}/health", headers=auth).json()

    steady = samples[int(len(samples) * WARMUP_FRACTION):]
    assert len(steady) >= 10, samples
    span_s = steady[-1][0] - steady[0][0]
    rss_trend = _slope([(t, rss) for t, rss, _ in steady]) * span_s
    fd_trend = _slope([(t, fds) for t, _, fds in steady]) * span_s
    third = max(1, len(steady) // 3)
    rss_first = statistics.median(rss for _, rss, _ in steady[:third])
    rss_last = statistics.median(rss for _, rss, _ in steady[-third:])
    fds_first = statistics.median(fds for *_, fds in steady[:third])
    fds_last = statistics.median(fds for *_, fds in steady[-third:])
    sessions = sum(counts[k] for k in ("speculative", "abandoned", "centralized", "hung_up"))
    report = (f"soak {SOAK_S:.0f} s, {i} iterations, {sessions} sessions {counts}; after warm-up "
              f"({steady[0][0]:.0f} s) RSS {rss_first / 2**20:.1f} -> {rss_last / 2**20:.1f} MiB (trend "
              f"{rss_trend / 2**20:+.1f} MiB over {span_s:.0f} s), fds {fds_first:.0f} -> {fds_last:.0f} (trend "
              f"{fd_trend:+.1f}); server: {health['sessions']} sessions open, {health['kv_evictions']} evictions")
    print("\n" + report)
    record("soak", seconds=SOAK_S, iterations=i, sessions=sessions, counts=dict(counts),
           rss_first_mib=rss_first / 2**20, rss_last_mib=rss_last / 2**20, rss_trend_mib=rss_trend / 2**20,
           fds_first=fds_first, fds_last=fds_last, server_sessions_open=health["sessions"],
           kv_evictions=health["kv_evictions"])
    print("samples (s, MiB, fds):", [(round(t), round(rss / 2**20, 1), fds) for t, rss, fds in samples[::5]])
    assert counts["compared"] >= len(QUESTIONS), report
    assert rss_trend < RSS_TOLERANCE and rss_last - rss_first < RSS_TOLERANCE, report
    assert fd_trend < 3 and fds_last - fds_first <= 2, report
