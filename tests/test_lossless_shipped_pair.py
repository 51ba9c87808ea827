"""Greedy speculative decoding with the shipped drafters equals the target's own greedy output,
token for token, over varied chat prompts and every draft length 1..8, with EOS and budget edges."""

from functools import lru_cache

import pytest

from wisp_cloud.generate import generate
from wisp_edge.engine import FixedLength

PROMPTS = [
    "What is the capital of France?",  # short answer that ends in EOS
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three prime numbers and add them up.",
    "Translate 'good morning' into Spanish and German.",
    "def fibonacci(n):\n    # complete this Python function",
    "Give me a tip for sleeping better.",
    "Why is the sky blue?",
]
MAX_NEW = 24


@lru_cache(maxsize=None)
def reference(model, prompt_ids: tuple, max_new: int) -> list[int]:
    return generate(model, list(prompt_ids), max_new_tokens=max_new, eos_ids=tuple(model.args.eos_token_ids))


def check_pair(pair, k, prompts, max_new=MAX_NEW):
    engine = pair.engine(FixedLength(k))
    for text in prompts:
        ids = tuple(pair.chat_prompt_ids(text))
        got = [t.id for t in engine.generate(list(ids), max_new_tokens=max_new)]
        assert got == reference(pair.model, ids, max_new), f"k={k} prompt={text!r}"
    return engine


@pytest.mark.parametrize("k", range(1, 9))
def test_q4_drafter_is_lossless(q4_pair, k):
    engine = check_pair(q4_pair, k, PROMPTS)
    assert engine.stats.rounds, "speculation ran"


@pytest.mark.parametrize("k", range(1, 9))
def test_student_drafter_is_lossless(student_pair, k):
    check_pair(student_pair, k, PROMPTS[k % 4::4])


def test_eos_ends_the_answer(q4_pair):
    ids = q4_pair.chat_prompt_ids(PROMPTS[0])
    got = [t.id for t in q4_pair.engine(FixedLength(8)).generate(ids, max_new_tokens=64)]
    assert got[-1] in q4_pair.eos_ids and len(got) < 64
    assert q4_pair.drafter.detokenize(got).startswith("The capital of France is Paris.")


@pytest.mark.parametrize("max_new", [1, 2, 3, 9])
def test_budget_edges(q4_pair, max_new):
    check_pair(q4_pair, 8, PROMPTS[1:3], max_new=max_new)


LONG_PROMPT = ("Summarise the following notes in one sentence. " + "The verifier runs on a GPU in the cloud; the "
               "drafter runs on the phone and proposes a few tokens at a time, and the verifier checks them. " * 12)


def test_verifier_decodes_while_the_drafter_prefills_a_long_prompt(q4_pair):
    """A long prompt takes the Q4_1 drafter long enough to prefill that the verifier decodes the first tokens
    alone; the answer is still the target's greedy one, and the same as when the engine waits."""
    import torch

    ids = q4_pair.chat_prompt_ids(LONG_PROMPT)
    assert len(ids) > 200
    want = reference(q4_pair.model, tuple(ids), 64)
    overlapped = q4_pair.engine(FixedLength(4))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core for the verifier, one for the drafter's prefill, as on a real device
    try:
        got = [t.id for t in overlapped.generate(ids, max_new_tokens=64)]
    finally:
        torch.set_num_threads(threads)
    assert got == want
    assert overlapped.stats.cloud_rounds > 0 and overlapped.stats.drafter_prefill_ms > 0
    assert any(r.drafted for r in overlapped.stats.rounds), "the drafter caught up and drafted"
    waiting = q4_pair.engine(FixedLength(4), decode_while_prefilling=False)
    assert [t.id for t in waiting.generate(ids, max_new_tokens=64)] == want
    assert waiting.stats.cloud_rounds == 0
