"""Edge benchmark: the speculation controller against fixed-length and confidence-threshold drafting,
over emulated network round trips, with the real verifier on loopback and the real drafters.

    python tools/bench_edge.py [--rtt 5,20,50,100] [--drafters student,q4] [--prompts 3] [--tokens 40]

It starts `wisp-cloud serve` on a free loopback port, then runs `wisp-edge bench` (`wisp_edge/bench.py`)
for each drafter: per emulated RTT and policy, tokens/s, wasted drafting time per token, tokens per
round and the controller's own time per token. Policies: `wisp` (rejection predictor inside the
adaptive bound), `fixed` (k = --fixed-k), `sled` (confidence 0.5, k_max 8), and on request `predictor`
(the rejection predictor alone, k_max 8: the stop rule on `sled`'s footing) and `oracle`
(`--policies wisp,sled,oracle`): a stop rule with hindsight that drafts exactly the tokens the target will
accept, the ceiling any stop rule could reach. Greedy: every policy must give the same tokens; the exit
status is 1 if one does not.
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
from wisp_edge.bench import bench  # noqa: E402
from wisp_edge.settings import EdgeSettings  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rtt", default="5,20,50,100", help="emulated round trips, ms")
    parser.add_argument("--drafters", default="student,q4")
    parser.add_argument("--policies", default="wisp,fixed,sled")
    parser.add_argument("--fixed-k", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per policy and round trip, in rotated order; rows give the median")
    parser.add_argument("--server-threads", type=int, default=1, help="torch threads of the verifier")
    parser.add_argument("--compare-draft-ahead", choices=("on", "off", "both"), default="on",
                        help="drafting during verification: on (default), off, or both side by side")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    reports = []
    with LiveServer("--threads", str(args.server_threads), "--log-level", "warning",
                    log_path=Path("/tmp/wisp-bench-edge-server.log")) as server:
        for name in args.drafters.split(","):
            agent = EdgeAgent(EdgeSettings(server=server.url, drafter=name, state_cache=0))
            print(f"\n== drafter {name}", flush=True)
            try:
                reports.append(bench(agent, extra_rtts_ms=[float(x) for x in args.rtt.split(",")],
                                     policies=args.policies.split(","), prompts=args.prompts, tokens=args.tokens,
                                     fixed_k=args.fixed_k, draft_ahead=args.compare_draft_ahead, repeats=args.repeats,
                                     out=lambda line: print(line, flush=True)))
            finally:
                agent.close()
    if args.json_out:
        args.json_out.write_text(json.dumps(reports, indent=2) + "\n")
    return 0 if all(r["lossless"] for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
