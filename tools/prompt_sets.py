"""The public prompt sets the evaluation runs on: MT-Bench's 80 questions (8 categories) and HumanEval's 164
problems, shipped in models/prompts/ with their licences (see its README).

Each prompt carries its set and category, so acceptance, tokens per round and the simulator's workload
can be reported per category. MT-Bench's first turn is the prompt (its second turn needs the first
answer); a HumanEval problem is asked as "Complete this Python function" plus its signature and docstring.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

PROMPTS = Path(__file__).resolve().parents[1] / "models" / "prompts"
SETS = ("mt_bench", "human_eval")
NAME = "MT-Bench (80) + HumanEval (164)"


@dataclass(frozen=True)
class Prompt:
    id: str  # "mt_bench/81", "human_eval/HumanEval/0"
    set: str
    category: str  # MT-Bench's own categories; "coding (HumanEval)" for HumanEval
    text: str
    followup: str | None = None  # MT-Bench's second turn


def mt_bench(path: Path = PROMPTS / "mt_bench.jsonl") -> list[Prompt]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [Prompt(f"mt_bench/{r['question_id']}", "mt_bench", r["category"], r["turns"][0],
                   r["turns"][1] if len(r["turns"]) > 1 else None) for r in rows]


def human_eval(path: Path = PROMPTS / "human_eval.jsonl.gz") -> list[Prompt]:
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [Prompt(f"human_eval/{r['task_id']}", "human_eval", "coding (HumanEval)",
                   "Complete this Python function.\n\n" + r["prompt"]) for r in rows]


def load(sets: tuple[str, ...] = SETS) -> list[Prompt]:
    loaders = {"mt_bench": mt_bench, "human_eval": human_eval}
    return [p for s in sets for p in loaders[s]()]


def sample(per_category: int, sets: tuple[str, ...] = SETS) -> list[Prompt]:
    """The first `per_category` prompts of each category, in file order (a deterministic, balanced subset)."""
    taken: dict[str, int] = {}
    out = []
    for p in load(sets):
        if taken.get(p.category, 0) < per_category:
            taken[p.category] = taken.get(p.category, 0) + 1
            out.append(p)
    return out
