"""`wisp-cloud`: the verifier's command line.

    wisp-cloud generate --chat "What is the capital of France?"   # in-process speculative decoding
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="speculative decoding in one process: drafter + target verifier")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--chat", help="a user message; the target's chat template is applied")
    text.add_argument("--prompt", help="raw text to continue (no chat template)")
    p.add_argument("--drafter", default="q4", help="q4 | student | student-f32 | student-onnx | path to .gguf/.onnx")
    p.add_argument("--model", default=None, help="target checkpoint directory (default: models/target)")
    p.add_argument("-k", "--draft-length", type=int, default=6, help="tokens drafted per round")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads for the target (default: all cores)")
    p.add_argument("--drafter-threads", type=int, default=1,
                   help="drafter threads; one keeps llama.cpp's spinning pool off the target's cores")
    p.add_argument("--compare", action="store_true", help="also decode with the target alone and print the speed-up")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=_generate)


def _generate(args) -> int:
    import torch

    from wisp_cloud.generate import generate
    from wisp_cloud.local_pair import DEFAULT_TARGET, LocalPair
    from wisp_edge.engine import FixedLength
    from wisp_edge.sampling import SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    pair = LocalPair.load(args.drafter, args.model or DEFAULT_TARGET, n_threads=args.drafter_threads)
    prompt_ids = pair.chat_prompt_ids(args.chat) if args.chat else pair.drafter.tokenize(args.prompt)
    engine = pair.engine(FixedLength(args.draft_length))
    tokens = []
    for token in engine.generate(prompt_ids, max_new_tokens=args.max_tokens, params=params):
        tokens.append(token)
        if not args.json:
            print(pair.drafter.detokenize([token.id]), end="", flush=True)
    ids = [t.id for t in tokens]
    result = {"text": pair.drafter.detokenize(ids), "token_ids": ids, "drafter": pair.drafter.name,
              "draft_length": args.draft_length, "stats": engine.stats.summary()}
    if args.compare:
        t0 = time.perf_counter()
        reference = generate(pair.model, prompt_ids, max_new_tokens=args.max_tokens, params=params,
                             eos_ids=pair.eos_ids)
        alone = time.perf_counter() - t0
        result["target_alone"] = {"tokens_per_s": round(len(reference) / alone, 2),
                                  "identical_output": reference == ids if params.greedy else None}
        result["speedup"] = round(result["stats"]["tokens_per_s"] / result["target_alone"]["tokens_per_s"], 2)
    if args.json:
        print(json.dumps(result))
    else:
        print("\n\n--- round statistics ---")
        for key, value in result["stats"].items():
            print(f"{key:>26}: {value}")
        if args.compare:
            print(f"{'target alone tokens/s':>26}: {result['target_alone']['tokens_per_s']}")
            print(f"{'speed-up':>26}: {result['speedup']}x")
            if params.greedy:
                print(f"{'identical to target alone':>26}: {result['target_alone']['identical_output']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wisp-cloud", description="WISP verifier (cloud side)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"wisp-cloud: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
