"""A burst of several times the verifier's capacity, bounded in count and time, on the shipped target.

Admission control must refuse the excess up front (429/503 with Retry-After and a reason), serve the
sessions it admitted without refusing any of their rounds (and without losing a token: every draft
is the target's own greedy continuation, so every round must accept it all), keep the KV pool within
its budget and the process's memory bounded, and be back to normal once the burst is over.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time

import httpx

from tests.live_server import LiveServer
from wisp_cloud.generate import generate
from tests.results import record

CLIENTS = 40  # the burst: each opens a session at once, then runs ROUNDS verify rounds
ROUNDS, K = 6, 3
SLO = 4.0  # tokens/s asked by every session
KV_BUDGET_MB = 64  # room for every session the backlog bound admits, grown to its full length
MAX_BACKLOG_MS = 600


async def _client(http: httpx.AsyncClient, prompt: list[int], greedy: list[int]) -> dict:
    """One edge: open, then verify blocks drafted from the target's greedy continuation."""
    t0 = time.monotonic()
    opened = await http.post("/v1/sessions", json={"prompt_ids": prompt, "slo_tokens_per_s": SLO})
    if opened.status_code != 201:
        return {"status": opened.status_code, "error": opened.json()["error"],
                "retry_after": opened.headers.get("retry-after"), "ttft_s": time.monotonic() - t0}
    session = opened.json()
    assert session["first_token"] == greedy[0]
    first_at, committed, rounds = time.monotonic(), 1, []
    for round_id in range(1, ROUNDS + 1):
        draft = greedy[committed: committed + K]
        r = await http.post(f"/v1/sessions/{session['session_id']}/verify",
                            json={"position": len(prompt) + committed, "round_id": round_id, "draft_ids": draft})
        rounds.append(r.status_code)
        if r.status_code != 200:
            return {"status": 201, "rounds": rounds, "error": r.json()["error"]}
        reply = r.json()
        assert reply["accepted"] == K and reply["token"] == greedy[committed + K], reply  # lossless
        committed += K + 1
    await http.delete(f"/v1/sessions/{session['session_id']}")
    return {"status": 201, "rounds": rounds, "ttft_s": first_at - t0,
            "rate": (committed - 1) / (time.monotonic() - first_at)}


def _burst(url: str, prompt: list[int], greedy: list[int]) -> list[dict]:
    async def main():
        limits = httpx.Limits(max_connections=CLIENTS + 4)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
            return await asyncio.gather(*(_client(http, prompt, greedy) for _ in range(CLIENTS)))

    return asyncio.run(main())


class _Sampler(threading.Thread):
    """Reads the pool's use and the process's memory every 50 ms while the burst runs."""

    def __init__(self, server: LiveServer) -> None:
        super().__init__(daemon=True)
        self.server, self.kv, self.rss, self.queue = server, [], [], []
        self.done = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.server.url, timeout=10) as http:
            while not self.done.is_set():
                health = http.get("/health").json()
                self.kv.append(health["kv_used_bytes"])
                self.queue.append(health["queue_depth"])
                self.rss.append(self.server.rss_bytes())
                time.sleep(0.05)


def test_a_burst_is_refused_up_front_admitted_sessions_are_served_and_the_server_recovers(
        tmp_path, profile_path, q4_pair, target_model):
    prompt = q4_pair.chat_prompt_ids("Give me three tips for a good night's sleep.")
    greedy = generate(target_model, prompt, max_new_tokens=1 + ROUNDS * (K + 1), eos_ids=())
    with LiveServer("--threads", "1", "--profile", str(profile_path), "--kv-budget-mb", str(KV_BUDGET_MB),
                    "--kv-block-tokens", "16", "--max-backlog-ms", str(MAX_BACKLOG_MS), "--log-level", "warning",
                    log_path=tmp_path / "log") as server:
        budget = KV_BUDGET_MB << 20
        alone = _burst_of_one(server.url, prompt, greedy)  # the undisturbed figure, also warms the server
        rss_before = server.rss_bytes()

        sampler = _Sampler(server)
        sampler.start()
        t0 = time.monotonic()
        results = _burst(server.url, prompt, greedy)
        burst_s = time.monotonic() - t0
        sampler.done.set()
        sampler.join()

        admitted = [r for r in results if r["status"] == 201]
        refused = [r for r in results if r["status"] != 201]
        assert admitted and refused, [r["status"] for r in results]
        for r in refused:
            assert r["status"] in (429, 503), r
            assert r["error"]["code"] in ("overloaded", "kv_full", "too_many_sessions") and r["error"]["message"]
            assert int(r["retry_after"]) >= 1
            assert r["ttft_s"] < 2.0, "a refusal must come at once, not after queueing"
        for r in admitted:
            assert r["rounds"] == [200] * ROUNDS, r  # no admitted session is refused or loses its KV
        rates = sorted(r["rate"] for r in admitted)
        met = sum(rate >= SLO for rate in rates) / len(rates)
        assert met >= 0.5, f"admitted sessions' tokens/s {rates} vs SLO {SLO}"
        assert max(sampler.kv) <= budget, (max(sampler.kv), budget)
        rss_growth = max(sampler.rss) - rss_before
        assert rss_growth <= budget + (96 << 20), f"RSS grew {rss_growth / 2**20:.0f} MiB for a {KV_BUDGET_MB} MiB pool"

        # Recovery: the queue drains, and a new session is admitted and served as before the burst.
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/health").json()["queue_depth"] and time.monotonic() < deadline:
            time.sleep(0.1)
        after = _burst_of_one(server.url, prompt, greedy)
        assert after["status"] == 201 and after["rounds"] == [200] * ROUNDS, after
        assert after["rate"] >= min(SLO, 0.5 * alone["rate"]), (after, alone)
        record("overload", clients=CLIENTS, burst_s=burst_s, admitted=len(admitted), refused=len(refused),
               refusal_codes=sorted({r["error"]["code"] for r in refused}), slo_tokens_per_s=SLO,
               share_at_slo=met, median_tokens_per_s=statistics.median(rates), alone_tokens_per_s=alone["rate"],
               kv_peak_mib=max(sampler.kv) / 2**20, kv_budget_mib=KV_BUDGET_MB, rss_growth_mib=rss_growth / 2**20,
               queue_peak=max(sampler.queue), after_tokens_per_s=after["rate"])
        print(f"\nburst of {CLIENTS} in {burst_s:.1f} s: {len(admitted)} admitted ({met:.0%} at >= {SLO} tok/s, "
              f"median {statistics.median(rates):.1f} tok/s; alone {alone['rate']:.1f}), {len(refused)} refused "
              f"{sorted({r['error']['code'] for r in refused})}; KV peak {max(sampler.kv) / 2**20:.1f} of "
              f"{KV_BUDGET_MB} MiB; RSS +{rss_growth / 2**20:.0f} MiB; queue peak {max(sampler.queue)}; "
              f"after: {after['rate']:.1f} tok/s")


def _burst_of_one(url: str, prompt: list[int], greedy: list[int]) -> dict:
    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=120) as http:
            return await _client(http, prompt, greedy)

    return asyncio.run(main())
