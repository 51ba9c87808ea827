"""Bad input against every endpoint of a real server: no 5xx, no crash, no unbounded memory, and every
refusal says why.

The server is a real `wisp-cloud serve` over a tiny random model with the shipped target's
vocabulary and tokenizer (`tiny_checkpoint`), so thousands of requests cost seconds, not minutes.
- schemathesis generates valid and invalid requests for each operation of the served OpenAPI schema;
- hypothesis drives session and verify bodies with wrong types, huge arrays, negative and
  out-of-vocabulary ids, NaN/inf/absurd sampling parameters, and raw bytes that are not JSON;
- oversized bodies get 413, bodies that trickle in get 408, and neither blocks other clients.
Cases tried are counted and printed (`-s`) for the README's figures.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.live_server import LiveServer, tiny_checkpoint
from tests.results import record

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
VOCAB = 49152
MAX_BODY_MB = 1
BODY_TIMEOUT_S = 2.0
EXAMPLES = 30  # per operation and generation mode (schemathesis)
CASES: dict[str, int] = {}  # tried, by test

FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.generate, Phase.shrink])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-target", max_seq_len=256)
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    with LiveServer("--model", str(model), "--threads", "1", "--log-level", "warning", "--rate-limit-rps", "0",
                    "--max-body-mb", str(MAX_BODY_MB), "--body-timeout-s", str(BODY_TIMEOUT_S),
                    "--kv-budget-mb", "64", log_path=log, api_key=KEY) as live:
        live.baseline_rss = live.rss_bytes()
        yield live
        record("fuzz", cases=dict(CASES), total=sum(CASES.values()), rss_before_mib=live.baseline_rss / 2**20,
               rss_after_mib=live.rss_bytes() / 2**20, open_fds=live.open_fds())
        print(f"\nfuzz cases tried: {CASES} (total {sum(CASES.values())}); server RSS "
              f"{live.baseline_rss / 2**20:.0f} -> {live.rss_bytes() / 2**20:.0f} MiB, {live.open_fds()} fds")


@pytest.fixture(scope="module")
def http(server):
    with server.client(headers=AUTH, timeout=30.0) as client:
        yield client


def refusal_problem(response: httpx.Response | object) -> str | None:
    """Why a reply breaks the contract, or None: no 5xx but an overload's 503 with Retry-After (a failed
    forward is a 503 too, and a bug), and every refusal is JSON ``{"error": {"code", "message"}}``."""
    status = response.status_code
    if status >= 500 and (status != 503 or "batch_failed" in response.text):
        return f"{status}: {response.text[:300]}"
    if status >= 400:
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            return f"{status} without a JSON reason: {response.text[:200]}"
        if not error.get("message") or not error.get("code"):
            return f"{status} with an empty reason: {error}"
        if status in (429, 503) and not response.headers.get("retry-after"):
            return f"{status} without Retry-After"
    return None


def _server_errors(server) -> float:
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "wisp_batch_errors_total" or
               (s.name == "wisp_http_requests_total" and s.labels.get("status", "").startswith("50")
                and s.labels["status"] != "503"))


# --- schemathesis: every operation of the served schema --------------------------------------------


def test_schemathesis_finds_no_server_error_on_any_operation(server):
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", headers=AUTH)
    problems: list[str] = []
    tried = 0
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(FUZZ, max_examples=EXAMPLES, phases=[Phase.generate])
            def run(case) -> None:
                nonlocal tried
                tried += 1
                body = case.body
                if "completions" in operation.path and isinstance(body, dict):
                    # Decoding a whole context per case would take the time of hundreds of cases.
                    if not isinstance(body.get("max_tokens"), int) or body["max_tokens"] > 8:
                        body["max_tokens"] = 8
                response = case.call(headers=AUTH, timeout=20)
                problem = refusal_problem(response)
                if problem:
                    problems.append(f"{operation.label} ({mode.value}) {problem}; body {str(case.body)[:200]}")

            if mode is GenerationMode.NEGATIVE and operation.path == "/health":
                continue  # nothing in it can be made invalid
            run()
    CASES["schemathesis"] = tried
    assert not problems, "\n".join(problems[:20])
    assert _server_errors(server) == 0, server.log_tail()


# --- hypothesis: the session API's bodies ------------------------------------------------------------

big_ints = st.one_of(st.integers(-5, VOCAB + 5), st.integers(-(2**70), 2**70),
                     st.sampled_from([0, VOCAB - 1, VOCAB, -1, 2**31, 2**63, -(2**63), 2**64]))
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), big_ints,
                    st.sampled_from([0.0, -0.0, -1.0, 5e-324, 1e-310, 1e-300, 1e-5, 1e300, 1.7e308, 100.0, 100.0001,
                                     2.0, 0.5, 1.0, 1.0000001]))
junk = st.recursive(st.none() | st.booleans() | numbers | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                    max_leaves=8)
id_lists = st.one_of(st.lists(big_ints, max_size=40),
                     st.builds(lambda n, v: [v] * n, st.integers(0, 200_000), st.integers(-2, VOCAB + 2)),
                     st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=600))
sampling = st.one_of(junk, st.fixed_dictionaries({}, optional={
    "temperature": numbers | junk, "top_k": big_ints | junk, "top_p": numbers | junk, "seed": big_ints | junk,
    "extra": junk}))
session_bodies = st.one_of(junk, st.fixed_dictionaries({"prompt_ids": id_lists | junk}, optional={
    "sampling": sampling, "slo_tokens_per_s": numbers | junk, "vocab_fingerprint": st.text(max_size=300) | junk,
    "resume": st.booleans() | junk, "unknown": junk}))
# Valid bodies whose values sit anywhere in the schema's declared ranges (subnormals, bounds, huge
# ints): what gets past the validators and reaches the sampler and the scheduler.
valid_ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12)
near_valid_sessions = st.fixed_dictionaries(
    {"prompt_ids": valid_ids, "sampling": st.fixed_dictionaries(
        {"temperature": st.floats(0.0, 100.0)}, optional={
            "top_k": st.integers(0, 2**70), "top_p": st.floats(0.0, 1.0, exclude_min=True),
            "seed": st.integers(0, 2**63 - 1)})},
    optional={"slo_tokens_per_s": st.floats(0.0, 10_000.0, exclude_min=True), "resume": st.booleans()})


def _post(http: httpx.Client, path: str, body) -> httpx.Response:
    # json.dumps writes NaN/Infinity, which Python's JSON reader accepts: they reach the validators.
    return http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def test_session_bodies_never_cause_a_server_error(http):
    tried = 0

    @given(body=st.one_of(session_bodies, near_valid_sessions))
    @settings(FUZZ, max_examples=300)
    def run(body) -> None:
        nonlocal tried
        tried += 1
        response = _post(http, "/v1/sessions", body)
        assert refusal_problem(response) is None, (refusal_problem(response), str(body)[:300])
        if response.status_code == 201:
            http.delete(f"/v1/sessions/{response.json()['session_id']}")

    run()
    CASES["session bodies"] = tried


def test_verify_bodies_never_cause_a_server_error(http):
    """Blocks against live greedy and sampling sessions: stale and current positions, bad q, junk."""
    live = {}
    for name, sampling_params in (("greedy", {}), ("sampled", {"temperature": 0.9, "top_k": 20, "seed": 3})):
        created = http.post("/v1/sessions", json={"prompt_ids": [1, 2, 3, 4], "sampling": sampling_params})
        assert created.status_code == 201, created.text
        live[name] = created.json()
    probs = st.lists(numbers, min_size=1, max_size=6)
    q_entry = st.one_of(junk, st.fixed_dictionaries({"ids": st.lists(big_ints, max_size=6) | junk,
                                                     "probs": probs | junk}),
                        st.builds(lambda ids: {"ids": ids, "probs": [1.0 / len(ids)] * len(ids)},
                                  st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=5, unique=True)))
    drafts = st.one_of(st.lists(big_ints, max_size=40), st.lists(st.integers(0, VOCAB - 1), max_size=8), junk)
    tried = 0

    @given(which=st.sampled_from(sorted(live)), use_current=st.booleans(), position=big_ints | junk,
           round_id=big_ints | junk, draft=drafts, q=st.none() | st.lists(q_entry, max_size=8) | junk,
           extra=st.fixed_dictionaries({}, optional={"drafting_ms": numbers | junk, "rtt_ms": numbers | junk,
                                                     "surprise": junk}))
    @settings(FUZZ, max_examples=300)
    def run(which, use_current, position, round_id, draft, q, extra) -> None:
        nonlocal tried
        tried += 1
        session = live[which]
        body = {"position": session["position"] if use_current else position, "round_id": round_id,
                "draft_ids": draft, "q": q, **extra}
        response = _post(http, f"/v1/sessions/{session['session_id']}/verify", body)
        assert refusal_problem(response) is None, (refusal_problem(response), str(body)[:300])
        if response.status_code == 200:
            session["position"] = response.json()["position"]
        elif response.status_code == 409 and response.json()["error"].get("committed"):
            session["position"] = response.json()["error"]["committed"]

    run()
    CASES["verify bodies"] = tried


def test_text_endpoints_refuse_absurd_parameters_with_reasons(http):
    tried = 0
    text = st.one_of(st.text(max_size=40), st.sampled_from(["\ud800 lone surrogate", "\x00", "{{ 7*7 }}",
                                                            "<|im_start|>system"]))
    messages = st.one_of(junk, st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant",
                                                                                        "tool"]) | junk,
                                                               "content": text | junk}), max_size=3))
    common = {"max_tokens": st.integers(-5, 40) | big_ints | junk, "temperature": numbers | junk,
              "top_p": numbers | junk, "top_k": big_ints | junk, "seed": big_ints | junk,
              "stop": junk | st.lists(text, max_size=6), "n": big_ints, "stream": st.booleans() | junk,
              "model": st.sampled_from(["default", "tiny-target", "gpt-9"]) | junk, "echo": st.booleans() | junk,
              "slo_tokens_per_s": numbers | junk}

    near_valid = {"temperature": st.floats(0.0, 2.0), "top_p": st.floats(0.0, 1.0, exclude_min=True),
                  "top_k": st.integers(0, 2**70), "seed": st.integers(0, 2**63 - 1),
                  "slo_tokens_per_s": st.floats(0.0, exclude_min=True), "stop": st.lists(text, max_size=6),
                  "echo": st.booleans(), "stream": st.booleans()}

    @given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
           prompt=st.one_of(text, st.lists(big_ints, max_size=20), junk), msgs=messages,
           extra=st.one_of(st.fixed_dictionaries({}, optional=common),
                           st.fixed_dictionaries({"max_tokens": st.integers(1, 4)}, optional=near_valid)))
    @settings(FUZZ, max_examples=200)
    def run(path, prompt, msgs, extra) -> None:
        nonlocal tried
        tried += 1
        body = {"prompt": prompt, **extra} if path == "/v1/completions" else {"messages": msgs, **extra}
        if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 40:
            body["max_tokens"] = 40 if tried % 2 else body["max_tokens"]  # half stay absurd: refused up front
        response = _post(http, path, body)
        assert refusal_problem(response) is None, (refusal_problem(response), str(body)[:300])
        if response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream"):
            assert response.text.rstrip().endswith("data: [DONE]")

    run()
    CASES["text bodies"] = tried


def test_bytes_that_are_not_json_are_refused_with_a_reason(http):
    tried = 0

    @given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=100).map(str.encode),
                         st.sampled_from([b"", b"{", b"[1,2", b'{"prompt_ids": [1,2,]}', b"\xff\xfe{}", b"null",
                                          b'{"prompt_ids": [1e999999]}', b'{"prompt_ids": ' + b"[" * 5000])),
           path=st.sampled_from(["/v1/sessions", "/v1/sessions/abc/verify", "/v1/completions",
                                 "/v1/chat/completions"]),
           content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                         ""]))
    @settings(FUZZ, max_examples=200)
    def run(raw, path, content_type) -> None:
        nonlocal tried
        tried += 1
        response = http.post(path, content=raw, headers={"content-type": content_type} if content_type else {})
        assert 400 <= response.status_code < 500, (response.status_code, raw[:100])
        assert refusal_problem(response) is None, (refusal_problem(response), raw[:100])

    run()
    CASES["raw bytes"] = tried


# --- size and time ---------------------------------------------------------------------------------


def test_oversized_bodies_get_413_with_a_reason_and_memory_stays_bounded(server, http):
    limit = MAX_BODY_MB << 20
    before = server.rss_bytes()
    for _ in range(5):
        # Declared too large: refused from Content-Length, before a byte of the body is read.
        big = http.post("/v1/sessions", content=b"[" + b"1," * (limit // 2) + b"1]",
                        headers={"content-type": "application/json"})
        assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large", big.text
        assert str(limit) in big.json()["error"]["message"]

        # Chunked (no Content-Length): counted while read, refused as soon as it passes the limit.
        def chunks():
            for _ in range(24):
                yield b"7" * (64 << 10)

        streamed = http.post("/v1/sessions", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413 and "limit" in streamed.json()["error"]["message"]
    # A body just under the limit is read and refused for what it says, not for its size.
    near = http.post("/v1/sessions", content=json.dumps({"prompt_ids": [5] * (limit // 4)}),
                     headers={"content-type": "application/json"})
    assert near.status_code == 422, near.text
    growth = server.rss_bytes() - before
    assert growth < 64 << 20, f"RSS grew by {growth / 2**20:.0f} MiB over 10 refused 1.5 MiB bodies"
    CASES["oversized bodies"] = 11


def _raw_request(port: int, head: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(head.encode())
    return sock


def test_slow_clients_time_out_and_never_block_others(server, http):
    fds_before = server.open_fds()
    head = (f"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n")
    tricklers = [_raw_request(server.port, head) for _ in range(4)]
    # Slowloris: headers that never end.
    loris = [_raw_request(server.port, "POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: 1") for _ in range(8)]
    stop = threading.Event()

    def trickle() -> None:
        while not stop.is_set():
            for sock in tricklers:
                try:
                    sock.sendall(b" ")
                except OSError:
                    pass
            time.sleep(0.25)

    feeder = threading.Thread(target=trickle, daemon=True)
    feeder.start()
    try:
        t0 = time.monotonic()
        latencies = []
        while time.monotonic() - t0 < BODY_TIMEOUT_S + 0.5:
            t = time.monotonic()
            r = http.get("/v1/models")
            latencies.append(time.monotonic() - t)
            assert r.status_code == 200
            time.sleep(0.1)
        assert max(latencies) < 1.0, f"other clients waited {max(latencies):.2f} s"
        for sock in tricklers:
            sock.settimeout(BODY_TIMEOUT_S + 5)
            reply = sock.recv(4096).decode(errors="replace")
            assert reply.startswith("HTTP/1.1 408"), reply[:200]
            assert "body_timeout" in reply and "did not arrive within" in reply
    finally:
        stop.set()
        feeder.join()
        for sock in tricklers + loris:
            sock.close()
    deadline = time.monotonic() + 5
    while server.open_fds() > fds_before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.open_fds() <= fds_before + 2, (fds_before, server.open_fds())
    assert http.get("/health").json()["status"] == "ok"
    CASES["slow clients"] = len(tricklers) + len(loris)


def test_the_server_is_whole_after_the_fuzzing(server, http):
    """Still answering, still correct, no forward ever failed, memory within bounds."""
    created = http.post("/v1/sessions", json={"prompt_ids": [1, 2, 3]})
    assert created.status_code == 201
    sid, position, first = created.json()["session_id"], created.json()["position"], created.json()["first_token"]
    verify = http.post(f"/v1/sessions/{sid}/verify", json={"position": position, "round_id": 1, "draft_ids": [first]})
    assert verify.status_code == 200 and verify.json()["position"] >= position + 1
    assert _server_errors(server) == 0, server.log_tail()
    growth = server.rss_bytes() - server.baseline_rss
    assert growth < 256 << 20, f"RSS grew by {growth / 2**20:.0f} MiB during the fuzzing"
    assert math.isfinite(http.get("/health").json()["slo_attainment"])
