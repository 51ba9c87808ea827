#!/usr/bin/env python3
"""Acceptance traces for the simulator: real speculative rounds of a shipped pair, per drafted token.

    python tools/collect_traces.py --from-cache            # convert the rounds train_predictor.py logged
    python tools/collect_traces.py --drafter q4 --minutes 3  # collect fresh rounds (CPU-heavy: run under flock)
    python tools/collect_traces.py --set public --per-category 4   # rounds on MT-Bench + HumanEval (split "public")

Each round is greedy generation through the real engine and the in-process verifier with a fixed
draft length k (the collection code of `tools/train_predictor.py`, imported, not rewritten). For every
drafted token the trace keeps the drafter's distribution statistics (`distribution_stats`: top-1
probability, entropy, top-1 minus top-2 probability, logit gap, logit std; the position features are
recomputed by the controller) and the verifier's label: 0 accepted, 1 the block's first rejection,
-1 drafted after it (off the committed path: wasted). Prompts of the predictor's training split are
marked "train", the held-out ones (models/student/heldout_prompts.jsonl, never trained on) "heldout":
the simulator replays held-out rounds and trains predictors for parametric pairs on train rounds.

With `--set public` the prompts are the public sets (tools/prompt_sets.py: MT-Bench's first turns and
HumanEval, the first N of each category) and their rounds go to the split "public", which the simulator
replays by default; the file's other splits are kept. Those prompts were never trained on either.

Output: models/traces/<drafter>.jsonl.gz, a header line then one line per prompt:
    {"prompt": i, "split": "heldout", ["id": "mt_bench/81", "category": "writing",]
     "rounds": [[drafted, accepted, draft_ms, verify_ms, [[5 stats..., label], ...]], ...]}
"""

from __future__ import annotations

import argparse
import gzip
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from wisp_cloud.settings import DEFAULT_TARGET  # noqa: E402
from wisp_edge.controller.features import FEATURE_NAMES  # noqa: E402

FORMAT = "wisp-trace/1"
STATS = FEATURE_NAMES[:5]  # what distribution_stats returns; position features are recomputed
CACHE = ROOT / "models" / "cache" / "predictor"
OUT = ROOT / "models" / "traces"


def rounds_by_prompt(data: dict) -> dict[int, list]:
    """train_predictor's arrays (per token and per round) -> {prompt: [[drafted, accepted, ms, ms, rows]]}."""
    features, labels, token_round = data["features"], data["labels"], data["round"]
    out: dict[int, list] = {}
    starts = np.flatnonzero(np.r_[True, token_round[1:] != token_round[:-1]]) if len(token_round) else []
    ends = list(starts[1:]) + [len(token_round)]
    rows_of = {int(token_round[s]): (s, e) for s, e in zip(starts, ends)}
    for r in range(len(data["round_drafted"])):
        s, e = rows_of.get(r, (0, 0))
        rows = [[*(round(float(x), 5) for x in features[i, :5]), int(labels[i])] for i in range(s, e)]
        out.setdefault(int(data["round_prompt"][r]), []).append(
            [int(data["round_drafted"][r]), int(data["round_accepted"][r]), round(float(data["round_draft_ms"][r]), 2),
             round(float(data["round_verify_ms"][r]), 2), rows])
    return out


def write_trace(path: Path, header: dict, splits: dict[str, dict], keep: list[str] = (),
                meta: dict[str, list[dict]] | None = None) -> dict:
    """Write `splits` (train_predictor's arrays); `keep`: the file's lines of other splits, kept as they are;
    `meta[split][i]`: fields added to prompt i's line (its id and category)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    counts = {}
    with gzip.open(path, "wt", compresslevel=9) as f:
        f.write(json.dumps(header) + "\n")
        for line in keep:
            f.write(line if line.endswith("\n") else line + "\n")
        for split, data in splits.items():
            prompts = rounds_by_prompt(data)
            for prompt, rounds in sorted(prompts.items()):
                extra = (meta or {}).get(split, [{}] * (prompt + 1))[prompt]
                f.write(json.dumps({"prompt": prompt, "split": split, **extra, "rounds": rounds},
                                   separators=(",", ":")) + "\n")
            labels = data["labels"]
            counts[split] = {"prompts": len(prompts), "rounds": int(len(data["round_drafted"])),
                             "drafted": int(len(labels)), "accepted": int((labels == 0).sum()),
                             "first_rejected": int((labels == 1).sum()), "after_rejection": int((labels == -1).sum())}
    return counts


def from_cache(name: str, k: int, cache: Path) -> dict[str, dict]:
    splits = {}
    for split, stem in (("train", "train"), ("heldout", "heldout")):
        path = cache / f"{name}_{stem}_k{k}.npz"
        if not path.exists():
            raise SystemExit(f"{path} is missing: run `python tools/train_predictor.py --drafter {name}` first, "
                             "or collect fresh rounds without --from-cache")
        with np.load(path) as z:
            splits[split] = dict(z)
    return splits


def collect_fresh(name: str, k: int, answer_tokens: int, minutes: float, max_prompt: int, threads: int) -> dict:
    """Held-out prompts only, through train_predictor's RecordingPolicy + the real engine."""
    import torch

    import train_predictor as tp
    from tools.build.distill import prompts as pr
    from wisp_cloud.local_pair import LocalPair

    torch.set_num_threads(threads)
    pair = LocalPair.load(name, DEFAULT_TARGET, n_threads=1)
    texts = [p.prompt for p in pr.read_jsonl(tp.HELDOUT)]
    data = tp.collect(pair, texts, k=k, answer_tokens=answer_tokens, max_prompt=max_prompt, minutes=minutes,
                      desc=f"{name} traces")
    return {"heldout": data}


