"""Prefix reuse in both shipped drafters: a reset keeps the cache of the prefix it shares with what the
drafter has evaluated, so a chat's next turn prefills only its new tokens, and nothing else changes.

* the counters: a new turn on top of a generation prefills exactly the new tokens; a sequence that
  diverges mid-way (re-tokenized assistant text) keeps only the true common prefix; a prefix of what
  was evaluated re-evaluates its last token (its logits are what the next draft reads);
* the logits after such a reset equal a fresh drafter's on the same sequence: within 1e-4 with a
  float32 KV cache (0.0 measured for both backends; llama.cpp's default float16 cache rounds a
  one-batch prefill differently from a chunked one, by up to ~0.7 in a logit, so with it the reused
  logits are compared with a fresh drafter fed the same chunks, bit for bit);
* end to end: greedy multi-turn chats through the in-process engine equal the target's own greedy
  answers on every turn, and a seeded sampled chat is the same with the carried-over cache as with a
  cleared one (so the drafter's q is the same distribution either way).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from wisp_cloud.generate import generate
from wisp_cloud.local_pair import LocalPair, chat_prompt_text
from wisp_cloud.tokenizer import target_token_pieces
from wisp_edge.drafters import MODELS_DIR, resolve_drafter_path
from wisp_edge.drafters.base import PrefillCounters, common_prefix_len
from wisp_edge.drafters.counters import DrafterCounters
from wisp_edge.engine import FixedLength
from wisp_edge.wire.sampling import SamplingParams
from wisp_edge.wire.vocab import fingerprint

ATOL = 1e-4
TURN1 = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
TURN2 = "<|im_end|>\n<|im_start|>user\nAnd of Spain? One word.<|im_end|>\n<|im_start|>assistant\n"
QUESTIONS = ["What is the capital of France?", "And of Spain?"]
MAX_NEW = 6


BACKENDS = ["q4", "student-onnx"]  # llama.cpp (the 4-bit GGUF) and onnxruntime (the student's export)


def _load(backend: str, f32_kv: bool = True):
    path = Path(resolve_drafter_path(backend, MODELS_DIR))
    if not path.exists():
        pytest.skip(f"{path} missing; run `python tools/build_models.py`")
    if path.suffix == ".onnx":
        from wisp_edge.drafters.onnx import OnnxDrafter

        return OnnxDrafter(path, n_threads=1)
    from wisp_edge.drafters.llama_cpp import LlamaCppDrafter

    return LlamaCppDrafter(path, n_threads=1, f32_kv=f32_kv)


@pytest.fixture(scope="module", params=BACKENDS)
def drafter(request):
    d = _load(request.param)
    yield d
    d.close()


@pytest.fixture
def pair(drafter, target_model):
    target_dir = MODELS_DIR / "target"
    pieces = target_token_pieces(target_dir, target_model.args.vocab_size)
    return LocalPair(target_model, target_dir, drafter, fingerprint(pieces))


def fresh_logits(drafter, tokens: list[int]) -> np.ndarray:
    """The logits of a drafter with nothing cached (a reset to nothing drops the whole cache)."""
    drafter.reset([])
    drafter.reset(tokens)
    return drafter.logits()


def generation(drafter, prompt: list[int], n: int = 6, rejected: int = 2) -> list[int]:
    """Draft n greedy tokens on top of `prompt`, then roll back the last `rejected`: the committed tokens."""
    drafter.reset(prompt)
    for _ in range(n):
        drafter.append(int(np.argmax(drafter.logits())))
    drafter.truncate(len(drafter.tokens) - rejected)
    return drafter.tokens


def counted(drafter, tokens: list[int]) -> tuple[np.ndarray, int, int]:
    """Reset to `tokens` and evaluate: (logits, tokens prefilled, cache positions reused)."""
    c = drafter.counters
    prefilled, reused = c.prefill_tokens, c.prefix_reused_tokens
    drafter.reset(tokens)
    logits = drafter.logits()
    return logits, c.prefill_tokens - prefilled, c.prefix_reused_tokens - reused


def test_a_new_turn_prefills_only_its_new_tokens(drafter):
    committed = generation(drafter, drafter.tokenize(TURN1))
    turn2 = committed + drafter.tokenize(TURN2)
    got, prefilled, reused = counted(drafter, turn2)
    assert reused == len(committed) and prefilled == len(turn2) - len(committed)
    assert np.abs(got - fresh_logits(drafter, turn2)).max() < ATOL


def test_a_diverging_sequence_keeps_only_the_true_common_prefix(drafter):
    committed = generation(drafter, drafter.tokenize(TURN1), n=8, rejected=0)
    split = len(committed) - 5  # as when the assistant's text re-tokenizes differently from what was generated
    other = [t for t in drafter.tokenize(" Paris is the capital.") if t != committed[split]]
    diverged = committed[:split] + other + drafter.tokenize(TURN2)
    got, prefilled, reused = counted(drafter, diverged)
    assert reused == split and prefilled == len(diverged) - split
    assert np.abs(got - fresh_logits(drafter, diverged)).max() < ATOL


def test_a_prefix_of_the_cache_re_evaluates_its_last_token(drafter):
    committed = generation(drafter, drafter.tokenize(TURN1))
    shorter = committed[:-3]
    got, prefilled, reused = counted(drafter, shorter)
    assert (reused, prefilled) == (len(shorter) - 1, 1)
    want = fresh_logits(drafter, shorter)
    assert np.abs(got - want).max() < ATOL
    again, prefilled, reused = counted(drafter, shorter)  # the same sequence again: nothing or its last token
    assert reused + prefilled == len(shorter) and prefilled <= 1
    assert np.abs(again - want).max() < ATOL


def test_the_default_float16_cache_reuses_exactly_what_chunks_compute():
    """llama.cpp's shipped configuration: the reused cache gives bit for bit the logits of a fresh drafter
    that evaluated the same chunks (no stale position survives the cut)."""
    drafter = _load("q4", f32_kv=False)
    try:
        committed = generation(drafter, drafter.tokenize(TURN1), n=4, rejected=1)
        turn2 = committed + drafter.tokenize(TURN2)
        reused_logits = counted(drafter, turn2)[0]
        drafter.reset([])  # the same chunks from scratch: the prompt, 3 single steps, the new turn
        drafter.reset(drafter.tokenize(TURN1))
        drafter.logits()
        for token in committed[len(drafter.tokens):]:
            drafter.append(token)
            drafter.logits()
        for token in turn2[len(committed):]:
            drafter.append(token)
        assert np.array_equal(drafter.logits(), reused_logits)
    finally:
        drafter.close()


def test_counters_logic_and_prometheus_export():
    c = PrefillCounters()
    assert common_prefix_len([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix_len([], [1]) == 0
    assert c.reusable([1, 2, 3], [1, 2, 3, 4]) == 3
    assert c.reusable([1, 2, 3], [1, 2]) == 1  # the logits after 2 must be recomputed
    assert c.reusable([1, 2, 3], [1, 2, 3]) == 2 and c.reusable([1, 2, 3], [1, 2, 3], logits_held=True) == 3
    c.reset(3)
    c.evaluated(1)
    c.evaluated(1)  # a draft step after the prefill is not a prefill
    assert (c.prefill_tokens, c.prefix_reused_tokens) == (1, 3)
    from prometheus_client import CollectorRegistry, generate_latest

    class Fake:
        counters = c

    registry = CollectorRegistry()
    registry.register(DrafterCounters(Fake()))
    text = generate_latest(registry).decode()
    assert "wisp_edge_drafter_prefill_tokens_total 1.0" in text
    assert "wisp_edge_drafter_prefix_reused_tokens_total 3.0" in text


def _chat(pair, answers: list[str]) -> list[int]:
    """The prompt ids of a chat whose earlier questions got `answers`, asking the next question."""
    messages = []
    for question, answer in zip(QUESTIONS, answers + [None]):
        messages.append({"role": "user", "content": question})
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return pair.drafter.tokenize(chat_prompt_text(pair.target_dir, messages))


@lru_cache(maxsize=None)
def reference(model, ids: tuple[int, ...], eos_ids: tuple[int, ...]) -> list[int]:
    """The target's own greedy answer (both backends ask the same questions: computed once)."""
    return generate(model, list(ids), max_new_tokens=MAX_NEW, eos_ids=eos_ids)


