"""Real load test: the verifier on loopback and N real edge engines, WISP vs SLED vs centralized, one run.

    python tools/load_test.py [--devices 1,2,4,6] [--modes wisp,sled,centralized] [--rtt 20]
                              [--slo 4] [--tokens 32] [--requests 2] [--prompts public|chat]
                              [--server-cpus 0 --edge-cpus 1] [--no-draft-ahead] [--json-out FILE]

Every device is a thread with its own drafter (llama.cpp, one thread) and its own HTTP connection,
whose round trips are lengthened by `--rtt` ms (`wisp_edge.bench.DelayedTransport`). It sends
`--requests` chat questions back to back (closed loop), each asking for `--tokens` greedy tokens at
`--slo` tokens/s. The questions are the public sets' (MT-Bench and HumanEval, interleaved by category,
`tools/prompt_sets.py`); `--prompts chat` uses the short home-made chat questions instead. `--server-cpus`
and `--edge-cpus` pin the verifier and the devices to disjoint cores (tools/validate.py runs it so, to
compare it with the simulator). Modes:

- `wisp`: the speculation controller (`--policy wisp` on the edge) against `wisp-cloud serve --policy wisp`;
- `sled`: SLED's confidence rule (0.5, k_max 8) against FCFS batching (`--policy fcfs`);
- `centralized`: no drafting; the device streams `/v1/completions` and the server decodes every token,
  continuously batched (`--policy fcfs`).

Per mode and device count it prints goodput (tokens/s of requests that met the SLO), SLO attainment,
TTFT p50/p95, mean tokens per verify round and wasted drafting time per token. On this machine the
drafters share the verifier's two cores, so "more devices" also means "a slower server": the run
shows where speculation stops paying here, not what a GPU verifier with real edge devices does
(that is the simulator's job, `tools/simulate.py`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.live_server import LiveServer  # noqa: E402
from wisp_edge.agent import EdgeAgent  # noqa: E402
from wisp_edge.bench import QUESTIONS, delayed_backend, delayed_client  # noqa: E402
from wisp_edge.controller.policy import make_policy  # noqa: E402
from wisp_edge.drafters import load_drafter  # noqa: E402
from wisp_edge.engine import SpeculativeEngine  # noqa: E402
from wisp_edge.settings import EdgeSettings  # noqa: E402

SERVER_POLICY = {"wisp": "wisp", "sled": "fcfs", "centralized": "fcfs"}
EDGE_POLICY = {"wisp": "wisp", "sled": "sled"}


@dataclass
class RequestResult:
    tokens: int
    ttft_s: float
    total_s: float
    rounds: int = 0
    wasted_ms: float = 0.0
    prompt_tokens: int = 0
    started: float = 0.0  # perf_counter at the request's start
    stats: dict | None = None  # the engine's GenerationStats.summary() (speculative modes)

    def rate(self) -> float:
        """Decoding rate after the first token, the quantity an SLO in tokens/s bounds."""
        return (self.tokens - 1) / max(self.total_s - self.ttft_s, 1e-9) if self.tokens > 1 else 0.0


def speculative_device(settings: EdgeSettings, drafter, mode: str, prompts: list[list[int]], tokens: int,
                       rtt_ms: float, eos: tuple[int, ...], fingerprint: str, out: list[RequestResult],
                       draft_ahead: bool = True) -> None:
    backend = delayed_backend(settings, rtt_ms)
    policy = make_policy(EDGE_POLICY[mode], drafter)  # kept across requests, as an agent keeps it
    try:
        for prompt in prompts:
            engine = SpeculativeEngine(drafter, backend, policy, eos_ids=eos, vocab_fingerprint=fingerprint,
                                       slo_tokens_per_s=settings.slo_tokens_per_s, draft_ahead=draft_ahead)
            t0, ttft, n = time.perf_counter(), None, 0
            for _ in engine.generate(prompt, max_new_tokens=tokens):
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                n += 1
            s = engine.stats
            out.append(RequestResult(n, ttft or 0.0, time.perf_counter() - t0, len(s.rounds),
                                     sum(r.wasted_drafting_ms for r in s.rounds), len(prompt), t0, s.summary()))
    finally:
        backend.close()


def centralized_device(settings: EdgeSettings, prompts: list[list[int]], tokens: int, rtt_ms: float,
                       out: list[RequestResult]) -> None:
    with delayed_client(settings, rtt_ms) as http:
        for prompt in prompts:
            body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
                    "slo_tokens_per_s": settings.slo_tokens_per_s}
            t0, ttft, n = time.perf_counter(), None, 0
            while n == 0:
                with http.stream("POST", "/v1/completions", json=body) as reply:
                    if reply.status_code in (429, 503):  # overloaded: wait as told, as the edge client does
                        time.sleep(float(reply.headers.get("Retry-After", "1")))
                        continue
                    reply.raise_for_status()
                    for line in reply.iter_lines():
                        if line.startswith("data: {"):  # one event per generated token
                            ttft = ttft if ttft is not None else time.perf_counter() - t0
                            n += 1
            out.append(RequestResult(n, ttft or 0.0, time.perf_counter() - t0, prompt_tokens=len(prompt), started=t0))


def run(url: str, mode: str, devices: int, args, prompts: list[list[int]], info: dict, offset: int = 0) -> dict:
    """One mode at one device count: device d's request i asks prompts[(offset + d * requests + i) % len(prompts)]
    (every request its own prompt)."""
    settings = EdgeSettings(server=url, drafter=args.drafter, slo_tokens_per_s=args.slo, max_wait_s=120)
    results: list[list[RequestResult]] = [[] for _ in range(devices)]
    threads = []
    # Drafters load here, one at a time: llama.cpp's quiet loading swaps the process's stdout and
    # stderr file descriptors, and loads in parallel threads can leave them pointing at /dev/null.
    drafters = [load_drafter(settings.drafter, n_threads=1) for _ in range(devices)] if mode != "centralized" else []
    for d in range(devices):
        mine = [prompts[(offset + d * args.requests + i) % len(prompts)] for i in range(args.requests)]
        if mode == "centralized":
            target, fn_args = centralized_device, (settings, mine, args.tokens, args.rtt, results[d])
        else:
            target, fn_args = speculative_device, (settings, drafters[d], mode, mine, args.tokens, args.rtt,
                                                   tuple(info["eos_token_ids"]), info["vocab_fingerprint"], results[d],
                                                   getattr(args, "draft_ahead", True))
        threads.append(threading.Thread(target=target, args=fn_args, daemon=True))
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    done = [r for device in results for r in device]
    met = [r for r in done if r.rate() >= args.slo]
    tokens = sum(r.tokens for r in done)
    rounds = sum(r.rounds for r in done)
    ttfts = sorted(r.ttft_s for r in done)
    return {"mode": mode, "devices": devices, "requests": len(done), "prompt_offset": offset, "wall_s": round(wall, 2),
            "throughput_tok_s": round(tokens / wall, 2), "goodput_tok_s": round(sum(r.tokens for r in met) / wall, 2),
            "slo_attainment": round(len(met) / len(done), 3),
            "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 1),
            "ttft_p95_ms": round(ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))] * 1000, 1),
            "mean_rate_tok_s": round(statistics.mean(r.rate() for r in done), 2),
            "tokens_per_round": round(tokens / rounds, 2) if rounds else None,
            "wasted_ms_per_token": round(sum(r.wasted_ms for r in done) / tokens, 2) if rounds else None,
            "requests_detail": [{"device": d, "k": k, "prompt_tokens": r.prompt_tokens, "tokens": r.tokens,
                                 "ttft_s": round(r.ttft_s, 4), "total_s": round(r.total_s, 4),
                                 "start_s": round(r.started - t0, 4), "rate": round(r.rate(), 3),
                                 "met": r.rate() >= args.slo, "rounds": r.rounds, "engine": r.stats}
                                for d, device in enumerate(results) for k, r in enumerate(device)]}


def public_questions(n: int = 0) -> list[str]:
    """The public sets' prompts, categories interleaved (one of each in turn), so any first few mix them."""
    from tools.prompt_sets import load

    by_category: dict[str, list[str]] = {}
    for p in load():
        by_category.setdefault(p.category, []).append(p.text)
    order = [texts[i] for i in range(max(map(len, by_category.values())))
             for texts in by_category.values() if i < len(texts)]
    return order[:n] if n else order


