"""`wisp-edge`: the device's command line (no torch).

    wisp-edge draft --drafter q4 --prompt "Once upon a time" -n 32   # run the drafter alone
    wisp-edge tokenize --drafter q4 "Hello 123"                       # ids as the target sees them
    wisp-edge drafters                                               # the shipped drafters and their files
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

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
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"wisp-edge: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
