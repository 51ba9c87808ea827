#!/usr/bin/env python3
"""What the speculation controller costs per drafted token, beside the drafter's own time per token.

    python tools/bench_controller.py [--drafters q4,student] [--tokens 48] [--threads 1] [--segments 12]

For each drafter it drafts greedily along a few chat prompts and, for every drafted token, times the
drafting (`drafter.logits()`, one token evaluated, then the greedy argmax) and then one thing, rotating
among the stop rules and the parts of the product's: `new` (the product's `PredictorPolicy.stop_after`,
through the package's compiled kernels), `ggml` (the same rule in numpy with llama.cpp's SIMD kernels,
the product's path when the install had no C compiler), `numpy` (numpy alone, for a device without
llama.cpp), and the parts of `new`: `features` (`DistributionStats` alone) and `mlp` (the decision from a
fixed feature row: the MLP and its bookkeeping). "In engine
order" times it right after the drafting (its code and buffers gone cold while the drafter evaluated);
"warm" times each rule alone in a loop over the same logits. Then the drafting critical path as the
engine runs it (`wisp_edge.drafting.Drafting.next`), in segments of 16 tokens rotating among: no stop
rule, the predictor run after the drafting (`overlap` off, the engine's default) and the predictor run
while the drafter evaluates the next token (`overlap` on, the engine's `overlap_stop_rule`): per token,
the wall time beyond the drafter's own evaluation (its calls timed in whichever thread ran them) and
that evaluation's time. The controller's cost on the critical path is the first minus the no-rule
segments' (`controller_ms`); the evaluation's time is printed beside it, since running concurrently can
slow it. It also reports how far the compiled features are from numpy's, whether every stop
decision agreed, and, on the held-out rounds of the shipped traces, the predictor's miss rate at the
first rejection and recall of acceptable tokens through the batch path (what tools/train_predictor.py
evaluates) and through the per-token path. Last, the drafter's prefill on each turn of a short chat
(prefix reuse: tokens kept and prefilled, and the time against an empty cache). Writes --json-out
(docs/results/controller/bench.json).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wisp_edge.controller.features import (BlockFeatures, DistributionStats, compiled_kernels,  # noqa: E402
                                           distribution_stats, ggml_softmax)
from wisp_edge.drafting import Drafting  # noqa: E402
from wisp_edge.engine import FixedLength  # noqa: E402
from wisp_edge.controller.predictor import (PredictorPolicy, RejectionPredictor, Scorer,  # noqa: E402
                                            load_predictor_for)
from wisp_edge.drafters import load_drafter  # noqa: E402
from wisp_edge.wire.sampling import SamplingParams  # noqa: E402

PROMPTS = ["Write a haiku about the sea.", "Explain what a hash table is in two sentences.",
           "def fibonacci(n):\n    # complete this Python function"]
TRACES = ROOT / "models" / "traces"


def rule_on_path(predictor: RejectionPredictor, n: int, *, compiled: bool, ggml: bool) -> PredictorPolicy:
    """The product's stop rule forced onto one path: the compiled kernels (`new`), numpy with llama.cpp's SIMD
    kernels (`ggml`, the product before the compiled kernels), or numpy alone (`numpy`)."""
    rule = PredictorPolicy(predictor, k_max=8)
    rule._stats = DistributionStats(n, use_compiled=compiled, use_ggml=ggml)
    rule._scorer = Scorer(predictor, use_compiled=compiled)
    return rule


class TimedDrafter:
    """The drafter with each `logits()` call timed, in whichever thread it runs."""

    def __init__(self, drafter) -> None:
        self.drafter, self.eval_ns = drafter, []

    def logits(self) -> np.ndarray:
        t0 = time.perf_counter_ns()
        try:
            return self.drafter.logits()
        finally:
            self.eval_ns.append(time.perf_counter_ns() - t0)

    def __getattr__(self, name):
        return getattr(self.drafter, name)


def product_parts(predictor: RejectionPredictor, n: int) -> dict:
    """The parts of the product's stop rule, each with its own buffers, as callables (index, logits, q)."""
    stats, policy = DistributionStats(n), PredictorPolicy(predictor, k_max=8)
    row = (0.3, 2.0, 0.1, 0.5, 3.5)  # a doubtful token
    return {"features": lambda index, logits, q: stats(logits),
            "mlp": lambda index, logits, q: policy.stop_after_stats(index, row)}


