"""Greedy over HTTP equals Hugging Face transformers' own generate() of the shipped target, token for token.

The reference does not use the server's model code: transformers loads models/target and runs its generate()
(greedy, 64 new tokens) on 20 varied chats. The system under test is the edge agent with the Q4_1 llama.cpp
drafter against `wisp-cloud serve` on loopback, four conversations at a time so the verifier batches them.

The only difference allowed is a float near-tie: where transformers' own top-2 logits differ by less than
1e-3, two float32 implementations may round the tie either way, and from there the answers part. So at the
first difference generate()'s gap must be below 1e-3, and every token the system emitted must be transformers'
argmax after the system's own prefix (teacher forcing) or within 1e-3 of it. The test prints the number of
such near-ties and names them if it fails.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest
import torch

from tests.hf_target import chat_ids, hf_target
from tests.results import record
from wisp_edge.agent import EdgeAgent
from wisp_edge.settings import EdgeSettings

MAX_NEW = 64
TIE_GAP = 1e-3  # logits closer than this are a float near-tie: either token is the target's greedy choice

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Explain what a hash table is in two sentences."}],
    [{"role": "user", "content": "What is 17 times 23? Show your working."}],
    [{"role": "user", "content": "Translate 'Where is the train station?' into French, Spanish and German."}],
    [{"role": "user", "content": "Write a Python function that reverses a linked list."}],
    [{"role": "user", "content": "Give me three tips for sleeping better."}],
    [{"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "List the planets of the solar system in order from the sun."}],
    [{"role": "user", "content": "Return a JSON object with the keys name, age and city for a made-up person."}],
    [{"role": "user", "content": "Summarise the plot of Romeo and Juliet."}],
    [{"role": "user", "content": "Quelle est la différence entre un virus et une bactérie ?"}],
    [{"role": "user", "content": "Write a SQL query that counts orders per customer, largest first."}],
    [{"role": "user", "content": "Tell me a short story about a robot who learns to paint."}],
    [{"role": "user", "content": "What are the pros and cons of remote work?"}],
    [{"role": "user", "content": "Convert 100 degrees Fahrenheit to Celsius."}],
    [{"role": "system", "content": "You answer like a pirate."},
     {"role": "user", "content": "How do I boil an egg?"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Now name a fruit of that colour and describe its taste."}],
    [{"role": "user", "content": "Complete the sequence: 2, 4, 8, 16, ..."}],
    [{"role": "user", "content": "Write a limerick about a cat who loves coffee 🐱☕."}],
]


@dataclass
class Reference:
    """transformers' greedy answer (through EOS) and its top-2 logit gap at each step."""

    tokens: list[int]
    gaps: list[float]


@pytest.fixture(scope="module")
def hf():
    return hf_target()


def _hf_generate(tokenizer, model, prompts: list[list[int]], eos: set[int]) -> list[Reference]:
    """One batched generate() (left padding), each answer cut after its first EOS."""
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=MAX_NEW, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True,
                             output_logits=True)
    steps = torch.stack(out.logits, dim=1).float()  # [batch, steps, vocab]
    top2 = steps.topk(2, dim=-1).values  # [batch, steps, 2]
    gaps = (top2[..., 0] - top2[..., 1]).tolist()
    refs = []
    for row, gap in zip(out.sequences[:, batch["input_ids"].shape[1]:].tolist(), gaps):
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        refs.append(Reference(row[:end], gap[:end]))
    return refs


def _forced_ties(model, prompt: list[int], answer: list[int], start: int) -> list[tuple[int, float]]:
    """Teacher forcing from `start`: (position, how far below the max) where the answer is not transformers'
    argmax after the answer's own prefix; each must be a near-tie."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1].float()  # [answer, vocab]
    below = (logits.max(-1).values - logits[torch.arange(len(answer)), torch.tensor(answer)]).tolist()
    return [(i, d) for i, d in enumerate(below) if i >= start and d > 0]


def _system_answers(url: str, chats: list[list[dict]], workers: int = 4) -> tuple[list, list]:
    """The edge agent's greedy answers and prompts, `workers` agents (each its own Q4_1 drafter) at once."""
    answers: list = [None] * len(chats)
    prompts: list = [None] * len(chats)
    drafted_accepted = [0] * workers
    errors: list[BaseException] = []

    def work(w: int) -> None:
        agent = EdgeAgent(EdgeSettings(server=url, drafter="q4", max_wait_s=60))
        try:
            agent.connect()
            for i in range(w, len(chats), workers):
                prompts[i] = agent.chat_ids(chats[i])
                answers[i] = [t.id for t in agent.generate(prompts[i], max_new_tokens=MAX_NEW)]
                drafted_accepted[w] += sum(r.accepted for r in agent.last_stats.rounds)
        except BaseException as e:  # noqa: BLE001  (re-raised in the test's thread)
            errors.append(e)
        finally:
            agent.close()

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    assert sum(drafted_accepted) > len(chats) * MAX_NEW // 4, "the Q4_1 drafter's tokens were rarely accepted"
    return prompts, answers


def test_greedy_over_http_equals_transformers_generate(verifier, hf):
    tokenizer, model = hf
    eos = {tokenizer.eos_token_id, *([model.generation_config.eos_token_id]
                                     if isinstance(model.generation_config.eos_token_id, int)
                                     else model.generation_config.eos_token_id or [])}
    prompts, answers = _system_answers(verifier.url, CHATS)
    hf_prompts = [chat_ids(tokenizer, chat) for chat in CHATS]
    assert prompts == hf_prompts, "the device rendered and tokenized a chat differently from transformers"
    refs = _hf_generate(tokenizer, model, hf_prompts, eos)

    ties, failures, equal = [], [], 0
    for n, (prompt, got, ref) in enumerate(zip(hf_prompts, answers, refs)):
        if got == ref.tokens:
            equal += 1
            continue
        first = next((i for i, (a, b) in enumerate(zip(got, ref.tokens)) if a != b), min(len(got), len(ref.tokens)))
        gap = ref.gaps[first] if first < len(ref.gaps) else None
        if gap is None or gap >= TIE_GAP:
            failures.append(f"chat {n}: token {first} is {got[first:first + 1]} but generate() says "
                            f"{ref.tokens[first:first + 1]} (top-2 gap {gap})")
            continue
        ties.append((n, first, gap))
        for pos, below in _forced_ties(model, prompt, got, first + 1):  # after the tie: still the target's argmax
            if below >= TIE_GAP:
                failures.append(f"chat {n}: after a near-tie at {first}, token {pos} is {below:.3g} below the max")
            else:
                ties.append((n, pos, below))
    summary = (f"{equal}/{len(CHATS)} answers equal to transformers' generate() token for token; "
               f"{len(ties)} near-tie(s) (top-2 logit gap < {TIE_GAP:g}): {ties}")
    print(summary)
    record("greedy_vs_transformers", {"chats": len(CHATS), "max_new_tokens": MAX_NEW, "equal": equal,
                                      "near_ties": [list(t) for t in ties], "tie_gap": TIE_GAP,
                                      "failures": failures})
    assert not failures, "\n".join(failures) + "\n" + summary