def collect_public(name: str, k: int, answer_tokens: int, per_category: int, max_prompt: int,
                   threads: int) -> tuple[dict, list[dict]]:
    """Rounds on the public sets, the first `per_category` prompts of each category; and each prompt's id
    and category, by prompt index."""
    import torch

    import train_predictor as tp
    from tools import prompt_sets
    from wisp_cloud.local_pair import LocalPair

    torch.set_num_threads(threads)
    pair = LocalPair.load(name, DEFAULT_TARGET, n_threads=1)
    prompts = prompt_sets.sample(per_category)
    data = tp.collect(pair, [p.text for p in prompts], k=k, answer_tokens=answer_tokens, max_prompt=max_prompt,
                      minutes=1e9, desc=f"{name} public traces")
    return {"public": data}, [{"id": p.id, "set": p.set, "category": p.category} for p in prompts]


def other_splits(path: Path, replaced: set[str]) -> list[str]:
    """The lines of an existing trace file whose split is not being rewritten."""
    if not path.exists():
        return []
    with gzip.open(path, "rt") as f:
        f.readline()
        return [line for line in f if json.loads(line)["split"] not in replaced]


def main() -> None:
    import train_predictor as tp
    from wisp_edge.controller.predictor import file_sha256
    from wisp_edge.drafters import SHIPPED_DRAFTERS, resolve_drafter_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--drafter", choices=["q4", "student", "all"], default="all")
    p.add_argument("--from-cache", action="store_true", help=f"convert train_predictor's rounds in {CACHE}")
    p.add_argument("--set", choices=["heldout", "public"], default="heldout",
                   help="fresh rounds on the held-out home-made prompts, or on the public sets (split 'public')")
    p.add_argument("--per-category", type=int, default=4, help="--set public: prompts per category")
    p.add_argument("--cache", type=Path, default=CACHE)
    p.add_argument("--minutes", type=float, default=3.0, help="fresh collection budget per drafter")
    p.add_argument("--k", type=int, help="fixed draft length (default: train_predictor's, q4 10, student 8)")
    p.add_argument("--answer-tokens", type=int, help="answer length per prompt (default: train_predictor's)")
    p.add_argument("--max-prompt", type=int, default=320)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    command = "python tools/collect_traces.py " + shlex.join(sys.argv[1:])
    for name in (["q4", "student"] if a.drafter == "all" else [a.drafter]):
        k = a.k or tp.DEFAULTS[name]["k"]
        answer_tokens = a.answer_tokens or tp.DEFAULTS[name]["answer_tokens"]
        path = a.out / f"{name}.jsonl.gz"
        keep, meta, public = [], None, {}
        if a.set == "public" and not a.from_cache:
            splits, prompt_meta = collect_public(name, k, answer_tokens, a.per_category, a.max_prompt, a.threads)
            meta = {"public": prompt_meta}
            keep = other_splits(path, {"public"})
            with gzip.open(path, "rt") as f:
                old = json.loads(f.readline())
            source = {**old.get("collected_by", {}), "public": command}
            from tools import prompt_sets
            public = {"public_set": f"{prompt_sets.NAME}, the first {a.per_category} prompts of each category "
                                    "(models/prompts/, tools/prompt_sets.py)"}
        elif a.from_cache:
            splits = from_cache(name, k, a.cache)
            source = {split: str(d.get("command", "?")) for split, d in splits.items()}
        else:
            splits = collect_fresh(name, k, answer_tokens, a.minutes, a.max_prompt, a.threads)
            source = {"heldout": command}
        drafter_path = resolve_drafter_path(name)
        header = {"format": FORMAT, "drafter": name, "drafter_file": SHIPPED_DRAFTERS[name],
                  "drafter_sha256": file_sha256(drafter_path) if drafter_path.exists() else None,
                  "target": "models/target (SmolLM2-135M-Instruct, float32)", "k": k, "greedy": True,
                  "stats": list(STATS), "labels": {"0": "accepted", "1": "first rejection", "-1": "after it"},
                  "collected_by": source, **public, "written_by": command,
                  "written": time.strftime("%Y-%m-%d %H:%M:%S")}
        counts = write_trace(path, header, splits, keep, meta)
        print(f"{path}: {path.stat().st_size / 1024:.0f} KiB, {counts}", flush=True)


if __name__ == "__main__":
    main()