def critical_path(drafter, predictor: RejectionPredictor, segments: int, per_segment: int = 16) -> dict:
    """Per drafted token, through `Drafting.next`: the wall time beyond the drafter's evaluation, and the
    evaluation's own time, for no stop rule, the predictor after the drafting, and the predictor overlapped."""
    timed = TimedDrafter(drafter)
    modes = {"no_rule": (FixedLength(per_segment), False), "predictor_after_drafting": (None, False),
             "predictor_overlapped": (None, True)}
    beyond: dict[str, list[float]] = {m: [] for m in modes}
    evals: dict[str, list[float]] = {m: [] for m in modes}
    for s in range(segments * len(modes)):
        mode = list(modes)[s % len(modes)]
        policy, overlap = modes[mode]
        policy = policy or PredictorPolicy(predictor, k_max=per_segment)
        text = PROMPTS[(s // len(modes)) % len(PROMPTS)]
        drafter.reset(drafter.tokenize(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"))
        drafter.logits()  # the prefill is not drafting
        drafting = Drafting(timed, policy, (), SamplingParams(), overlap=overlap)
        timed.eval_ns.clear()
        t0 = time.perf_counter_ns()
        for i in range(per_segment):
            drafting.next(i % 8)  # the rule's decision is ignored: every segment drafts the same tokens
        drafting.settle()  # the last evaluation started ahead counts too
        wall = time.perf_counter_ns() - t0
        drafting.close()
        beyond[mode].append((wall - sum(timed.eval_ns)) / per_segment / 1e6)
        evals[mode].append(sum(timed.eval_ns) / len(timed.eval_ns) / 1e6)
    out = {m: {"beyond_eval_ms": round(statistics.median(beyond[m]), 4),
               "eval_ms": round(statistics.median(evals[m]), 4)} for m in modes}
    base = out["no_rule"]
    for m in ("predictor_after_drafting", "predictor_overlapped"):
        out[m]["controller_ms"] = round(out[m]["beyond_eval_ms"] - base["beyond_eval_ms"], 4)
    out["segments_per_mode"], out["tokens_per_segment"] = segments, per_segment
    return out


def heldout(name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Feature rows [n, 7] and labels [n] of the held-out rounds in models/traces/<name>.jsonl.gz."""
    path = TRACES / f"{name}.jsonl.gz"
    if not path.exists():
        return None
    rows, labels = [], []
    with gzip.open(path, "rt") as f:
        next(f)
        for line in f:
            prompt = json.loads(line)
            for *_, block in prompt["rounds"] if prompt["split"] == "heldout" else []:
                features = BlockFeatures()
                rows += [features.from_stats(i, tuple(r[:5])) for i, r in enumerate(block)]
                labels += [r[5] for r in block]
    return np.stack(rows), np.asarray(labels)


def stop_metrics(stops: np.ndarray, labels: np.ndarray) -> dict:
    sys.path.insert(0, str(ROOT / "tools"))
    from train_predictor import stop_metrics as metrics  # torch: only imported here

    return metrics(stops, labels)


def heldout_report(name: str, predictor: RejectionPredictor) -> dict | None:
    data = heldout(name)
    if data is None:
        return None
    x, labels = data
    batch = predictor.p_reject_batch(x) >= predictor.tau
    single = np.array([predictor.p_reject(row) for row in x]) >= predictor.tau
    return {"rows": int(len(x)), "batch_path": stop_metrics(batch, labels),
            "per_token_path": stop_metrics(single, labels), "decisions_differ": int((batch != single).sum())}


def percentiles(samples_ns: list[int]) -> dict:
    ms = sorted(s / 1e6 for s in samples_ns)
    return {"median_ms": round(statistics.median(ms), 4), "p10_ms": round(ms[len(ms) // 10], 4),
            "mean_ms": round(statistics.fmean(ms), 4)}


def prefill_per_turn(drafter, answer_tokens: int = 8) -> list[dict]:
    """A chat of len(PROMPTS) turns as a client sends it (the whole conversation each turn): the tokens the
    drafter prefills and the time, keeping its cache (prefix reuse) and from an empty cache."""
    chat, turns = "", []
    drafter.reset([])  # an empty cache to start from
    for text in PROMPTS:
        chat += f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
        ids = drafter.tokenize(chat)
        before = drafter.counters.prefill_tokens, drafter.counters.prefix_reused_tokens
        t0 = time.perf_counter()
        drafter.reset(ids)
        drafter.logits()
        kept_ms = (time.perf_counter() - t0) * 1000
        prefilled, reused = (now - then for now, then in zip((drafter.counters.prefill_tokens,
                                                              drafter.counters.prefix_reused_tokens), before))
        drafter.reset([])
        t0 = time.perf_counter()
        drafter.reset(ids)
        drafter.logits()
        turns.append({"prompt_tokens": len(ids), "prefilled": prefilled, "reused": reused,
                      "prefill_ms": round(kept_ms, 1),
                      "prefill_ms_empty_cache": round((time.perf_counter() - t0) * 1000, 1)})
        answer = []
        for _ in range(answer_tokens):
            answer.append(int(np.argmax(drafter.logits())))
            drafter.append(answer[-1])
        chat += drafter.detokenize(answer) + "<|im_end|>\n"
    return turns


def bench_drafter(spec: str, tokens: int, threads: int, segments: int) -> dict:
    drafter = load_drafter(spec, n_threads=threads)
    predictor = load_predictor_for(drafter)
    if predictor is None:
        raise SystemExit(f"no predictor weights for {spec} in models/predictor: run tools/train_predictor.py")
    n = drafter.vocab_size
    rules = {"new": PredictorPolicy(predictor, k_max=8),
             "ggml": rule_on_path(predictor, n, compiled=False, ggml=True),
             "numpy": rule_on_path(predictor, n, compiled=False, ggml=False)}
    numpy_stats = DistributionStats(n, use_compiled=False, use_ggml=False)
    parts = product_parts(predictor, drafter.vocab_size)
    timed = {**{name: rule.stop_after for name, rule in rules.items()}, **parts}
    in_engine: dict[str, list[int]] = {name: [] for name in ("drafting", *timed)}
    q, differ, worst, rows = None, 0, np.zeros(5), []
    for text in PROMPTS:
        drafter.reset(drafter.tokenize(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"))
        drafter.logits()  # the prefill is not drafting
        for i in range(tokens // len(PROMPTS)):
            t0 = time.perf_counter_ns()
            logits = drafter.logits()
            token = int(np.argmax(logits))  # as Drafting.next, greedy (q None)
            in_engine["drafting"].append(time.perf_counter_ns() - t0)
            # Only the first thing after the drafting is timed (as in the engine, where the stop rule runs
            # once per token, its code and buffers gone cold during the drafter's evaluation); which
            # goes first rotates. The rules not timed then run, to compare the decisions.
            first = list(timed)[len(rows) % len(timed)]
            t0 = time.perf_counter_ns()
            decision = timed[first](i % 8, logits, q)
            in_engine[first].append(time.perf_counter_ns() - t0)
            # Each rule sees each token once (the predictor keeps the block's running confidence).
            decisions = {decision if name == first else rule.stop_after(i % 8, logits, q)
                         for name, rule in rules.items()}
            differ += len(decisions) > 1
            worst = np.maximum(worst, np.abs(np.subtract(distribution_stats(logits), numpy_stats(logits))))
            rows.append(logits)
            drafter.append(token)
    path = critical_path(drafter, predictor, segments)
    turns = prefill_per_turn(drafter)
    drafter.close()
    warm = {name: [] for name in rules}  # each rule alone in a loop over a few rows (they stay in cache)
    for name, rule in rules.items():
        for i, logits in enumerate(rows[:6] * 24):
            t0 = time.perf_counter_ns()
            rule.stop_after(i % 8, logits, q)
            warm[name].append(time.perf_counter_ns() - t0)
    names = ("top1_prob", "entropy", "margin", "logit_gap", "logit_std")
    return {"drafter": spec, "drafted_tokens": len(rows), "drafting_per_token": percentiles(in_engine.pop("drafting")),
            "controller_per_token": {name: percentiles(t) for name, t in in_engine.items()},
            "controller_per_token_warm": {name: percentiles(t) for name, t in warm.items()},
            "decisions_differ": differ,
            "critical_path_per_token": path,
            "max_abs_feature_diff_new_vs_numpy": dict(zip(names, (float(f"{w:.3g}") for w in worst))),
            "heldout": heldout_report(spec, predictor), "chat_prefill_per_turn": turns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drafters", default="q4,student")
    parser.add_argument("--tokens", type=int, default=48, help="drafted tokens per drafter (over 3 prompts)")
    parser.add_argument("--threads", type=int, default=1, help="drafter threads (an edge core)")
    parser.add_argument("--segments", type=int, default=12, help="16-token segments per critical-path mode")
    parser.add_argument("--json-out", type=Path, default=ROOT / "docs" / "results" / "controller" / "bench.json")
    args = parser.parse_args()
    report = {"command": "python tools/bench_controller.py " + " ".join(sys.argv[1:]),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"load average {os.getloadavg()[0]:.1f} at start",
              "compiled_kernels": f"{compiled_kernels().LANES} lanes" if compiled_kernels() else None,
              "ggml_kernels": bool(ggml_softmax()), "drafters": []}
    if compiled_kernels() is None:
        raise SystemExit("the compiled kernels are not built: pip install -e . with a C compiler present")
    print(f"{'drafter':10s} {'drafting':>9s} | controller, in engine order: {'new':>7s} {'ggml':>7s} {'numpy':>7s} "
          f"| warm, in a loop: {'new':>7s} {'ggml':>7s} {'numpy':>7s}   (ms per drafted token, medians)")
    for spec in args.drafters.split(","):
        row = bench_drafter(spec, args.tokens, args.threads, args.segments)
        report["drafters"].append(row)
        c, w = row["controller_per_token"], row["controller_per_token_warm"]
        print(f"{spec:10s} {row['drafting_per_token']['median_ms']:9.3f} | {'':28s} {c['new']['median_ms']:7.4f} "
              f"{c['ggml']['median_ms']:7.4f} {c['numpy']['median_ms']:7.4f} | {'':16s} "
              f"{w['new']['median_ms']:7.4f} {w['ggml']['median_ms']:7.4f} {w['numpy']['median_ms']:7.4f}")
        print(f"{'':10s} new, mean in engine order {c['new']['mean_ms']:.4f} ms; its parts: features "
              f"{c['features']['median_ms']:.4f}, decision from a feature row (MLP) {c['mlp']['median_ms']:.4f}")
        p = row["critical_path_per_token"]
        print(f"{'':10s} critical path (Drafting.next), ms per token: " + "; ".join(
            f"{m}: eval {p[m]['eval_ms']:.3f}, beyond eval {p[m]['beyond_eval_ms']:.4f}"
            + (f", controller {p[m]['controller_ms']:+.4f}" if "controller_ms" in p[m] else "")
            for m in ("no_rule", "predictor_after_drafting", "predictor_overlapped")))
        print(f"{'':10s} decisions differ on {row['decisions_differ']}/{row['drafted_tokens']} tokens; "
              f"max |new - numpy| per feature: {row['max_abs_feature_diff_new_vs_numpy']}")
        if row["heldout"]:
            h = row["heldout"]
            print(f"{'':10s} held-out ({h['rows']} rows): batch path {h['batch_path']}, per-token path "
                  f"{h['per_token_path']}, decisions differ {h['decisions_differ']}")
        print(f"{'':10s} chat turns, prompt / reused / prefilled tokens, prefill ms (empty cache ms): " + "; ".join(
            f"{t['prompt_tokens']}/{t['reused']}/{t['prefilled']}, {t['prefill_ms']} ({t['prefill_ms_empty_cache']})"
            for t in row["chat_prefill_per_turn"]))
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
