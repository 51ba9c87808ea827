"""The real verifier server on loopback with the shipped models: the session API through the edge's HTTP
client, centralized OpenAI-compatible decoding, refusals, idempotent rounds, metrics and the schema.

Greedy output over HTTP must equal the target's own greedy decode, token for token.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MODELS
from tests.live_server import LiveServer
from wisp_cloud.generate import generate
from wisp_edge.client import HttpVerifier, VerifierRequestError
from wisp_edge.drafters import load_drafter
from wisp_edge.engine import FixedLength, SpeculativeEngine

API_KEY = "test-key-123"
QUESTIONS = ["What is the capital of France?", "Name three colours of the rainbow.",
             "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def server(tmp_path_factory, profile_path):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with LiveServer("--threads", "1", "--profile", str(profile_path), "--log-level", "warning",
                    log_path=log, api_key=API_KEY) as live:
        yield live


@pytest.fixture(scope="module")
def http(server):
    with server.client() as client:
        yield client


@pytest.fixture(scope="module")
def info(http):
    return http.get("/v1/info").json()


def _engine(server, info, drafter, k=4):
    """Drafting from the first round (the drafter prefills first), so acceptance is measured on every token
    whatever the machine's load; the overlapped start has its own tests."""
    backend = HttpVerifier(server.url, api_key=API_KEY)
    engine = SpeculativeEngine(drafter, backend, FixedLength(k), eos_ids=tuple(info["eos_token_ids"]),
                               vocab_fingerprint=info["vocab_fingerprint"], decode_while_prefilling=False)
    return engine, backend


def test_speculative_sessions_over_http_equal_the_target_greedy(server, info, q4_pair, target_model):
    engine, backend = _engine(server, info, q4_pair.drafter, k=5)
    for question in QUESTIONS:
        prompt = q4_pair.chat_prompt_ids(question)
        got = [t.id for t in engine.generate(prompt, max_new_tokens=40)]
        want = generate(target_model, prompt, max_new_tokens=40, eos_ids=q4_pair.eos_ids)
        assert got == want, question
        assert engine.stats.acceptance_rate > 0.5  # the Q4_1 copy agrees with its own float32 target
    backend.close()


def test_concurrent_sessions_share_batches_and_stay_lossless(server, info, q4_pair, target_model):
    drafters = [q4_pair.drafter, load_drafter("q4", n_threads=1)]
    prompts = [q4_pair.chat_prompt_ids(q) for q in QUESTIONS[:2]]
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        engine, backend = _engine(server, info, drafters[i], k=3)
        results[i] = [t.id for t in engine.generate(prompts[i], max_new_tokens=48)]
        backend.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, prompt in enumerate(prompts):
        assert results[i] == generate(target_model, prompt, max_new_tokens=48, eos_ids=q4_pair.eos_ids)


