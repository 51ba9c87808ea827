"""Saved drafter caches (`state_cache`, wisp_edge/drafters/saved_states.py): two chat clients taking turns on
one agent each prefill only their new message, and the answers stay the target's own greedy answers.

* the store's rules on fake states: what is saved (a reset that drops at least SAVE_MIN_TOKENS), what
  is loaded (the entry that keeps more than the live cache), superseded turns and least recently saved
  out first, capacity 0 saving nothing;
* end to end through the agent and a real verifier on loopback, with the Q4_1 drafter (llama.cpp's
  sequence state copies): conversations A and B interleaved, A1 B1 A2 B2 A3; from each conversation's
  second turn on, the drafter keeps at least its previous prompt and prefills only the rest;
* the setting reaches the drafter and is a `wisp-edge serve` flag only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from wisp_cloud.generate import generate
from wisp_edge.drafters import MODELS_DIR, resolve_drafter_path
from wisp_edge.drafters.base import PrefillCounters
from wisp_edge.drafters.saved_states import SAVE_MIN_TOKENS, SavedStates

MAX_NEW = 16
# Questions with long answers: each turn's cache outgrows the shared system prompt by more than SAVE_MIN_TOKENS.
CHATS = {"A": ["Explain what a CPU does in simple words.", "And what does a GPU do?", "Which is better for games?"],
         "B": ["Write a short poem about the sea.", "Now one about the mountains."]}
ORDER = ["A", "B", "A", "B", "A"]


def test_the_store_saves_loads_supersedes_and_evicts():
    reusable = PrefillCounters().reusable
    store = SavedStates(2)
    a = list(range(100))
    b = list(range(10)) + [500 + i for i in range(40)]
    assert store.switch(a, b, 10, reusable, lambda: "A") is None  # drops 90 of A: saved, nothing to load
    assert [(e.tokens, e.state) for e in store.entries] == [(a, "A")]
    a2 = a + [7, 8, 9]
    loaded = store.switch(b, a2, 10, reusable, lambda: "B")  # back to A: B saved, A loaded and taken out
    assert loaded.state == "A" and reusable(loaded.tokens, a2) == 100
    assert [e.state for e in store.entries] == ["B"]
    few = b[:len(b) - SAVE_MIN_TOKENS + 2]  # keeps all but its last token: drops SAVE_MIN_TOKENS - 1, no copy
    assert store.switch(b, few, reusable(b, few), reusable, lambda: "never") is None and len(store.entries) == 1
    b_longer = b + [1] * 30  # B's next turn, saved: B's earlier turn is superseded
    store.switch(b_longer, a, 10, reusable, lambda: "B2")
    assert [e.state for e in store.entries] == ["B2"]
    store.switch(a, [900] * 40, 0, reusable, lambda: "A again")
    store.switch([900] * 40, [901] * 40, 0, reusable, lambda: "C")
    assert [e.state for e in store.entries] == ["A again", "C"]  # capacity 2: B2, the oldest, went first
    off = SavedStates(0)
    assert off.switch(a, b, 10, reusable, lambda: "x") is None and off.entries == []


def test_the_setting_reaches_the_drafter_and_is_a_serve_flag():
    from wisp_edge.cli import _parser

    parser = _parser()
    assert parser.parse_args(["serve", "--state-cache", "2"]).state_cache == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--prompt", "x", "--state-cache", "2"])


def test_interleaved_conversations_each_prefill_only_their_new_message(verifier, target_model):
    if not Path(resolve_drafter_path("q4", MODELS_DIR)).exists():
        pytest.skip("the Q4_1 drafter is missing; run `python tools/build_models.py`")
    from wisp_edge.agent import EdgeAgent
    from wisp_edge.settings import EdgeSettings

    agent = EdgeAgent(EdgeSettings(server=verifier.url, drafter="q4", threads=1, state_cache=4))
    assert agent.drafter.saved.capacity == 4
    counters = agent.drafter.counters
    messages = {name: [] for name in CHATS}
    last_prompt: dict[str, list[int]] = {}
    try:
        for name in ORDER:
            chat = messages[name]
            chat.append({"role": "user", "content": CHATS[name][len(chat) // 2]})
            ids = agent.chat_ids(chat)
            reused, prefilled = counters.prefix_reused_tokens, counters.prefill_tokens
            got = [t.id for t in agent.generate(ids, max_new_tokens=MAX_NEW)]
            assert got == generate(target_model, ids, max_new_tokens=MAX_NEW, eos_ids=agent.eos_ids), name
            reused, prefilled = counters.prefix_reused_tokens - reused, counters.prefill_tokens - prefilled
            assert prefilled == len(ids) + 1 - reused  # the prompt and the first token, less what was kept
            if name in last_prompt:  # the other conversation ran in between, yet this one's cache came back
                assert reused >= len(last_prompt[name]), (name, reused, len(last_prompt[name]))
            last_prompt[name] = ids
            chat.append({"role": "assistant", "content": agent.detokenize([t for t in got if t not in agent.eos_ids])})
    finally:
        agent.close()
        agent.drafter.close()
