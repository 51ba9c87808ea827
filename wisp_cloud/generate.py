"""The target alone: plain autoregressive decoding, the reference speculative decoding must equal."""

from __future__ import annotations

import torch

from wisp_cloud.model.transformer import RaggedBatch, Transformer, commit
from wisp_cloud.verification import sample_token
from wisp_edge.wire.sampling import SamplingParams


def generate(model: Transformer, prompt_ids: list[int], *, max_new_tokens: int, params: SamplingParams = SamplingParams(),
             eos_ids: tuple[int, ...] = (), generator: torch.Generator | None = None) -> list[int]:
    """New token ids (EOS included when reached), one forward per token after the prefill."""
    cache = model.new_cache(capacity=len(prompt_ids) + max_new_tokens + 1)
    if generator is None and not params.greedy:
        generator = torch.Generator().manual_seed(params.seed if params.seed is not None else torch.seed())
    out: list[int] = []
    pending = list(prompt_ids)
    while len(out) < max_new_tokens:
        batch = RaggedBatch.single(pending, cache)
        logits = model(batch, logit_rows=torch.tensor([len(pending) - 1]))[0]  # [vocab]
        commit(batch, [len(pending)])
        token = sample_token(logits, params, generator)
        out.append(token)
        if token in eos_ids:
            break
        pending = [token]
    return out
