"""The bench's stop rule with hindsight (`wisp_edge.bench.OracleStop`) is what it claims to be.

It bounds what any stop rule could gain on the bench's prompts, so it must be a true oracle: with the
real student drafter against the real verifier it drafts only tokens the target accepts, except a
block's first (a rule decides only after a token is drafted), and the answer stays the target's.
"""

from __future__ import annotations

from wisp_cloud.generate import generate
from wisp_edge.agent import EdgeAgent
from wisp_edge.bench import OracleStop, run_policy
from wisp_edge.settings import EdgeSettings

TOKENS = 32


def test_the_oracle_never_drafts_past_a_rejection_and_keeps_the_target_answer(verifier, target_model):
    agent = EdgeAgent(EdgeSettings(server=verifier.url, drafter="student", max_wait_s=30,
                                   decode_while_prefilling=False, state_cache=0))
    try:
        agent.connect()
        prompts = [agent.chat_ids([{"role": "user", "content": q}])
                   for q in ("Name three fruits.", "Why is the sky blue?")]
        answers = [generate(target_model, p, max_new_tokens=TOKENS, eos_ids=agent.eos_ids) for p in prompts]
        oracle = OracleStop(agent.drafter, k_max=8)
        for prompt, answer in zip(prompts, answers):
            oracle.learn(prompt, answer)
        rounds = []
        for prompt, answer in zip(prompts, answers):
            result = run_policy(agent, "oracle", 0.0, [prompt], TOKENS, k_max=8, draft_ahead=False, oracle=oracle)
            assert result.outputs == [answer]
            rounds += result.rounds
    finally:
        agent.close()
    drafting = [r for r in rounds if r.drafted]
    assert drafting, "the oracle drafted"
    for r in drafting:
        assert r.accepted == r.drafted or (r.drafted == 1 and r.accepted == 0), (r.drafted, r.accepted)
    assert sum(r.wasted_drafting_ms for r in drafting) == 0.0
    assert max(r.drafted for r in drafting) > 1, "accepted runs were drafted whole, not one token at a time"