def test_greedy_multi_turn_chat_is_lossless_and_reuses_the_conversation(pair):
    engine = pair.engine(FixedLength(4))
    counters = pair.drafter.counters
    answers: list[str] = []
    for turn in range(2):
        ids = _chat(pair, answers)
        reused, prefilled = counters.prefix_reused_tokens, counters.prefill_tokens
        got = [t.id for t in engine.generate(ids, max_new_tokens=MAX_NEW)]
        assert got == reference(pair.model, tuple(ids), pair.eos_ids), f"turn {turn}"
        if turn:  # the drafter prefilled (prompt + the first token) less what it kept of the last turn
            assert counters.prefix_reused_tokens - reused >= len(_chat(pair, answers[:-1]))
            assert counters.prefill_tokens - prefilled == len(ids) + 1 - (counters.prefix_reused_tokens - reused)
        answers.append(pair.drafter.detokenize([t for t in got if t not in pair.eos_ids]))


def test_sampled_next_turn_is_the_same_with_a_cleared_cache(pair):
    """The same seed gives the same answer whether the drafter kept the conversation or started afresh:
    the drafter's q (and so the verifier's accept/reject draws) did not change."""
    engine = pair.engine(FixedLength(3), decode_while_prefilling=False, draft_ahead=False)
    pair.drafter.reset(_chat(pair, []) + pair.drafter.tokenize("Paris is the capital of France."))
    pair.drafter.logits()  # the previous turn, as its generation left the cache
    ids = _chat(pair, ["Paris is the capital of France."])
    params = SamplingParams(0.9, seed=1)
    kept = [t.id for t in engine.generate(ids, max_new_tokens=MAX_NEW, params=params)]
    assert pair.drafter.counters.prefix_reused_tokens > len(_chat(pair, []))
    pair.drafter.reset([])
    assert [t.id for t in engine.generate(ids, max_new_tokens=MAX_NEW, params=params)] == kept
