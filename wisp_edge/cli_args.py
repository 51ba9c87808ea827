"""Command-line options shared by `wisp-edge generate` and `wisp-cloud generate`: one spelling of the
text input, the drafting length and the sampling settings for both sides."""

from __future__ import annotations

import argparse

from wisp_edge.sampling import SamplingParams


def add_generation_arguments(p: argparse.ArgumentParser, *, chat_help: str) -> None:
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--chat", help=chat_help)
    text.add_argument("--prompt", help="raw text to continue (no chat template)")
    p.add_argument("--drafter", help="q4 (default) | student | student-f32 | student-onnx | path to .gguf/.onnx")
    p.add_argument("-k", "--draft-length", type=int, help="tokens drafted per round with a fixed length (default 6)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
