"""The llama.cpp drafter's context grows on demand (wisp_edge/drafters/llama_cpp.py `INITIAL_CTX`): it starts
small, so the KV cache it allocates whole is sized to a chat's first turns, and a longer sequence swaps in a
larger context that carries the cache over. The logits after the growth equal a drafter's that evaluated the
sequence in one go (float32 KV, within 1e-4), whether the growth came from a reset or from drafting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wisp_edge.drafters import MODELS_DIR, resolve_drafter_path
from wisp_edge.drafters.llama_cpp import INITIAL_CTX, LlamaCppDrafter

ATOL = 1e-4
TEXT = "The quick brown fox jumps over the lazy dog while the cat counts to {}. "


@pytest.fixture(scope="module")
def tokens():
    path = Path(resolve_drafter_path("q4", MODELS_DIR))
    if not path.exists():
        pytest.skip(f"{path} missing; run `python tools/build_models.py`")
    d = LlamaCppDrafter(path, n_ctx=64, n_threads=1)
    ids = d.tokenize("".join(TEXT.format(i) for i in range(120)))
    d.close()
    assert len(ids) > INITIAL_CTX + 200
    return ids[:INITIAL_CTX + 200]


def _drafter() -> LlamaCppDrafter:
    return LlamaCppDrafter(resolve_drafter_path("q4", MODELS_DIR), n_ctx=2 * INITIAL_CTX, n_threads=1, f32_kv=True)


def _fresh(tokens: list[int]) -> np.ndarray:
    d = _drafter()
    try:
        d.reset(tokens)
        return d.logits()
    finally:
        d.close()


def test_a_reset_past_the_initial_context_grows_it_and_keeps_the_cache(tokens):
    d = _drafter()
    try:
        assert d._llm.n_ctx() == INITIAL_CTX and d.n_ctx == 2 * INITIAL_CTX
        d.reset(tokens[:600])
        d.logits()
        before = d.counters.prefix_reused_tokens
        d.reset(tokens)
        got = d.logits()
        assert d._llm.n_ctx() == 2 * INITIAL_CTX
        assert d.counters.prefix_reused_tokens - before == 600  # the cache came over to the larger context
        assert np.abs(got - _fresh(tokens)).max() < ATOL
    finally:
        d.close()


def test_drafting_past_the_initial_context_grows_it(tokens):
    d = _drafter()
    try:
        d.reset(tokens[:INITIAL_CTX - 10])
        d.logits()
        for t in tokens[INITIAL_CTX - 10:]:
            d.append(t)
        got = d.logits()
        assert d._llm.n_ctx() == 2 * INITIAL_CTX
        assert np.abs(got - _fresh(tokens)).max() < ATOL
        with pytest.raises(ValueError, match="exceeds the drafter's context"):
            d.reset([1] * (2 * INITIAL_CTX + 1))
            d.logits()
    finally:
        d.close()
