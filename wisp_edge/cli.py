"""`wisp-edge`: the device's command line (no torch).

    wisp-edge draft --drafter q4 --prompt "Once upon a time" -n 32   # run the drafter alone
    wisp-edge tokenize --drafter q4 "Hello 123"                       # ids as the target sees them
    wisp-edge drafters                                               # the shipped drafters and their files
    wisp-edge generate --server http://127.0.0.1:8000 --chat "Hi"    # speculative decoding with a verifier
    wisp-edge bench --server http://10.0.0.2:8000 --rtt 0,50          # the policies on this device and network
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import closing
from pathlib import Path

import numpy as np

from wisp_edge.client import VerifierError
from wisp_edge.drafters import SHIPPED_DRAFTERS, load_drafter, resolve_drafter_path
from wisp_edge.settings import EdgeSettings, load_settings
from wisp_edge.wire.flags import add_flags, given
from wisp_edge.wire.options import DraftOptions, add_request_flags, sampling_from_args
from wisp_edge.wire.vocab import fingerprint

SERVE_ONLY = ("host", "port", "max_waiting", "state_cache")  # settings that only `wisp-edge serve` takes as flags


def _drafter_spec(args) -> str:
    """--drafter, else the default; `draft` and `tokenize` read no settings."""
    return DraftOptions(**given(args, DraftOptions)).drafter


def _draft(args) -> int:
    drafter = load_drafter(_drafter_spec(args), n_threads=args.threads)
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
    drafter = load_drafter(_drafter_spec(args), n_threads=1)
    print(json.dumps({"token_ids": drafter.tokenize(args.text), "vocab_size": drafter.vocab_size,
                      "vocab_fingerprint": fingerprint(drafter.token_pieces())}))
    return 0


def _drafters(args) -> int:
    for name in SHIPPED_DRAFTERS:
        path = resolve_drafter_path(name)
        print(f"{name:14} {'ok     ' if path.exists() else 'missing'} {path}")
    return 0


def _add_agent_flags(p: argparse.ArgumentParser, *, serve: bool = False) -> None:
    """The EdgeSettings flags (flags > WISP_EDGE_* environment > config file)."""
    p.add_argument("--config", help="TOML settings file (default: $WISP_EDGE_CONFIG or ~/.config/wisp/edge.toml)")
    add_flags(p, EdgeSettings, skip=() if serve else SERVE_ONLY)


def _agent(args):
    from wisp_edge.agent import EdgeAgent

    flags = given(args, EdgeSettings)
    if "draft_length" in flags and "policy" not in flags:
        flags["policy"] = "fixed"  # -k alone means a fixed length
    if args.command != "serve":
        flags["state_cache"] = 0  # one conversation at a time (a bench must not reuse one run's caches in the next)
    return EdgeAgent(load_settings(flags, getattr(args, "config", None)))


def _stream_text(agent, tokens, *, show: bool):
    """Print committed text as it comes (holding back a character split across tokens); returns the ids.

    The generator is closed here, not left suspended at the EOS: closing it ends the session on the
    verifier and fills `agent.last_stats` before the caller reads them.
    """
    ids, shown = [], ""
    with closing(tokens):
        for token in tokens:
            if token.id in agent.eos_ids:
                break
            ids.append(token.id)
            if show:
                text_now = agent.detokenize(ids)
                if not text_now.endswith("\ufffd"):
                    print(text_now[len(shown):], end="", flush=True)
                    shown = text_now
    if show:
        print(agent.detokenize(ids)[len(shown):], flush=True)
    return ids


def _generate(args) -> int:
    agent = _agent(args)
    try:
        if args.chat is not None:
            prompt_ids = agent.chat_ids([{"role": "user", "content": args.chat}])
        else:
            prompt_ids = agent.tokenize(args.prompt)
        tokens = agent.generate(prompt_ids, max_new_tokens=args.max_tokens, params=sampling_from_args(args))
        ids = _stream_text(agent, tokens, show=not args.json)
    finally:
        agent.close()
    stats = agent.last_stats.summary()
    result = {"text": agent.detokenize(ids), "token_ids": ids, "stats": stats, "server": agent.settings.server,
              "drafter": agent.drafter.name, "policy": agent.settings.policy, "resumes": agent.backend.resumes}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        print("\n--- round statistics ---")
        for key, value in stats.items():
            print(f"{key:>26}: {value}")
    return 0


def _chat(args) -> int:
    agent = _agent(args)
    params = sampling_from_args(args)
    agent.connect()
    print(f"chatting with {agent.info['model']} via {agent.settings.server} (drafter {agent.drafter.name}, "
          f"policy {agent.settings.policy}); an empty line or Ctrl-D ends", flush=True)
    messages: list[dict] = []
    try:
        while True:
            try:
                line = input("\n> ").strip()
            except EOFError:
                break
            if not line:
                break
            messages.append({"role": "user", "content": line})
            tokens = agent.generate(agent.chat_ids(messages), max_new_tokens=args.max_tokens, params=params)
            ids = _stream_text(agent, tokens, show=True)
            messages.append({"role": "assistant", "content": agent.detokenize(ids)})
            s = agent.last_stats.summary()
            print(f"[{s['new_tokens']} tokens, {s['tokens_per_s']} tok/s, {s['rounds']} rounds, acceptance "
                  f"{s['acceptance_rate']:.0%}]", flush=True)
    finally:
        agent.close()
    return 0


def _serve(args) -> int:
    import uvicorn

    from wisp_edge.local_api import create_app

    agent = _agent(args)
    app = create_app(agent)
    print(f"WISP edge agent: drafter {agent.drafter.name} ({agent.settings.threads} threads), policy "
          f"{agent.settings.policy}, verifier {agent.settings.server}; OpenAI-compatible API on "
          f"http://{agent.settings.host}:{agent.settings.port}/v1", flush=True)
    uvicorn.run(app, host=agent.settings.host, port=agent.settings.port, log_level="warning")
    return 0


def _bench(args) -> int:
    from wisp_edge.bench import bench

    agent = _agent(args)
    try:
        report = bench(agent, extra_rtts_ms=[float(x) for x in args.rtt.split(",")], policies=args.policies.split(","),
                       prompts=args.prompts, tokens=args.tokens, fixed_k=args.fixed_k, k_max=agent.settings.k_max,
                       draft_ahead=args.compare_draft_ahead, repeats=args.repeats,
                       out=(lambda _line: None) if args.json else print)
    finally:
        agent.close()
    if args.json:
        print(json.dumps(report))
    return 0 if report["lossless"] else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wisp-edge", description="WISP edge agent (device side)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("draft", help="greedy-decode with the drafter alone and report its speed")
    add_flags(p, DraftOptions, only=("drafter",))
    p.add_argument("--prompt", required=True)
    p.add_argument("-n", type=int, default=32, help="tokens to draft (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="drafter threads (default: llama.cpp's choice)")
    p.set_defaults(func=_draft)
    p = sub.add_parser("tokenize", help="token ids of a text, as the target's tokenizer produces them")
    add_flags(p, DraftOptions, only=("drafter",))
    p.add_argument("text")
    p.set_defaults(func=_tokenize)
    sub.add_parser("drafters", help="list the shipped drafters").set_defaults(func=_drafters)
    p = sub.add_parser("generate", help="speculative decoding: draft here, verify on a WISP server")
    add_request_flags(p, chat_help="a user message; the served model's chat template is applied")
    _add_agent_flags(p)
    p.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, stats")
    p.add_argument("--json-out", help="also write the result as JSON to this file")
    p.set_defaults(func=_generate)
    p = sub.add_parser("chat", help="a terminal chat through the verifier")
    add_request_flags(p, max_tokens=512)
    _add_agent_flags(p)
    p.set_defaults(func=_chat)
    p = sub.add_parser("serve", help="a local OpenAI-compatible API for programs on this device")
    _add_agent_flags(p, serve=True)
    p.set_defaults(func=_serve)
    p = sub.add_parser("bench", help="tokens/s and wasted drafting of each policy against the verifier")
    p.add_argument("--rtt", default="0", help="extra round trips to emulate, ms, comma-separated (default: 0)")
    p.add_argument("--policies", default="wisp,fixed,sled", help="policies to compare (default: %(default)s)")
    p.add_argument("--fixed-k", type=int, default=4, help="k of the fixed policy (default: %(default)s)")
    p.add_argument("--prompts", type=int, default=3, help="chat questions to run, at most 6 (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=40, help="tokens per answer (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per policy and round trip, policies in rotated order; the median is reported "
                        "(default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON report instead of the table")
    p.add_argument("--compare-draft-ahead", choices=("on", "off", "both"), default="on",
                   help="drafting during verification: on, off, or both side by side (default: %(default)s)")
    _add_agent_flags(p)
    p.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"wisp-edge: error: {exc}", file=sys.stderr)
        return 2
    except VerifierError as exc:
        print(f"wisp-edge: the verifier failed us: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
