"""What a `generate` command takes on either side (`wisp-edge generate` over HTTP, `wisp-cloud generate` in
one process): the drafting options both settings classes inherit, and the request's flags (the text, its
length and the sampling settings, those derived from `SamplingParams`)."""

from __future__ import annotations

import argparse

from pydantic import BaseModel, Field

from wisp_edge.wire.flags import add_flags, given
from wisp_edge.wire.paths import DEFAULT_DRAFTER, SHIPPED_DRAFTERS
from wisp_edge.wire.sampling import SamplingParams


class DraftOptions(BaseModel):
    """The drafter and the fixed drafting length, shared by the edge agent's settings and the local pair's."""

    drafter: str = Field(DEFAULT_DRAFTER, description=" | ".join(SHIPPED_DRAFTERS) + " | a .gguf/.onnx path")
    draft_length: int = Field(6, ge=1, description="tokens per draft with the fixed policy (on the edge, giving "
                                                   "it without --policy selects fixed)",
                              json_schema_extra={"cli_flags": ("-k",)})


def add_request_flags(p: argparse.ArgumentParser, *, chat_help: str | None = None, max_tokens: int = 128) -> None:
    """--chat/--prompt (only with `chat_help`), --max-tokens and the sampling flags."""
    if chat_help is not None:
        text = p.add_mutually_exclusive_group(required=True)
        text.add_argument("--chat", help=chat_help)
        text.add_argument("--prompt", help="raw text to continue (no chat template)")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens to generate (default: %(default)s)")
    add_flags(p, SamplingParams)


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(**given(args, SamplingParams))
