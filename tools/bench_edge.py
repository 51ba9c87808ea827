"""Edge benchmark: the speculation controller against fixed-length and confidence-threshold drafting,
over emulated network round trips, with the real verifier on loopback and the real drafters.

    python tools/bench_edge.py [--rtt 5,20,50,100] [--drafters student,q4] [--prompts 3] [--tokens 40]

For each drafter, RTT and policy it prints tokens/s, wasted drafting time per token (drafting spent
on tokens after the first rejection), tokens per round, and the controller's own time per token
(the stop rule and the bound). The RTT is emulated inside the client: an httpx transport that
sleeps half the RTT before and after each request, so the server sees a real loopback round.
Policies: `wisp` (rejection predictor or its fallback, inside the adaptive bound), `fixed`
(k = --fixed-k), `sled` (confidence 0.5, k_max 8). Greedy, so every policy yields the same text.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.live_server import LiveServer  # noqa: E402
from wisp_edge.agent import EdgeAgent  # noqa: E402
from wisp_edge.client import HttpVerifier  # noqa: E402
from wisp_edge.controller.policy import make_policy  # noqa: E402
from wisp_edge.drafters import load_drafter  # noqa: E402
from wisp_edge.engine import SpeculativeEngine  # noqa: E402
from wisp_edge.settings import EdgeSettings  # noqa: E402


class DelayedTransport(httpx.HTTPTransport):
    """Adds a fixed round trip: half before the request leaves, half before the reply is read."""

    def __init__(self, rtt_ms: float) -> None:
        super().__init__()
        self.half_s = rtt_ms / 2000.0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        time.sleep(self.half_s)
        response = super().handle_request(request)
        time.sleep(self.half_s)
        return response


class TimedPolicy:
    """Wraps a policy to measure its own time (stop decisions, bound updates) per drafted token."""

    def __init__(self, inner) -> None:
        self.inner, self.seconds, self.calls = inner, 0.0, 0

    def max_draft(self) -> int:
        t0 = time.perf_counter()
        k = self.inner.max_draft()
        self.seconds += time.perf_counter() - t0
        return k

    def stop_after(self, index, logits, q) -> bool:
        t0 = time.perf_counter()
        stop = self.inner.stop_after(index, logits, q)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return stop

    def observe(self, *args) -> None:
        t0 = time.perf_counter()
        self.inner.observe(*args)
        self.seconds += time.perf_counter() - t0


def heldout_questions(n: int) -> list[str]:
    path = ROOT / "models" / "student" / "heldout_prompts.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["prompt"] if isinstance(r, dict) else r for r in rows][:n]


def run_config(url: str, drafter, policy_name: str, rtt_ms: float, prompts: list[list[int]], tokens: int,
               fixed_k: int, eos: tuple[int, ...], fingerprint: str) -> dict:
    client = httpx.Client(base_url=url, transport=DelayedTransport(rtt_ms), timeout=60)
    backend = HttpVerifier(url, client=client)
    new = wasted_ms = rounds = 0
    wall = policy_s = 0.0
    texts = []
    for prompt in prompts:
        policy = TimedPolicy(make_policy(policy_name, drafter, k_max=16, draft_length=fixed_k))
        engine = SpeculativeEngine(drafter, backend, policy, eos_ids=eos, vocab_fingerprint=fingerprint)
        ids = [t.id for t in engine.generate(prompt, max_new_tokens=tokens)]
        s = engine.stats
        texts.append(ids)
        new += s.new_tokens
        wall += s.wall_s
        rounds += len(s.rounds)
        wasted_ms += sum(r.wasted_drafting_ms for r in s.rounds)
        policy_s += policy.seconds
    client.close()
    return {"tokens_per_s": round(new / wall, 2), "wasted_ms_per_token": round(wasted_ms / new, 2),
            "tokens_per_round": round(new / max(rounds, 1), 2), "controller_us_per_token": round(policy_s / new * 1e6, 1),
            "tokens": new, "outputs": texts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rtt", default="5,20,50,100", help="emulated round trips, ms")
    parser.add_argument("--drafters", default="student,q4")
    parser.add_argument("--policies", default="wisp,fixed,sled")
    parser.add_argument("--fixed-k", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--server-threads", type=int, default=1, help="torch threads of the verifier")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    rtts = [float(x) for x in args.rtt.split(",")]
    policies = args.policies.split(",")
    report: dict = {"rtt_ms": rtts, "results": {}}
    with LiveServer("--threads", str(args.server_threads), "--log-level", "warning",
                    log_path=Path("/tmp/wisp-bench-edge-server.log")) as server:
        for name in args.drafters.split(","):
            drafter = load_drafter(name, n_threads=1)
            agent = EdgeAgent(EdgeSettings(server=server.url), drafter=drafter)
            info = agent.connect()
            prompts = [agent.chat_ids([{"role": "user", "content": q}]) for q in heldout_questions(args.prompts)]
            eos = tuple(info["eos_token_ids"])
            print(f"\n== drafter {name}: {args.prompts} held-out prompts x {args.tokens} tokens, greedy", flush=True)
            print(f"{'rtt ms':>7} {'policy':>7} {'tok/s':>7} {'wasted ms/tok':>14} {'tok/round':>10} "
                  f"{'controller us/tok':>18}")
            for rtt in rtts:
                reference = None
                for policy in policies:
                    r = run_config(server.url, drafter, policy, rtt, prompts, args.tokens, args.fixed_k, eos,
                                   info["vocab_fingerprint"])
                    outputs = r.pop("outputs")
                    reference = reference or outputs
                    r["same_output_as_first_policy"] = outputs == reference  # greedy: lossless means identical
                    report["results"].setdefault(name, {}).setdefault(str(int(rtt)), {})[policy] = r
                    print(f"{rtt:>7.0f} {policy:>7} {r['tokens_per_s']:>7.2f} {r['wasted_ms_per_token']:>14.2f} "
                          f"{r['tokens_per_round']:>10.2f} {r['controller_us_per_token']:>18.1f}"
                          + ("" if r["same_output_as_first_policy"] else "  OUTPUT DIFFERS"), flush=True)
            agent.close()
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
