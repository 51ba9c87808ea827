"""`wisp-cloud`: the verifier's command line.

    wisp-cloud serve                      # the verifier on 127.0.0.1:8000 with the shipped target
    wisp-cloud serve --replicas 4         # four replicas behind one endpoint (Ray Serve; the 'cluster' extra)
    wisp-cloud profile                    # measure the verification time estimator on this device
    wisp-cloud generate --chat "What is the capital of France?"   # in-process speculative decoding
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from wisp_cloud.settings import PairOptions, ProfileOptions, ServeSettings
from wisp_edge.wire.flags import add_flags, given
from wisp_edge.wire.options import add_request_flags, sampling_from_args


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="speculative decoding in one process: drafter + target verifier")
    add_request_flags(p, chat_help="a user message; the target's chat template is applied")
    add_flags(p, PairOptions)
    p.add_argument("--compare", action="store_true", help="also decode with the target alone and print the speed-up")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=_generate)


def _generate(args) -> int:
    import torch

    from wisp_cloud.generate import generate
    from wisp_cloud.local_pair import LocalPair
    from wisp_edge.engine import FixedLength  # the in-process pair runs the edge engine

    options = PairOptions(**given(args, PairOptions))
    if options.threads:
        torch.set_num_threads(options.threads)
    params = sampling_from_args(args)
    pair = LocalPair.load(options.drafter, options.model, n_threads=options.drafter_threads)
    prompt_ids = pair.chat_prompt_ids(args.chat) if args.chat else pair.drafter.tokenize(args.prompt)
    engine = pair.engine(FixedLength(options.draft_length))
    tokens = []
    for token in engine.generate(prompt_ids, max_new_tokens=args.max_tokens, params=params):
        tokens.append(token)
        if not args.json:
            print(pair.drafter.detokenize([token.id]), end="", flush=True)
    ids = [t.id for t in tokens]
    result = {"text": pair.drafter.detokenize(ids), "token_ids": ids, "drafter": pair.drafter.name,
              "draft_length": options.draft_length, "stats": engine.stats.summary()}
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


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve the verifier: session API, OpenAI-compatible API, /metrics",
                       description="Every option also reads from the environment as WISP_<NAME> "
                                   "(e.g. WISP_API_KEY); flags win.")
    add_flags(p, ServeSettings)
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    import uvicorn

    from wisp_cloud import logs
    from wisp_cloud.runtime import build_runtime, settings_from_env_and_args, summary

    settings = settings_from_env_and_args(given(args, ServeSettings))
    logs.configure(settings.log_format, settings.log_level)
    if settings.clustered:  # Ray is imported only here: one replica runs without it
        from wisp_cloud.cluster.app import serve

        return serve(settings)
    runtime = build_runtime(settings)
    app = runtime.app()
    tls = {"ssl_certfile": str(settings.ssl_certfile), "ssl_keyfile": str(settings.ssl_keyfile)} \
        if settings.ssl_certfile else {}
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=settings.log_level == "debug", timeout_graceful_shutdown=5, **tls)
    server = uvicorn.Server(config)
    text = summary(runtime)
    if settings.port == 0:
        text = text.replace(f":{settings.port} ", ":<any free port> ")
    print(text, flush=True)
    server.run()
    return 0


def _add_profile(sub) -> None:
    p = sub.add_parser("profile", help="time batched verify forwards and fit the verification time estimator")
    add_flags(p, ProfileOptions)
    p.set_defaults(func=_profile)


def _profile(args) -> int:
    from wisp_cloud.profiler import profile_and_save

    print(profile_and_save(ProfileOptions(**given(args, ProfileOptions))))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wisp-cloud", description="WISP verifier (cloud side)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_profile(sub)
    _add_generate(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"wisp-cloud: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
