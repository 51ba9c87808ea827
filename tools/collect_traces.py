#!/usr/bin/env python3
"""Acceptance traces for the simulator: real speculative rounds of a shipped pair, per drafted token.

    python tools/collect_traces.py --from-cache            # convert the rounds train_predictor.py logged
    python tools/collect_traces.py --drafter q4 --minutes 3  # collect fresh rounds (CPU-heavy: run under flock)

Each round is greedy generation through the real engine and the in-process verifier with a fixed
draft length k (the collection code of `tools/train_predictor.py`, imported, not rewritten). For every
drafted token the trace keeps the drafter's distribution statistics (`distribution_stats`: top-1
probability, entropy, top-1 minus top-2 probability, logit gap, logit std; the position features are
recomputed by the controller) and the verifier's label: 0 accepted, 1 the block's first rejection,
-1 drafted after it (off the committed path: wasted). Prompts of the predictor's training split are
marked "train", the held-out ones (models/student/heldout_prompts.jsonl, never trained on) "heldout":
the simulator replays held-out rounds and trains predictors for parametric pairs on train rounds.

Output: models/traces/<drafter>.jsonl.gz, a header line then one line per prompt:
    {"prompt": i, "split": "heldout",
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


def write_trace(path: Path, header: dict, splits: dict[str, dict]) -> dict:
    path.parent.mkdir(parents=True, exist_ok=True)
    counts = {}
    with gzip.open(path, "wt", compresslevel=9) as f:
        f.write(json.dumps(header) + "\n")
        for split, data in splits.items():
            prompts = rounds_by_prompt(data)
            for prompt, rounds in sorted(prompts.items()):
                f.write(json.dumps({"prompt": prompt, "split": split, "rounds": rounds}, separators=(",", ":")) + "\n")
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


def main() -> None:
    import train_predictor as tp
    from wisp_edge.controller.predictor import file_sha256
    from wisp_edge.drafters import SHIPPED_DRAFTERS, resolve_drafter_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--drafter", choices=["q4", "student", "all"], default="all")
    p.add_argument("--from-cache", action="store_true", help=f"convert train_predictor's rounds in {CACHE}")
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
        if a.from_cache:
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
                  "collected_by": source, "written_by": command, "written": time.strftime("%Y-%m-%d %H:%M:%S")}
        path = a.out / f"{name}.jsonl.gz"
        counts = write_trace(path, header, splits)
        print(f"{path}: {path.stat().st_size / 1024:.0f} KiB, {counts}", flush=True)


if __name__ == "__main__":
    main()