def pin_this_process(cpus: set[int]) -> None:
    """Every thread of this process (and those it starts later) on `cpus`."""
    import os

    for task in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(task), cpus)


def cpus(text: str | None) -> set[int] | None:
    return {int(c) for c in text.split(",")} if text else None


def serve_and_run(args, server_policy: str, modes: list[str], counts: list[int], on_ready=None):
    """Start the verifier with `server_policy`, then yield one row per mode and device count
    (`on_ready(url, prompts)` first, if given: tools/validate.py measures the link and the drafter there)."""
    if args.edge_cpus:
        pin_this_process(cpus(args.edge_cpus))
    extra = ["--profile", str(args.profile)] if args.profile else []
    with LiveServer("--threads", str(args.server_threads), "--policy", server_policy, "--log-level", "warning",
                    *extra, log_path=Path(f"/tmp/wisp-load-test-{server_policy}.log"),
                    cpus=cpus(args.server_cpus)) as server:
        agent = EdgeAgent(EdgeSettings(server=server.url, drafter=args.drafter))
        info = agent.connect()
        questions = public_questions() if args.prompts == "public" else list(QUESTIONS)
        prompts = [agent.chat_ids([{"role": "user", "content": q}]) for q in questions]
        agent.close()
        if on_ready is not None:
            on_ready(server.url, prompts)
        offset = 0
        for mode in modes:
            for n in counts:
                yield run(server.url, mode, n, args, prompts, info, offset)
                if getattr(args, "fresh_prompts", False):  # no prompt twice: the prefix cache would serve it
                    offset += n * args.requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="1,2,4,6", help="device counts to run")
    parser.add_argument("--modes", default="wisp,sled,centralized")
    parser.add_argument("--rtt", type=float, default=20.0, help="emulated network round trip per request, ms")
    parser.add_argument("--slo", type=float, default=4.0, help="tokens/s every request asks for")
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per request")
    parser.add_argument("--requests", type=int, default=2, help="requests per device, back to back")
    parser.add_argument("--drafter", default="q4")
    parser.add_argument("--server-threads", type=int, default=1, help="torch threads of the verifier")
    parser.add_argument("--prompts", choices=["public", "chat"], default="public",
                        help="public: MT-Bench + HumanEval (tools/prompt_sets.py); chat: short home-made questions")
    parser.add_argument("--draft-ahead", action=argparse.BooleanOptionalAction, default=True,
                        help="the edge drafts the next block while one is verified (the engine's default)")
    parser.add_argument("--server-cpus", help="pin the verifier to these cores (comma-separated)")
    parser.add_argument("--edge-cpus", help="pin the devices (this process) to these cores")
    parser.add_argument("--profile", type=Path, help="the verifier's estimator profile (measured there if missing)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    counts = [int(x) for x in args.devices.split(",")]
    modes = args.modes.split(",")
    rows = []
    print(f"{'mode':>12} {'devices':>7} {'goodput':>8} {'thrput':>7} {'SLO met':>8} {'TTFT p50':>9} {'TTFT p95':>9} "
          f"{'rate':>6} {'tok/round':>9} {'wasted ms/tok':>13}", flush=True)
    for server_policy in dict.fromkeys(SERVER_POLICY[m] for m in modes):
        for r in serve_and_run(args, server_policy, [m for m in modes if SERVER_POLICY[m] == server_policy], counts):
            rows.append(r)
            print(f"{r['mode']:>12} {r['devices']:>7} {r['goodput_tok_s']:>8.2f} {r['throughput_tok_s']:>7.2f} "
                  f"{r['slo_attainment']:>8.0%} {r['ttft_p50_ms']:>9.0f} {r['ttft_p95_ms']:>9.0f} "
                  f"{r['mean_rate_tok_s']:>6.2f} {str(r['tokens_per_round'] or '-'):>9} "
                  f"{str(r['wasted_ms_per_token'] if r['wasted_ms_per_token'] is not None else '-'):>13}", flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v
                                                      for k, v in vars(args).items() if k != "json_out"},
                                             "prompt_set": "MT-Bench (80) + HumanEval (164)" if args.prompts == "public"
                                             else "home-made chat questions", "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
