"""Multi-turn chat benchmark: what prefix reuse saves when a client resends the whole conversation each
turn (as the app, `wisp-edge chat` and OpenAI clients do).

    python tools/bench_multiturn.py [--drafters q4,student] [--rtt 20,100] [--turns 5] [--tokens 48]
    python tools/bench_multiturn.py --quick          # q4, +20 ms, 3 turns x 8 tokens (the test's run)

It starts `wisp-cloud serve` on loopback (tests/live_server.py) and, per drafter and emulated extra
round trip (wisp_edge/bench.py's delayed transport), chats the same greedy conversation twice: with
the drafter's prefix reuse off (every reset starts from an empty cache, as before) and on. Per turn:
tokens/s, cloud rounds (empty drafts while the drafter prefilled), the drafter's prefill time and
the tokens it prefilled. Greedy, so both runs must give the same answers; the exit status is 1 if
they do not. Writes bench.json and table.md to --out (default docs/results/multiturn).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.live_server import LiveServer  # noqa: E402
from wisp_edge.agent import EdgeAgent  # noqa: E402
from wisp_edge.bench import QUESTIONS, delayed_backend  # noqa: E402
from wisp_edge.controller.policy import make_policy  # noqa: E402
from wisp_edge.settings import EdgeSettings  # noqa: E402

OUT = ROOT / "docs" / "results" / "multiturn"
COLUMNS = ("tokens_per_s", "cloud_rounds", "drafter_prefill_ms", "prefill_tokens")


def chat(agent: EdgeAgent, extra_rtt_ms: float, turns: int, tokens: int, *, reuse: bool) -> list[dict]:
    """One conversation from a cold drafter cache, a row per turn (its answer ids under "output")."""
    drafter, counters = agent.drafter, agent.drafter.counters
    counters.reuse_prefix = reuse
    drafter.reset([])  # nothing cached from the previous run
    backend = delayed_backend(agent.settings, extra_rtt_ms)
    policy = make_policy(agent.settings.policy, drafter, k_max=agent.settings.k_max,
                         draft_length=agent.settings.draft_length)
    messages: list[dict] = []
    rows = []
    try:
        for turn, question in enumerate(QUESTIONS[:turns], 1):
            messages.append({"role": "user", "content": question})
            ids = agent.chat_ids(messages)
            prefilled, reused = counters.prefill_tokens, counters.prefix_reused_tokens
            engine = agent.engine(policy=policy, backend=backend)
            out = [t.id for t in engine.generate(ids, max_new_tokens=tokens)]
            s = engine.stats
            rows.append({"turn": turn, "prompt_tokens": len(ids), "new_tokens": s.new_tokens,
                         "tokens_per_s": round(s.new_tokens / s.wall_s, 2), "rounds": len(s.rounds),
                         "cloud_rounds": s.cloud_rounds, "drafter_prefill_ms": round(s.drafter_prefill_ms, 1),
                         "prefill_tokens": counters.prefill_tokens - prefilled,
                         "reused_tokens": counters.prefix_reused_tokens - reused, "output": out})
            answer = agent.detokenize([t for t in out if t not in agent.eos_ids])
            messages.append({"role": "assistant", "content": answer})
    finally:
        backend.close()
        counters.reuse_prefix = True
    return rows


def compare(agent: EdgeAgent, extra_rtt_ms: float, turns: int, tokens: int) -> dict:
    """The same conversation without and with prefix reuse; `lossless`: the same answers on every turn."""
    off, on = (chat(agent, extra_rtt_ms, turns, tokens, reuse=r) for r in (False, True))
    same = [a.pop("output") == b.pop("output") for a, b in zip(off, on)]
    return {"drafter": agent.drafter.name, "extra_rtt_ms": extra_rtt_ms, "lossless": all(same),
            "turns": [{"turn": a["turn"], "prompt_tokens": a["prompt_tokens"], "same_output": s, "no_reuse": a,
                       "reuse": b} for a, b, s in zip(off, on, same)]}


def table(runs: list[dict]) -> str:
    """Markdown: a row per drafter, round trip and turn; each measure without -> with reuse."""
    head = "| drafter | +rtt ms | turn | prompt tokens | " + " | ".join(f"{c} (off -> on)" for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (4 + len(COLUMNS))]
    for run in runs:
        for t in run["turns"]:
            cells = [f"{t['no_reuse'][c]} -> {t['reuse'][c]}" for c in COLUMNS]
            lines.append(f"| {run['drafter']} | {run['extra_rtt_ms']:g} | {t['turn']} | {t['prompt_tokens']} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drafters", default="q4,student")
    parser.add_argument("--rtt", default="20,100", help="emulated extra round trips, ms")
    parser.add_argument("--turns", type=int, default=5, help=f"at most {len(QUESTIONS)}")
    parser.add_argument("--tokens", type=int, default=48, help="greedy tokens per answer")
    parser.add_argument("--quick", action="store_true", help="q4, +20 ms, 3 turns x 8 tokens")
    parser.add_argument("--server-threads", type=int, default=1, help="torch threads of the verifier")
    parser.add_argument("--profile", help="the verifier's estimator profile (default: it measures or finds one)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.quick:
        args.drafters, args.rtt, args.turns, args.tokens = "q4", "20", 3, 8
    server_args = ["--threads", str(args.server_threads), "--log-level", "warning"]
    server_args += ["--profile", args.profile] if args.profile else []
    runs = []
    with LiveServer(*server_args, log_path=Path("/tmp/wisp-bench-multiturn-server.log")) as server:
        for name in args.drafters.split(","):
            agent = EdgeAgent(EdgeSettings(server=server.url, drafter=name, state_cache=0))
            try:
                agent.connect()
                list(agent.generate(agent.chat_ids([{"role": "user", "content": "Hi"}]), max_new_tokens=4))  # warm-up
                for extra in (float(x) for x in args.rtt.split(",")):
                    runs.append(compare(agent, extra, args.turns, args.tokens))
                    print(table(runs[-1:]), flush=True)
            finally:
                agent.close()
    report = {"command": " ".join(["python tools/bench_multiturn.py", *(argv if argv is not None else sys.argv[1:])]),
              "turns": args.turns, "tokens": args.tokens, "server_threads": args.server_threads,
              "lossless": all(r["lossless"] for r in runs), "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "table.md").write_text(f"`{report['command']}`\n\n" + table(runs))
    return 0 if report["lossless"] else 1


if __name__ == "__main__":
    sys.exit(main())
