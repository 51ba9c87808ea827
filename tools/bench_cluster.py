"""What serving through Ray Serve costs and buys: `wisp-cloud serve --replicas 2` against the plain
single-process server, both started by this script on loopback, measured in one run.

    python tools/bench_cluster.py [--quick] [--out docs/results/cluster/bench.json]

Sections:
  overhead    one session's verify rounds (3 drafted tokens) alternating between the direct server and the
              cluster, on a tiny random model with the target's vocabulary, so the model's time is small and
              equal on both: overhead = cluster round trip - direct round trip, p50 and p99; every round
              names its session in the x-session-id header, as the edge client does
  throughput  the shipped target, one torch thread per replica: CLIENTS sessions in a closed loop of verify
              rounds (4 drafted tokens) for SECONDS against the single-process server, against two plain
              single-process servers with half the clients each (no Ray: the machine's ceiling for two
              verifiers), and against 2 replicas, twice each, alternating; aggregate rounds per second
              and their ratios to the single process
  failover    in the 2-replica cluster, sessions mid-answer through the edge's `HttpVerifier`; one replica
              SIGKILLed: the time from the kill to each affected session's next committed token (its
              client hears 404, reopens the session from its committed tokens elsewhere, and retries)
Each run writes its numbers to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from tests.live_server import LiveServer, tiny_checkpoint  # noqa: E402
from wisp_cloud.cluster.placement import split_session_id  # noqa: E402
from wisp_cloud.estimator import TimeEstimator  # noqa: E402
from wisp_edge.client import SESSION_HEADER, HttpVerifier  # noqa: E402
from wisp_edge.wire.protocol import SessionStart, VerifyBlock, VerifyRequest  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def start(args: list[str], log: Path, replicas: int) -> LiveServer:
    extra = ["--replicas", str(replicas)] if replicas > 1 else []
    return LiveServer(*args, *extra, "--threads", "1", "--log-level", "warning", log_path=log).start(timeout_s=300)


# --- overhead ------------------------------------------------------------------------------------------

def open_session(http: httpx.Client, prompt: list[int]) -> tuple[str, int]:
    reply = http.post("/v1/sessions", json={"prompt_ids": prompt})
    reply.raise_for_status()
    return reply.json()["session_id"], reply.json()["position"]


def overhead(direct: LiveServer, cluster: LiveServer, rounds: int) -> dict:
    times: dict[str, list[float]] = {"direct": [], "cluster": []}
    with httpx.Client(base_url=direct.url, timeout=30) as a, httpx.Client(base_url=cluster.url, timeout=30) as b:
        clients = {"direct": a, "cluster": b}
        state = {name: list(open_session(http, [1, 17, 42, 9])) for name, http in clients.items()}
        for round_id in range(rounds + 20):
            for name, http in clients.items():
                sid, position = state[name]
                if position > 200:  # the tiny model's context is 256: a fresh session now and then
                    state[name] = list(open_session(http, [1, 17, 42, 9]))
                    sid, position = state[name]
                t0 = time.perf_counter()
                reply = http.post(f"/v1/sessions/{sid}/verify", headers={SESSION_HEADER: sid},
                                  json={"position": position, "round_id": round_id, "draft_ids": [5, 6, 7]})
                elapsed = (time.perf_counter() - t0) * 1000
                reply.raise_for_status()
                state[name][1] = reply.json()["position"]
                if round_id >= 20:  # warm-up done
                    times[name].append(elapsed)
    out = {"rounds": rounds}
    for q in (50, 99):
        d, c = percentile(times["direct"], q), percentile(times["cluster"], q)
        out[f"p{q}"] = {"direct_ms": round(d, 3), "cluster_ms": round(c, 3), "overhead_ms": round(c - d, 3)}
    return out


# --- throughput ----------------------------------------------------------------------------------------

async def closed_loop(url: str, clients: int, seconds: float) -> float:
    """Verify rounds per second of `clients` sessions, each sending its next round as soon as one returns."""
    async with httpx.AsyncClient(base_url=url, timeout=60,
                                 limits=httpx.Limits(max_connections=clients + 4)) as http:
        async def client(i: int) -> int:
            reply = await http.post("/v1/sessions", json={"prompt_ids": [1, *range(100 + 40 * i, 164 + 40 * i)]})
            reply.raise_for_status()
            sid, position = reply.json()["session_id"], reply.json()["position"]
            done, round_id = 0, 0
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                reply = await http.post(f"/v1/sessions/{sid}/verify", headers={SESSION_HEADER: sid}, json={
                    "position": position, "round_id": round_id, "draft_ids": [11, 12, 13, 14]})
                reply.raise_for_status()
                position, round_id, done = reply.json()["position"], round_id + 1, done + 1
            await http.delete(f"/v1/sessions/{sid}")
            return done

        t0 = time.monotonic()
        counts = await asyncio.gather(*(client(i) for i in range(clients)))
        return sum(counts) / (time.monotonic() - t0)


def two_plain_processes(work: Path, clients: int, seconds: float) -> float:
    """The machine's own ceiling for two verifiers: two single-process servers, no Ray, half the clients
    each, driven at the same time (what two replicas could reach if routing cost nothing)."""
    servers = [start(["--kv-budget-mb", "512"], work / f"plain-{i}.log", 1) for i in range(2)]
    half = [clients // 2, clients - clients // 2]

    async def both(duration: float) -> float:
        return sum(await asyncio.gather(*(closed_loop(s.url, n, duration) for s, n in zip(servers, half))))

    try:
        asyncio.run(both(2.0))  # warm-up
        return asyncio.run(both(seconds))
    finally:
        for server in servers:
            server.stop()


# --- failover ------------------------------------------------------------------------------------------

def failover(cluster: LiveServer, sessions: int, rounds_after: int) -> dict:
    """Sessions driven through the edge's HttpVerifier; kill the replica holding session 0 between rounds."""
    backends = [HttpVerifier(cluster.url, max_wait_s=120) for _ in range(sessions)]
    state = []
    for i, backend in enumerate(backends):
        prompt = [1, *range(500 + 30 * i, 530 + 30 * i)]
        started = backend.start_session(SessionStart(prompt_ids=prompt))
        state.append({"id": started.session_id, "committed": prompt + [started.first_token], "round": 0})

    def one_round(i: int) -> float:
        s, backend = state[i], backends[i]
        block = VerifyBlock(position=len(s["committed"]), draft_ids=[21, 22, 23], round_id=s["round"])
        reply = backend.verify(VerifyRequest(s["id"], block, committed=list(s["committed"])))
        s["committed"] += block.draft_ids[:reply.accepted] + [reply.token]
        s["round"] += 1
        return time.monotonic()

    for i in range(sessions):
        one_round(i)
    holders = {i: split_session_id(backends[i]._sessions[state[i]["id"]].server_id)[0] for i in range(sessions)}
    health = httpx.get(f"{cluster.url}/health", timeout=30).json()
    victim = holders[0]
    pid = next(r["pid"] for r in health["replicas"] if r["id"] == victim)
    affected = [i for i in holders if holders[i] == victim]
    results: dict[int, float] = {}
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)

    def drive(i: int) -> None:
        results[i] = one_round(i) - killed_at
        for _ in range(rounds_after):
            one_round(i)

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:  # Ray brings a replacement up
        running = [r for r in httpx.get(f"{cluster.url}/health", timeout=30).json()["replicas"]
                   if r["state"] == "running" and r["id"] != victim]
        if len(running) == 2:
            break
        time.sleep(0.5)
    replaced_s = time.monotonic() - killed_at
    return {"sessions": sessions, "affected": len(affected),
            "kill_to_next_token_ms": {"affected": [round(results[i] * 1000, 1) for i in affected],
                                      "unaffected": [round(results[i] * 1000, 1) for i in results
                                                     if i not in affected]},
            "resumes": [b.resumes for b in backends], "replacement_running_after_s": round(replaced_s, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, shorter runs")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "cluster" / "bench.json")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=None)
    opts = parser.parse_args()
    rounds = 200 if opts.quick else 1000
    seconds = opts.seconds or (8.0 if opts.quick else 20.0)
    work = Path(tempfile.mkdtemp(prefix="wisp-bench-cluster-"))
    result: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                    "command": " ".join(["python", "tools/bench_cluster.py", *sys.argv[1:]])}

    tiny = tiny_checkpoint(work / "tiny", max_seq_len=256)
    profile = work / "tiny-profile.json"
    TimeEstimator((1.0, 0.01, 0.0, 0.0, 0.0), metadata={"device": "cpu", "dtype": "float32"}).save(profile)
    tiny_args = ["--model", str(tiny), "--profile", str(profile), "--kv-budget-mb", "64"]
    direct = start(tiny_args, work / "direct.log", 1)
    try:
        cluster = start(tiny_args, work / "cluster-tiny.log", 2)
        try:
            result["overhead"] = overhead(direct, cluster, rounds)
            print("overhead", json.dumps(result["overhead"]), flush=True)
        finally:
            cluster.stop()
    finally:
        direct.stop()

    rates: dict[str, list[float]] = {"1_process": [], "2_processes": [], "2_replicas": []}
    for _ in range(2):
        for name in rates:
            if name == "2_processes":
                rates[name].append(two_plain_processes(work, opts.clients, seconds))
                print(name, round(rates[name][-1], 1), "rounds/s", flush=True)
                continue
            server = start(["--kv-budget-mb", "512"], work / f"{name}.log", 2 if name == "2_replicas" else 1)
            try:
                asyncio.run(closed_loop(server.url, opts.clients, 2.0))  # warm-up
                rates[name].append(asyncio.run(closed_loop(server.url, opts.clients, seconds)))
                print(name, round(rates[name][-1], 1), "rounds/s", flush=True)
                if name == "2_replicas" and "failover" not in result:
                    result["failover"] = failover(server, 4, 3)
                    print("failover", json.dumps(result["failover"]), flush=True)
            finally:
                server.stop()
    median = {name: statistics.median(values) for name, values in rates.items()}
    result["throughput"] = {"model": "SmolLM2-135M-Instruct (shipped target), float32, 1 torch thread per replica",
                            "clients": opts.clients, "seconds": seconds, "draft_tokens": 4,
                            "rounds_per_s": {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
                            "ratio_2_over_1": round(median["2_replicas"] / median["1_process"], 2),
                            "ceiling_2_processes_over_1": round(median["2_processes"] / median["1_process"], 2)}
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
