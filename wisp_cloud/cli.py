"""`wisp-cloud`: the verifier's command line.

    wisp-cloud serve                      # the verifier on 127.0.0.1:8000 with the shipped target
    wisp-cloud profile                    # measure the verification time estimator on this device
    wisp-cloud generate --chat "What is the capital of France?"   # in-process speculative decoding
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from wisp_edge.cli_args import add_generation_arguments, sampling_from_args


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="speculative decoding in one process: drafter + target verifier")
    add_generation_arguments(p, chat_help="a user message; the target's chat template is applied")
    p.add_argument("--model", default=None, help="target checkpoint directory (default: models/target)")
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

    if args.threads:
        torch.set_num_threads(args.threads)
    params = sampling_from_args(args)
    pair = LocalPair.load(args.drafter or "q4", args.model or DEFAULT_TARGET, n_threads=args.drafter_threads)
    prompt_ids = pair.chat_prompt_ids(args.chat) if args.chat else pair.drafter.tokenize(args.prompt)
    engine = pair.engine(FixedLength(args.draft_length or 6))
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


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve the verifier: session API, OpenAI-compatible API, /metrics",
                       description="Every option also reads from the environment as WISP_<NAME> "
                                   "(e.g. WISP_API_KEY); flags win.")
    p.add_argument("--model", help="Hugging Face checkpoint directory (default: the shipped target)")
    p.add_argument("--served-model-name", help="model id in the API")
    p.add_argument("--host", help="default 127.0.0.1")
    p.add_argument("--port", type=int, help="default 8000 (0: any free port)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--policy", choices=["wisp", "fcfs"], help="batch scheduler (default wisp)")
    p.add_argument("--api-key", action="append",
                   help="require 'Authorization: Bearer KEY'; repeat or separate with commas for several keys "
                        "(or set WISP_API_KEY)")
    p.add_argument("--api-keys-file", help="more keys, one per line ('#' comments)")
    p.add_argument("--rate-limit-rps", type=float, help="requests per second per API key (default 100; 0: none)")
    p.add_argument("--rate-limit-burst", type=float, help="requests a key may send at once (default 200)")
    p.add_argument("--max-body-mb", type=float, help="largest request body in MiB (default 16; larger: 413)")
    p.add_argument("--body-timeout-s", type=float, help="time a client has to send its body (default 30; then 408)")
    p.add_argument("--protect-docs", action="store_true", default=None,
                   help="also require the key for /openapi.json and /docs")
    p.add_argument("--ssl-certfile", help="serve HTTPS with this PEM certificate (uvicorn's TLS)")
    p.add_argument("--ssl-keyfile", help="the certificate's PEM private key")
    p.add_argument("--kv-budget-mb", type=float, help="KV pool size (default 1 GiB on CPU, half the free GPU)")
    p.add_argument("--kv-block-tokens", type=int, help="KV allocation unit in tokens (default 64)")
    p.add_argument("--max-batch-tokens", type=int, help="new tokens per batched forward (default 2048)")
    p.add_argument("--max-draft", type=int, help="longest draft block accepted (default 32)")
    p.add_argument("--max-sessions", type=int)
    p.add_argument("--max-queue", type=int, help="queued jobs above which new sessions get 429")
    p.add_argument("--max-backlog-ms", type=float, help="predicted queue time above which new sessions get 429")
    p.add_argument("--session-ttl-s", type=float)
    p.add_argument("--default-slo", type=float, help="tokens/s for sessions that name none (default: best effort)")
    p.add_argument("--fcfs-max-batch", type=int)
    p.add_argument("--fcfs-max-wait-ms", type=float)
    p.add_argument("--profile", help="estimator profile JSON (default: next to the model; measured if missing)")
    p.add_argument("--estimator-margin", type=float, help="safety factor on predicted times (default 1.1)")
    p.add_argument("--no-online-refit", dest="online_refit", action="store_false", default=None,
                   help="keep the profile's coefficients instead of refitting from live batches")
    p.add_argument("--log-format", choices=["text", "json"])
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    import uvicorn

    from wisp_cloud import logs
    from wisp_cloud.runtime import build_runtime, settings_from_env_and_args, summary

    options = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    if options.get("api_key"):
        options["api_key"] = ",".join(options["api_key"])
    settings = settings_from_env_and_args(options)
    logs.configure(settings.log_format, settings.log_level)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wisp-cloud", description="WISP verifier (cloud side)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    from wisp_cloud.profiler import register as add_profile

    add_profile(sub)
    _add_generate(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"wisp-cloud: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
