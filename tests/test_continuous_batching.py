"""Centralized decoding is continuously batched: each session's next decode step is queued by the batch loop
as its step finishes, so sessions decoding together share every forward, and each gets the very tokens it gets alone. (Queued by the decoding coroutine
when it resumed, the step missed the next batch whenever other work waited, and two sessions took turns:
tools/validate.py measured two devices at 0.9x the tokens/s of one.)"""

from __future__ import annotations

import json
import threading

import httpx

from tests.live_server import LiveServer, tiny_checkpoint

TOKENS = 200  # long enough that the streams' staggered starts (a tiny model's step is a millisecond) weigh little
STREAMS = 3


def _stream(url: str, prompt: list[int], out: dict) -> None:
    """Stream a greedy completion; out[first prompt id] = the text of each event (one per token)."""
    body = {"prompt": prompt, "max_tokens": TOKENS, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as reply:
        reply.raise_for_status()
        out[prompt[0]] = [json.loads(line[len("data: "):])["choices"][0]["text"]
                          for line in reply.iter_lines() if line.startswith("data: {")]


def test_sessions_decoding_together_share_their_forwards(tmp_path):
    model = tiny_checkpoint(tmp_path / "tiny", max_seq_len=512)
    with LiveServer("--model", str(model), "--threads", "1", "--log-level", "warning", "--rate-limit-rps", "0",
                    log_path=tmp_path / "log") as server:
        before = httpx.get(f"{server.url}/health").json()["batches_run"]
        prompts = [[1 + i, 2, 3, 4, 5] for i in range(STREAMS)]
        together: dict[int, list[str]] = {}
        threads = [threading.Thread(target=_stream, args=(server.url, p, together)) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        batches = httpx.get(f"{server.url}/health").json()["batches_run"] - before
        alone: dict[int, list[str]] = {}
        for p in prompts:
            _stream(server.url, p, alone)
    assert len(together) == STREAMS and min(map(len, together.values())) >= TOKENS, \
        "every stream got all its tokens (one event each)"
    assert together == alone, "sharing forwards changed no session's tokens"
    # Taking turns costs one forward per token per session (3 x 200); sharing, about one per step, plus the
    # prefills and the steps run before every stream has joined or after the first has ended.
    assert batches <= 1.5 * TOKENS, f"{batches} forwards for {STREAMS} x {TOKENS} decoded tokens"
