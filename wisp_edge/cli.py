"""`wisp-edge`: the device's command line (no torch).

    wisp-edge draft --drafter q4 --prompt "Once upon a time" -n 32   # run the drafter alone
    wisp-edge tokenize --drafter q4 "Hello 123"                       # ids as the target sees them
    wisp-edge drafters                                               # the shipped drafters and their files
    wisp-edge generate --server http://127.0.0.1:8000 --chat "Hi"    # speculative decoding with a verifier
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from wisp_edge.cli_args import add_generation_arguments, sampling_from_args
from wisp_edge.drafters import SHIPPED_DRAFTERS, load_drafter, resolve_drafter_path
from wisp_edge.vocab import fingerprint


def _draft(args) -> int:
    drafter = load_drafter(args.drafter, n_threads=args.threads)
    ids = drafter.tokenize(args.prompt)
    drafter.reset(ids)
    drafter.logits()
    out, t0 = [], time.perf_counter()
    for _ in range(args.n):
        token = int(np.argmax(drafter.logits()))
        drafter.append(token)
        out.append(token)
    elapsed = time.perf_counter() - t0
    print(json.dumps({"drafter": drafter.name, "text": drafter.detokenize(out), "token_ids": out,
                      "tokens_per_s": round(len(out) / elapsed, 1)}))
    return 0


def _tokenize(args) -> int:
    drafter = load_drafter(args.drafter, n_threads=1)
    print(json.dumps({"token_ids": drafter.tokenize(args.text), "vocab_size": drafter.vocab_size,
                      "vocab_fingerprint": fingerprint(drafter.token_pieces())}))
    return 0


def _drafters(args) -> int:
    for name in SHIPPED_DRAFTERS:
        path = resolve_drafter_path(name)
        print(f"{name:14} {'ok     ' if path.exists() else 'missing'} {path}")
    return 0


def _generate(args) -> int:
    from wisp_edge.chat import render_chat
    from wisp_edge.client import HttpVerifier, VerifierError
    from wisp_edge.engine import FixedLength, SpeculativeEngine

    params = sampling_from_args(args)
    drafter = load_drafter(args.drafter, n_threads=args.threads)
    with HttpVerifier(args.server, api_key=args.api_key) as backend:
        try:
            info = backend.info()
        except VerifierError as exc:
            print(f"wisp-edge: cannot reach the verifier at {args.server}: {exc}", file=sys.stderr)
            return 3
        mine = fingerprint(drafter.token_pieces())
        if mine != info["vocab_fingerprint"]:
            print(f"wisp-edge: drafter {drafter.name} has vocabulary {mine} but {info['model']} has "
                  f"{info['vocab_fingerprint']} (size:hash): they cannot speculate together", file=sys.stderr)
            return 2
        if args.chat is not None:
            if not info.get("chat_template"):
                print("wisp-edge: the served model has no chat template; use --prompt", file=sys.stderr)
                return 2
            text = render_chat(info["chat_template"], [{"role": "user", "content": args.chat}],
                               bos_token=info.get("bos_token") or "", eos_token=info.get("eos_token") or "")
        else:
            text = args.prompt
        prompt_ids = drafter.tokenize(text)
        engine = SpeculativeEngine(drafter, backend, FixedLength(args.draft_length),
                                   eos_ids=tuple(info["eos_token_ids"]), vocab_fingerprint=mine)
        tokens, shown = [], ""
        for token in engine.generate(prompt_ids, max_new_tokens=args.max_tokens, params=params):
            if token.id in info["eos_token_ids"]:
                break
            tokens.append(token.id)
            text_now = drafter.detokenize(tokens)
            if not args.json and not text_now.endswith("\ufffd"):  # hold back a character split across tokens
                print(text_now[len(shown):], end="", flush=True)
                shown = text_now
        stats = engine.stats.summary()
    text = drafter.detokenize(tokens)
    result = {"text": text, "token_ids": tokens, "stats": stats, "server": args.server, "drafter": drafter.name,
              "resumes": backend.resumes}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        print(text[len(shown):])
        print("\n--- round statistics ---")
        for key, value in stats.items():
            print(f"{key:>26}: {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wisp-edge", description="WISP edge agent (device side)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("draft", help="greedy-decode with the drafter alone and report its speed")
    p.add_argument("--drafter", default="q4")
    p.add_argument("--prompt", required=True)
    p.add_argument("-n", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=_draft)
    p = sub.add_parser("tokenize", help="token ids of a text, as the target's tokenizer produces them")
    p.add_argument("--drafter", default="q4")
    p.add_argument("text")
    p.set_defaults(func=_tokenize)
    sub.add_parser("drafters", help="list the shipped drafters").set_defaults(func=_drafters)
    p = sub.add_parser("generate", help="speculative decoding: draft here, verify on a WISP server")
    add_generation_arguments(p, chat_help="a user message; the served model's chat template is applied")
    p.add_argument("--server", default="http://127.0.0.1:8000", help="the verifier's URL")
    p.add_argument("--api-key", default=None, help="the verifier's API key (or WISP_API_KEY)")
    p.add_argument("--threads", type=int, default=1, help="drafter threads")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--json-out", help="also write the result as JSON to this file")
    p.set_defaults(func=_generate)
    args = parser.parse_args(argv)
    if getattr(args, "api_key", None) is None and "WISP_API_KEY" in os.environ:
        args.api_key = os.environ["WISP_API_KEY"]
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"wisp-edge: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