def test_centralized_completions_equal_the_target_greedy(http, info, q4_pair, target_model):
    from wisp_cloud.tokenizer import load_tokenizer

    tok = load_tokenizer(MODELS / "target")
    prompt = "The three primary colours are"
    ids = tok.encode(prompt).ids
    want = tok.decode(generate(target_model, ids, max_new_tokens=20, eos_ids=q4_pair.eos_ids),
                      skip_special_tokens=True)
    r = http.post("/v1/completions", json={"model": info["model"], "prompt": prompt, "max_tokens": 20,
                                           "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == want
    assert body["usage"]["prompt_tokens"] == len(ids) and body["usage"]["completion_tokens"] == 20
    assert body["choices"][0]["finish_reason"] == "length"

    # Chat: the model's template, stopped by EOS; streaming gives the same text in pieces.
    question = "What is the capital of France?"
    chat_ids = q4_pair.chat_prompt_ids(question)
    greedy = generate(target_model, chat_ids, max_new_tokens=40, eos_ids=q4_pair.eos_ids)
    want_chat = tok.decode(greedy, skip_special_tokens=True)
    request = {"model": "default", "messages": [{"role": "user", "content": question}], "temperature": 0,
               "max_tokens": 40}
    r = http.post("/v1/chat/completions", json=request)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == want_chat
    assert r.json()["choices"][0]["finish_reason"] == ("stop" if greedy[-1] in q4_pair.eos_ids else "length")

    pieces, done = [], False
    with http.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            assert chunk["object"] == "chat.completion.chunk"
            pieces.append(chunk["choices"][0]["delta"].get("content", ""))
    assert done and len(pieces) > 2 and "".join(pieces) == want_chat


def test_stop_strings_cut_the_text(http):
    r = http.post("/v1/completions", json={"prompt": "1, 2, 3, 4,", "max_tokens": 30, "temperature": 0,
                                           "stop": [" 7"]})
    text = r.json()["choices"][0]["text"]
    assert r.json()["choices"][0]["finish_reason"] == "stop" and " 7" not in text and text.startswith(" 5")


def test_refusals_carry_codes_and_reasons(server, http, info, q4_pair):
    prompt = q4_pair.chat_prompt_ids("Hello")
    assert httpx.post(f"{server.url}/v1/sessions", json={"prompt_ids": prompt}).status_code == 401
    wrong = httpx.post(f"{server.url}/v1/sessions", json={"prompt_ids": prompt},
                       headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"

    def refused(r, status, code):
        assert r.status_code == status, r.text
        assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
        return r.json()["error"]

    vocab = info["vocab_size"]
    refused(http.post("/v1/sessions", json={"prompt_ids": [1, vocab]}), 422, "invalid_request")
    refused(http.post("/v1/sessions", json={"prompt_ids": []}), 422, "invalid_request")
    refused(http.post("/v1/sessions", json={"prompt_ids": prompt, "vocab_fingerprint": "1:abc"}), 422,
            "vocab_mismatch")
    refused(http.post("/v1/sessions", json={"prompt_ids": prompt, "sampling": {"temperature": -1}}), 422,
            "invalid_request")
    refused(http.post("/v1/sessions/nope/verify", json={"position": 3, "round_id": 1, "draft_ids": []}), 404,
            "unknown_session")
    refused(http.post("/v1/completions", json={"model": "gpt-9", "prompt": "hi"}), 404, "model_not_found")
    refused(http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 10**6}), 400, "context_length_exceeded")

    created = http.post("/v1/sessions", json={"prompt_ids": prompt, "vocab_fingerprint": info["vocab_fingerprint"]})
    assert created.status_code == 201, created.text
    sid, first = created.json()["session_id"], created.json()["first_token"]
    position = len(prompt) + 1
    assert created.json()["position"] == position
    verify = f"/v1/sessions/{sid}/verify"
    refused(http.post(verify, json={"position": position, "round_id": 1, "draft_ids": [vocab + 5]}), 422,
            "invalid_request")
    refused(http.post(verify, json={"position": position, "round_id": 1, "draft_ids": [1] * 40}), 422,
            "invalid_request")
    stale = refused(http.post(verify, json={"position": position - 1, "round_id": 1, "draft_ids": [5]}), 409,
                    "stale_position")
    assert stale["committed"] == position

    # A retried round gets the very same answer, not a second verification.
    block = {"position": position, "round_id": 7, "draft_ids": [first, first]}
    a = http.post(verify, json=block)
    b = http.post(verify, json=block)
    assert a.status_code == b.status_code == 200
    assert (a.json()["accepted"], a.json()["token"], a.json()["position"]) == \
        (b.json()["accepted"], b.json()["token"], b.json()["position"])
    assert b.json()["replayed"] and not a.json()["replayed"]
    assert a.json()["token_ms"] > 0  # what a third draft token would have added: the edge's bound prices it
    assert http.delete(f"/v1/sessions/{sid}").status_code == 204
    refused(http.post(verify, json=block), 404, "unknown_session")

    # A sampling session needs one q per draft token, each a distribution that could have drawn it.
    sampled = http.post("/v1/sessions", json={"prompt_ids": prompt, "sampling": {"temperature": 0.8, "seed": 1}})
    sid2, pos2 = sampled.json()["session_id"], sampled.json()["position"]
    v2 = f"/v1/sessions/{sid2}/verify"
    refused(http.post(v2, json={"position": pos2, "round_id": 1, "draft_ids": [5, 6]}), 422, "invalid_request")
    refused(http.post(v2, json={"position": pos2, "round_id": 1, "draft_ids": [5],
                                "q": [{"ids": [6, 7], "probs": [0.5, 0.5]}]}), 422, "invalid_request")
    refused(http.post(v2, json={"position": pos2, "round_id": 1, "draft_ids": [5],
                                "q": [{"ids": [5, 7], "probs": [0.9, 0.5]}]}), 422, "invalid_request")
    ok = http.post(v2, json={"position": pos2, "round_id": 1, "draft_ids": [5],
                             "q": [{"ids": [5, 7], "probs": [0.5, 0.5]}]})
    assert ok.status_code == 200, ok.text


def test_sampling_session_through_the_client(server, info, q4_pair):
    from wisp_edge.wire.sampling import SamplingParams

    engine, backend = _engine(server, info, q4_pair.drafter, k=4)
    prompt = q4_pair.chat_prompt_ids("Tell me a short story about a cat.")
    tokens = [t.id for t in engine.generate(prompt, max_new_tokens=30, params=SamplingParams(0.8, 40, 0.95, 3))]
    assert 1 <= len(tokens) <= 30 and all(0 <= t < info["vocab_size"] for t in tokens)
    assert engine.stats.rounds and engine.stats.acceptance_rate > 0.2
    backend.close()


def test_metrics_scrape_cleanly_and_count_the_work(http):
    r = http.get("/metrics")
    assert r.status_code == 200
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    assert families and all(name.startswith("wisp_") for name in families)
    samples = {s.name: s.value for f in families.values() for s in f.samples if not s.labels}
    assert samples["wisp_batch_size_count"] > 0
    assert samples["wisp_drafted_tokens_total"] >= samples["wisp_accepted_tokens_total"] > 0
    assert samples["wisp_kv_budget_bytes"] > 0
    rejected = {s.labels["reason"]: s.value for s in families["wisp_rejected_requests"].samples
                if s.name.endswith("_total")}
    assert rejected.get("invalid", 0) >= 3 and rejected.get("auth", 0) >= 2
    for name in ("wisp_queue_depth", "wisp_verify_seconds", "wisp_verify_predicted_seconds", "wisp_slo_jobs",
                 "wisp_kv_used_bytes", "wisp_kv_evictions", "wisp_accepted_length", "wisp_queue_wait_seconds"):
        assert name in families, name


def test_openapi_schema_is_valid_and_health_answers(server, http):
    from openapi_spec_validator import validate

    schema = httpx.get(f"{server.url}/openapi.json").json()
    validate(schema)
    for path in ("/v1/sessions", "/v1/sessions/{session_id}/verify", "/v1/completions", "/v1/chat/completions",
                 "/v1/models", "/health", "/metrics"):
        assert path in schema["paths"], path
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    models = http.get("/v1/models").json()
    assert models["data"][0]["id"] == "SmolLM2-135M-Instruct"
