"""`--prefill-wait-s` reorders batches (a prefill that waited its budget leads the next one); the answers stay
the target's own greedy tokens. Three edge agents with the Q4_1 drafter answer at once against a verifier
whose budget is 1 ms, so every prefill and resume goes first into batches holding the others' verify blocks."""

from __future__ import annotations

import threading

from tests.live_server import LiveServer
from wisp_cloud.generate import generate
from wisp_edge.agent import EdgeAgent
from wisp_edge.settings import EdgeSettings

QUESTIONS = ("Name three fruits.", "Why is the sky blue?", "Write a haiku about rain.")
TOKENS = 24


def test_prefills_that_go_first_keep_every_answer_lossless(tmp_path, profile_path, target_model):
    with LiveServer("--threads", "1", "--profile", str(profile_path), "--log-level", "warning",
                    "--prefill-wait-s", "0.001", log_path=tmp_path / "server.log") as server:
        agents = [EdgeAgent(EdgeSettings(server=server.url, drafter="q4", max_wait_s=30)) for _ in QUESTIONS]
        try:
            for a in agents:
                a.connect()
            prompts = [a.chat_ids([{"role": "user", "content": q}]) for a, q in zip(agents, QUESTIONS)]
            got: dict[int, list[int]] = {}

            def answer(i: int) -> None:
                got[i] = [t.id for t in agents[i].generate(prompts[i], max_new_tokens=TOKENS)]

            threads = [threading.Thread(target=answer, args=(i,)) for i in range(len(agents))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            for a in agents:
                a.close()
    for i, prompt in enumerate(prompts):
        assert got[i] == generate(target_model, prompt, max_new_tokens=TOKENS, eos_ids=agents[i].eos_ids), QUESTIONS[i]
