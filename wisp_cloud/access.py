"""Who may use the verifier and how much: API keys, per-key rate limits, request size and body time.

The verifier is a shared, internet-facing accelerator, so every request passes `AccessGate` (a pure
ASGI middleware, outermost in the app) before any handler runs or any body is read:
1. the bearer key is compared with every configured key (`KeyRing`: SHA-256 digests compared with
   `hmac.compare_digest`, all of them every time, so neither timing nor an early exit tells a caller
   how close it came); a request without a valid key gets 401 before its body is read;
2. the key's token bucket (`RateLimiter`) must hold a token, else 429 with Retry-After;
3. the body must be at most `max_body_bytes` (413, from Content-Length or while reading a chunked
   body) and must arrive within `body_timeout_s` (408), so a huge or trickling client costs one
   connection, never memory or the batch loop.
Handlers find the caller's key id (a short hash of the key, never the key) in `request.state.key_id`;
the service records it on each session, and another key hears 404 for that session.
`/health` (and, unless told otherwise, the API schema and docs) need no key.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wisp_edge.wire.errors import error_body

DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


def key_id(key: str) -> str:
    """The name a key goes by in sessions, logs and metrics: a SHA-256 prefix, never the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def read_keys(inline: str | None, path: Path | None = None) -> list[str]:
    """Keys from a comma-separated string (`--api-key`, `WISP_API_KEY`) and a file (one per line, '#' comments)."""
    keys = [k.strip() for k in (inline or "").split(",")]
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"API keys file not found: {path}")
        keys += [line.split("#", 1)[0].strip() for line in Path(path).read_text().splitlines()]
    keys = list(dict.fromkeys(k for k in keys if k))
    if path is not None and not keys:
        raise ValueError(f"API keys file {path} holds no key")
    return keys


class KeyRing:
    """The configured API keys, held as SHA-256 digests."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._digests = [(hashlib.sha256(k.encode()).digest(), key_id(k)) for k in dict.fromkeys(keys) if k]

    def __len__(self) -> int:
        return len(self._digests)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def match(self, presented: str) -> str | None:
        """The key id of `presented`, or None. Every configured key is compared, in constant time each."""
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for known, kid in self._digests:
            if hmac.compare_digest(digest, known):  # no early exit: the work is the same for every caller
                found = kid
        return found


class RateLimiter:
    """A token bucket per key: `rate` requests per second on average, bursts of up to `burst`.

    Pure bookkeeping with an injectable clock; at most `max_keys` buckets are kept (least recently
    used dropped), so memory stays bounded whatever callers present.
    """

    def __init__(self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 65536) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate must be > 0 and burst >= 1, got {rate} and {burst}")
        self.rate, self.burst, self.clock, self.max_keys = rate, float(burst), clock, max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def acquire(self, key: str) -> float:
        """Take one token: 0.0 if the request may go now, else the seconds until a token is due."""
        now = self.clock()
        tokens, at = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait


@dataclass
class AccessPolicy:
    """Everything the gate enforces; built from `ServeSettings` by `from_settings`."""

    keys: KeyRing = field(default_factory=KeyRing)
    rate_limiter: RateLimiter | None = None
    max_body_bytes: int = 16 << 20
    body_timeout_s: float = 30.0
    protect_docs: bool = False

    @classmethod
    def from_settings(cls, settings) -> "AccessPolicy":
        keys = KeyRing(read_keys(settings.api_key, settings.api_keys_file))
        limiter = (RateLimiter(settings.rate_limit_rps, max(1.0, settings.rate_limit_burst))
                   if keys.enabled and settings.rate_limit_rps > 0 else None)
        return cls(keys, limiter, int(settings.max_body_mb * (1 << 20)), settings.body_timeout_s,
                   settings.protect_docs)

    def public(self, path: str) -> bool:
        return path == "/health" or (not self.protect_docs and path in DOCS_PATHS)


class _Refusal(Exception):
    def __init__(self, status: int, code: str, message: str, reason: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.reason, self.headers = status, code, message, reason, headers or {}


class AccessGate:
    """ASGI middleware: authenticate, rate-limit and read the body within its limits, then call the app.

    `refused(reason)` is called for each refusal (a metrics counter); `served(route, status)` for
    every HTTP request, refused or not, so `/metrics` counts what reached the server.
    """

    def __init__(self, app: ASGIApp, policy: AccessPolicy, *, refused: Callable[[str], None] = lambda r: None,
                 served: Callable[[str, int], None] = lambda route, status: None) -> None:
        self.app, self.policy, self.refused, self.served = app, policy, refused, served

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            try:
                key = self._authenticate(scope)
                body = await self._read_body(scope, receive)
            except _Refusal as refusal:
                self.refused(refusal.reason)
                await _send_error(send_counted, refusal)
                return
            if body is None:  # the client went away while sending
                return
            scope.setdefault("state", {})["key_id"] = key
            await self.app(scope, _replay(body, receive), send_counted)
        finally:
            route = scope.get("route")
            self.served(getattr(route, "path", "unmatched"), status)

    def _authenticate(self, scope: Scope) -> str | None:
        policy = self.policy
        if not policy.keys.enabled:
            return None
        scheme, _, token = _header(scope, b"authorization").partition(" ")
        key = policy.keys.match(token.strip()) if scheme.lower() == "bearer" else None
        if policy.public(scope["path"]):
            return key  # a valid key on a public path only unlocks details (/health)
        if key is None:
            raise _Refusal(401, "invalid_api_key", "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           "auth", {"WWW-Authenticate": "Bearer"})
        if policy.rate_limiter is not None:
            wait = policy.rate_limiter.acquire(key)
            if wait > 0:
                limiter = policy.rate_limiter
                raise _Refusal(429, "rate_limited", f"more than {limiter.rate:g} requests/s with this key (bursts of "
                                                    f"{limiter.burst:g}); retry in {wait:.2f} s", "rate_limited",
                               {"Retry-After": str(max(1, math.ceil(wait)))})
        return key

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        limit, timeout = self.policy.max_body_bytes, self.policy.body_timeout_s
        declared = _header(scope, b"content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise _Refusal(413, "body_too_large", f"the body has {int(declared)} bytes; the limit is {limit}",
                           "body_too_large")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise _Refusal(408, "body_timeout", f"the body did not arrive within {timeout:g} s "
                                                    f"({size} bytes received)", "body_timeout") from None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _Refusal(413, "body_too_large", f"the body exceeds the limit of {limit} bytes", "body_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body already read, as one message; later calls wait on the client (to see a disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _send_error(send: Send, refusal: _Refusal) -> None:
    payload = json.dumps(error_body(refusal.status, refusal.code, refusal.message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in refusal.headers.items()]
    if refusal.status in (408, 413):
        headers.append((b"connection", b"close"))  # the rest of the body is not read
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
