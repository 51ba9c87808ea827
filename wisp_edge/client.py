"""The edge's HTTP client to a WISP verifier: a `VerifierBackend` over the session API (httpx).

It hides the network's failures from the engine, which only ever sees answered rounds:
- a timeout or dropped connection: the same round is retried with the same round id, with backoff,
  for up to `max_wait_s` (the server answers a retried round with the reply it already gave, so a
  lost reply costs latency only);
- the session was evicted (410) or the server restarted (404), or the server holds another prefix
  (409 stale_position): a new session is opened with the engine's committed tokens and
  ``resume=true`` and the round is retried there; the engine keeps its session id;
- 429/503 with Retry-After: waits as told, up to `max_wait_s`, then raises `VerifierBusy`.
Bad requests (4xx) raise `VerifierRequestError` with the server's reason.

Every request about a session also names it in the `x-session-id` header: a fleet of verifier replicas
on Ray Serve routes on that header, so a round goes from Serve's proxy straight to the replica holding
the session (a single server ignores it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import httpx

from wisp_edge.wire.protocol import (SessionStart, SessionStarted, VerifierUnavailable, VerifyReply, VerifyRequest,
                                     dump, load)

RESEND_CODES = {"session_evicted", "unknown_session", "stale_position"}
SESSION_HEADER = "x-session-id"  # Ray Serve's session-affinity header (its proxy passes it to the router)


class VerifierError(RuntimeError):
    """The verifier could not be used (after retries)."""


class VerifierUnreachable(VerifierError, VerifierUnavailable):
    """No answer from the verifier (connection refused, timeouts) for longer than we were willing to wait."""


class VerifierBusy(VerifierError, VerifierUnavailable):
    """The verifier refused new work for longer than we were willing to wait."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s  # the server's last Retry-After, for a caller that retries later


class VerifierRequestError(VerifierError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


@dataclass
class _Remote:
    """What it takes to reopen a session on the server: the server's current id and how it was opened."""

    server_id: str
    start: SessionStart
    resumes: int = 0


class HttpVerifier:
    def __init__(self, base_url: str, *, api_key: str | None = None, timeout_s: float = 30.0,
                 max_resumes: int = 3, backoff_s: float = 0.2, max_wait_s: float = 60.0,
                 client: httpx.Client | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = client or httpx.Client(base_url=base_url.rstrip("/"), headers=headers,
                                           timeout=httpx.Timeout(timeout_s, connect=min(5.0, timeout_s)))
        self.max_resumes, self.backoff_s, self.max_wait_s = max_resumes, backoff_s, max_wait_s
        self._sessions: dict[str, _Remote] = {}
        self.resumes = 0  # sessions reopened after an eviction or a restart
        self.retries = 0  # requests repeated after a network failure
        self.replays = 0  # rounds answered from the server's memory of an earlier try (a lost reply)
        self.busy_waits = 0  # 429/503 answers waited out (Retry-After)

    def faults(self) -> dict[str, int]:
        """What the network and the server did to this client so far (counters; the engine reports the change)."""
        return {"retries": self.retries, "resumes": self.resumes, "replayed_rounds": self.replays,
                "busy_waits": self.busy_waits}

    # --- plumbing ---------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body: dict | None = None, session: str | None = None) -> httpx.Response:
        """Send, retrying network failures and honouring Retry-After; returns any non-retryable reply."""
        deadline = time.monotonic() + self.max_wait_s
        failures = 0
        headers = {SESSION_HEADER: session} if session else None
        while True:
            try:
                response = self.http.request(method, path, json=body, headers=headers)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                failures += 1
                self.retries += 1
                pause = min(self.backoff_s * 2 ** (failures - 1), 2.0)
                if time.monotonic() + pause > deadline:
                    raise VerifierUnreachable(f"{method} {path}: {exc!r}, still failing after {failures} tries "
                                        f"over {self.max_wait_s:.0f} s") from exc
                time.sleep(pause)
                continue
            if response.status_code in (429, 503):
                wait = _retry_after(response)
                if time.monotonic() + wait > deadline:
                    code, message = _error_of(response)
                    raise VerifierBusy(f"{response.status_code} {code}: {message}", retry_after_s=wait)
                self.busy_waits += 1
                time.sleep(wait)
                continue
            return response

    @staticmethod
    def _raise(response: httpx.Response) -> None:
        code, message = _error_of(response)
        raise VerifierRequestError(response.status_code, code, message)

    # --- the backend -----------------------------------------------------------------------------------

    def info(self) -> dict:
        response = self._request("GET", "/v1/info")
        if response.status_code != 200:
            self._raise(response)
        return response.json()

    def _open(self, start: SessionStart) -> SessionStarted:
        response = self._request("POST", "/v1/sessions", dump(start))
        if response.status_code != 201:
            self._raise(response)
        return load(SessionStarted, response.json())

    def start_session(self, request: SessionStart) -> SessionStarted:
        started = self._open(request)
        self._sessions[started.session_id] = _Remote(started.session_id, request)
        return started

    def verify(self, request: VerifyRequest) -> VerifyReply:
        remote = self._sessions.get(request.session_id)
        if remote is None:
            raise VerifierError(f"session {request.session_id} was not opened by this client")
        body = dump(request.block)
        for _ in range(self.max_resumes + 1):
            response = self._request("POST", f"/v1/sessions/{remote.server_id}/verify", body, remote.server_id)
            if response.status_code == 200:
                reply = load(VerifyReply, response.json())
                self.replays += reply.replayed
                return reply
            code, _ = _error_of(response)
            if code not in RESEND_CODES or request.committed is None:
                self._raise(response)
            self._resume(remote, request.committed)
        raise VerifierError(f"session {request.session_id} kept being lost on the server")

    def _resume(self, remote: _Remote, committed: list[int]) -> None:
        """Reopen the session from the edge's committed tokens; the server caches them and samples nothing."""
        remote.server_id = self._open(replace(remote.start, prompt_ids=committed, resume=True)).session_id
        remote.resumes += 1
        self.resumes += 1

    def close_session(self, session_id: str) -> None:
        remote = self._sessions.pop(session_id, None)
        if remote is None:
            return
        try:
            self.http.delete(f"/v1/sessions/{remote.server_id}", timeout=2.0,
                             headers={SESSION_HEADER: remote.server_id})
        except httpx.HTTPError:
            pass  # the server forgets idle sessions by itself

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "HttpVerifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(0.05, float(response.headers.get("retry-after", "1")))
    except ValueError:
        return 1.0


def _error_of(response: httpx.Response) -> tuple[str, str]:
    try:
        error = response.json().get("error", {})
        return str(error.get("code", "error")), str(error.get("message", response.text))
    except ValueError:
        return "error", response.text[:200]

