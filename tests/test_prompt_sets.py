"""The public prompt sets ship whole, with their licences, and load with a category per prompt."""

from __future__ import annotations

from collections import Counter

from tools import prompt_sets


def test_public_sets_load_whole_with_their_categories_and_licences():
    prompts = prompt_sets.load()
    counts = Counter(p.category for p in prompts)
    assert counts["coding (HumanEval)"] == 164
    assert sum(v for k, v in counts.items() if k != "coding (HumanEval)") == 80 and len(counts) == 9
    assert all(p.text.strip() for p in prompts) and len({p.id for p in prompts}) == len(prompts)
    assert all(p.followup for p in prompts if p.set == "mt_bench")  # MT-Bench is two-turn
    for licence in ("LICENSE.mt_bench", "LICENSE.human_eval"):
        assert (prompt_sets.PROMPTS / licence).stat().st_size > 500


def test_sample_is_balanced_and_deterministic():
    first = prompt_sets.sample(3)
    assert first == prompt_sets.sample(3) and len(first) == 27
    assert set(Counter(p.category for p in first).values()) == {3}
