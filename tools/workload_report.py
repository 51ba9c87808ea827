#!/usr/bin/env python3
"""The public workloads, by category: prompt lengths in the target's tokens (chat template applied) and the
shipped drafters' acceptance on them (the rounds tools/collect_traces.py --set public logged).

    python tools/workload_report.py        # docs/results/workloads/{categories.csv,summary.json}, and the
                                           # prompt lengths the simulator samples (tools/sim/profiles/)

Per category and drafter: acceptance rate (accepted / drafted tokens that were judged: a block's tokens up
to and including its first rejection), mean accepted per round and tokens per round (accepted + the
target's own token), at the trace's fixed draft length k; over all rounds and over drafting rounds only
(the others are cloud rounds, one token each, while the drafter prefills the prompt). Light: a tokenizer
and two gzip files.
"""

from __future__ import annotations

import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools import prompt_sets  # noqa: E402
from tools.sim.io import write_csv, write_json  # noqa: E402
from wisp_cloud.local_pair import chat_prompt_text  # noqa: E402
from wisp_cloud.settings import DEFAULT_TARGET  # noqa: E402
from wisp_cloud.tokenizer import load_tokenizer  # noqa: E402

OUT = ROOT / "docs" / "results" / "workloads"
LENGTHS = ROOT / "tools" / "sim" / "profiles" / "public_prompt_tokens.json"
TRACES = ROOT / "models" / "traces"


def prompt_tokens(target: Path) -> list[dict]:
    tok = load_tokenizer(target)
    return [{"id": p.id, "set": p.set, "category": p.category,
             "tokens": len(tok.encode(chat_prompt_text(target, [{"role": "user", "content": p.text}]),
                                      add_special_tokens=False).ids)} for p in prompt_sets.load()]


def acceptance_by_category(drafter: str) -> tuple[dict, dict]:
    """{category: stats} over the trace's public split, and the trace header."""
    with gzip.open(TRACES / f"{drafter}.jsonl.gz", "rt") as f:
        header = json.loads(f.readline())
        rounds = defaultdict(list)
        for line in f:
            prompt = json.loads(line)
            if prompt["split"] == "public":
                rounds[prompt["category"]] += [(r[0], r[1]) for r in prompt["rounds"]]
    out = {}
    for category, rs in sorted(rounds.items()):
        drafted = np.array([d for d, _ in rs])
        accepted = np.array([a for _, a in rs])
        judged = np.minimum(drafted, accepted + 1)
        drafting = drafted > 0  # the others are cloud rounds: the verifier decodes while the drafter prefills
        out[category] = {"rounds": len(rs), "cloud_rounds": int((~drafting).sum()),
                         "acceptance_rate": round(float(accepted.sum() / judged.sum()), 3),
                         "mean_accepted": round(float(accepted.mean()), 2),
                         "tokens_per_round": round(float(accepted.mean() + 1), 2),
                         "tokens_per_drafting_round": round(float(accepted[drafting].mean() + 1), 2)
                         if drafting.any() else None}
    return out, header


def main() -> int:
    target = Path(DEFAULT_TARGET)
    lengths = prompt_tokens(target)
    LENGTHS.write_text(json.dumps({"set": prompt_sets.NAME, "written_by": "python tools/workload_report.py",
                                   "tokens": [r["tokens"] for r in lengths],
                                   "category": [r["category"] for r in lengths]}) + "\n")
    by_cat = defaultdict(list)
    for r in lengths:
        by_cat[r["category"]].append(r["tokens"])
    rows, summary = [], {"set": prompt_sets.NAME, "command": "python tools/workload_report.py", "drafters": {}}
    acc = {}
    for drafter in ("q4", "student"):
        try:
            table, header = acceptance_by_category(drafter)
            if not table:
                print(f"{drafter}: no public rounds yet (python tools/collect_traces.py --set public)", file=sys.stderr)
                continue
            acc[drafter] = table
            summary["drafters"][drafter] = {"k": header["k"], "trace": header.get("public_set"),
                                            "collected_by": header.get("collected_by", {}).get("public")}
        except (FileNotFoundError, KeyError) as e:
            print(f"{drafter}: no public rounds ({e})", file=sys.stderr)
    for category, toks in sorted(by_cat.items()):
        row = {"set": prompt_sets.NAME, "category": category, "prompts": len(toks),
               "prompt_tokens_median": int(np.median(toks)), "prompt_tokens_p90": int(np.percentile(toks, 90))}
        for drafter, table in acc.items():
            for key, value in table.get(category, {}).items():
                row[f"{drafter}_{key}"] = value
        rows.append(row)
    summary["categories"] = rows
    OUT.mkdir(parents=True, exist_ok=True)
    write_csv(OUT / "categories.csv", rows)
    write_json(OUT / "summary.json", summary)
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
