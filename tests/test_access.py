"""Access to the verifier: with API keys configured every endpoint but `/health` needs one, a session
answers only to the key that opened it (another key hears 404), keys are compared in constant time,
each key has its own rate limit, and the server speaks TLS through uvicorn.

The servers here run a tiny random model with the target's vocabulary (`tiny_checkpoint`): these
tests are about the HTTP surface, not the model.
"""

from __future__ import annotations

import hashlib
import shutil
import ssl
import subprocess
import time

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.live_server import LiveServer, tiny_checkpoint
from wisp_cloud import access
from wisp_cloud.access import AccessGate, AccessPolicy, KeyRing, RateLimiter, key_id, read_keys
from wisp_edge.client import HttpVerifier
from wisp_edge.wire.protocol import SessionStart, VerifyBlock, VerifyRequest

KEY_A, KEY_B, KEY_C = "key-alpha-1", "key-bravo-2", "key-charlie-3"
RATE, BURST = 5.0, 20


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-target", max_seq_len=256)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    """Three keys from the three sources: two --api-key flags (one comma-separated pair) and a keys file."""
    where = tmp_path_factory.mktemp("access")
    keys_file = where / "keys.txt"
    keys_file.write_text(f"# one key per line\n{KEY_C}\n\n")
    with LiveServer("--model", str(tiny_model), "--threads", "1", "--log-level", "warning",
                    "--api-key", f"{KEY_A}", "--api-key", f" {KEY_B} ,", "--api-keys-file", str(keys_file),
                    "--rate-limit-rps", str(RATE), "--rate-limit-burst", str(BURST),
                    log_path=where / "server.log") as live:
        yield live


def _as(server, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=30)


def _refused(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"], error
    return error


def test_every_endpoint_but_health_requires_a_key(server):
    schema = httpx.get(f"{server.url}/openapi.json").json()  # the schema and docs stay public (see README)
    calls = [(method.upper(), path.replace("{session_id}", "abc")) for path, item in schema["paths"].items()
             for method in item]
    assert len(calls) >= 9
    for key in (None, "wrong-key", KEY_A + "x", KEY_A[:-1], ""):
        with _as(server, key) as http:
            for method, path in calls:
                r = http.request(method, path, json={} if method == "POST" else None)
                if path == "/health":
                    assert r.status_code == 200 and r.json() == {"status": "ok"}, r.text  # no details without a key
                    continue
                _refused(r, 401, "invalid_api_key")
                assert r.headers["www-authenticate"] == "Bearer"
            _refused(http.get("/no/such/route"), 401, "invalid_api_key")  # the route table is not revealed
    for key in (KEY_A, KEY_B, KEY_C):
        with _as(server, key) as http:
            assert http.get("/v1/models").status_code == 200
            assert "queue_depth" in http.get("/health").json()  # a key unlocks the details
    # The schema declares the bearer key on every operation it guards.
    secured = {path for path, item in schema["paths"].items() for op in item.values() if op.get("security")}
    assert secured == set(schema["paths"]) - {"/health"}


def test_a_session_answers_only_to_the_key_that_opened_it(server):
    with _as(server, KEY_A) as alice, _as(server, KEY_B) as bob:
        created = alice.post("/v1/sessions", json={"prompt_ids": [1, 2, 3]})
        assert created.status_code == 201
        sid, position, first = (created.json()[k] for k in ("session_id", "position", "first_token"))
        block = {"position": position, "round_id": 1, "draft_ids": [first]}
        stranger = _refused(bob.post(f"/v1/sessions/{sid}/verify", json=block), 404, "unknown_session")
        unknown = _refused(bob.post("/v1/sessions/0123456789abcdef/verify", json=block), 404, "unknown_session")
        assert stranger["message"].replace(sid, "X") == unknown["message"].replace("0123456789abcdef", "X")
        _refused(bob.delete(f"/v1/sessions/{sid}"), 404, "unknown_session")
        mine = alice.post(f"/v1/sessions/{sid}/verify", json=block)  # bob's attempts changed nothing
        assert mine.status_code == 200 and not mine.json()["replayed"], mine.text
        assert alice.delete(f"/v1/sessions/{sid}").status_code == 204

    # The edge client keeps its key for its resumes: a session it reopens is its own.
    with HttpVerifier(server.url, api_key=KEY_B) as edge, _as(server, KEY_A) as alice:
        started = edge.start_session(SessionStart([1, 2, 3]))
        remote = edge._sessions[started.session_id].server_id
        _refused(alice.delete(f"/v1/sessions/{remote}"), 404, "unknown_session")
        result = edge.verify(VerifyRequest(started.session_id, VerifyBlock(4, [started.first_token], round_id=1),
                                           committed=[1, 2, 3, started.first_token]))
        assert result.accepted in (0, 1) and edge.resumes == 0


def test_each_key_has_its_own_rate_limit(server):
    # An earlier test spent one of carol's tokens; one refill period later her bucket is full again (run right
    # after that test, the bucket held BURST - 1 and the twentieth request was refused).
    time.sleep(1.0 / RATE + 0.05)
    with _as(server, KEY_C) as carol, _as(server, KEY_A) as alice:
        # a full bucket: BURST requests pass, then the rate binds
        statuses = [carol.get("/v1/models").status_code for _ in range(3 * BURST)]
        assert statuses[:BURST] == [200] * BURST and 429 in statuses
        limited = carol.get("/v1/models")
        error = _refused(limited, 429, "rate_limited")
        assert f"{RATE:g} requests/s" in error["message"] and int(limited.headers["retry-after"]) >= 1
        assert alice.get("/v1/models").status_code == 200  # another key is not slowed by carol
        time.sleep(1.0 / RATE + 0.05)
        assert carol.get("/v1/models").status_code == 200  # and carol's bucket refills
        # The edge client waits out a 429 (Retry-After) and reports it.
        with HttpVerifier(server.url, api_key=KEY_C, max_wait_s=30) as edge:
            for _ in range(BURST + 2):
                edge.info()
            assert edge.faults()["busy_waits"] >= 1


def test_keys_are_compared_in_constant_time(monkeypatch):
    """Every configured key is compared, always as two 32-byte digests, whatever the caller sends."""
    keys = [f"key-{i}" for i in range(5)]
    ring = KeyRing(keys)
    calls: list[tuple[int, int]] = []
    real = access.hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(access.hmac, "compare_digest", spy)
    for presented in (keys[0], keys[-1], "nope", "", "x" * 10_000):
        calls.clear()
        found = ring.match(presented)
        assert found == (key_id(presented) if presented in keys else None)
        assert calls == [(32, 32)] * len(keys), presented
    assert key_id("secret") == hashlib.sha256(b"secret").hexdigest()[:16] and "secret" not in key_id("secret")


def test_keys_come_from_flags_the_environment_and_a_file(tmp_path):
    path = tmp_path / "keys"
    path.write_text("k3  # ops\n# retired: k0\nk4\nk3\n")
    assert read_keys("k1, k2,,k1", path) == ["k1", "k2", "k3", "k4"]
    assert read_keys(None) == [] and read_keys(" ") == []
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no key"):
        read_keys(None, tmp_path / "empty")
    from wisp_cloud.settings import ServeSettings

    with pytest.MonkeyPatch.context() as env:
        env.setenv("WISP_API_KEY", "from-env")
        env.setenv("WISP_RATE_LIMIT_RPS", "7")
        settings = ServeSettings()
        policy = AccessPolicy.from_settings(settings)
        assert policy.keys.match("from-env") and policy.rate_limiter.rate == 7
    with pytest.raises(ValueError, match="both ssl_certfile and ssl_keyfile"):
        ServeSettings(ssl_certfile=path)


def test_the_rate_limiter_is_a_token_bucket_per_key():
    now = [0.0]
    limiter = RateLimiter(2.0, 3, clock=lambda: now[0], max_keys=2)
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(0.5)  # empty: the next token in 1/rate s
    assert limiter.acquire("b") == 0.0  # other keys have their own bucket
    now[0] += 0.5
    assert limiter.acquire("a") == 0.0
    limiter.acquire("c")  # a third key evicts the least recently used bucket
    assert len(limiter._buckets) == 2


def test_the_gate_can_guard_the_docs_and_limits_bodies_without_a_model():
    app = FastAPI()

    @app.post("/echo")
    async def echo(body: dict):
        return body

    policy = AccessPolicy(KeyRing(["k"]), None, max_body_bytes=100, body_timeout_s=1.0, protect_docs=True)
    refused = []
    app.add_middleware(AccessGate, policy=policy, refused=refused.append)
    with TestClient(app) as client:
        assert client.get("/openapi.json").status_code == 401  # --protect-docs
        assert client.get("/openapi.json", headers={"Authorization": "Bearer k"}).status_code == 200
        ok = client.post("/echo", json={"a": 1}, headers={"Authorization": "bearer k"})
        assert ok.status_code == 200 and ok.json() == {"a": 1}
        big = client.post("/echo", json={"a": "x" * 200}, headers={"Authorization": "Bearer k"})
        assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
    assert refused == ["auth", "body_too_large"]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_through_uvicorn(tmp_path, tiny_model):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    with LiveServer("--model", str(tiny_model), "--threads", "1", "--log-level", "warning",
                    "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), api_key=KEY_A,
                    log_path=tmp_path / "server.log", tls_ca=cert) as server:
        assert server.url.startswith("https://")
        with server.client() as http:
            assert http.get("/health").json()["status"] == "ok"
            assert http.post("/v1/sessions", json={"prompt_ids": [1, 2, 3]}).status_code == 201
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not spoken on the TLS port
            httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=5)
        with pytest.raises(httpx.ConnectError):  # nor is an unknown certificate trusted
            httpx.get(f"{server.url}/health", timeout=5)
        tls_client = httpx.Client(base_url=server.url, verify=ssl.create_default_context(cafile=str(cert)),
                                  headers={"Authorization": f"Bearer {KEY_A}"}, timeout=30)
        with HttpVerifier(server.url, client=tls_client) as edge:
            started = edge.start_session(SessionStart([1, 2, 3]))
            assert edge.verify(VerifyRequest(started.session_id, VerifyBlock(4, [], round_id=1))).token >= 0
        # An edge trusts a private CA through SSL_CERT_FILE (httpx reads it), with no code change.
        with pytest.MonkeyPatch.context() as env:
            env.setenv("SSL_CERT_FILE", str(cert))
            with HttpVerifier(server.url, api_key=KEY_A) as edge:
                assert edge.info()["vocab_size"] == 49152
