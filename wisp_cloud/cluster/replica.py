"""One verifier replica as a Ray Serve deployment: a whole `VerifierService` (model, KV pool, scheduler,
estimator) in its own process, serving the HTTP API itself (`fleet.FleetService`) and called by the other
replicas through a deployment handle (rounds of its sessions that reached another replica, newcomers
they refused, health and metrics).

Session ids leave the replica as `<replica id>.<local id>` (so the router can send rounds back here) and
come in the same way; an id naming another replica is unknown here (404), which is what the edge hears
after the replica that held its session died. Refusals travel back as plain values (`Failure`) and are
raised again as `ApiError` by the caller, so nothing depends on pickling exceptions.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from wisp_cloud.cluster.placement import session_id, split_session_id
from wisp_cloud.estimator import VerifyCost
from wisp_cloud.settings import ServeSettings
from wisp_edge.wire.errors import ApiError
from wisp_edge.wire.sampling import SamplingParams

# A typical verify block, for what one more session adds to a replica's backlog (placement).
ROUND_TOKENS, ROUND_CACHED = 8, 256


@dataclass(frozen=True)
class Failure:
    """An `ApiError` as data, to cross a process boundary."""

    status: int
    code: str
    message: str
    retry_after: float | None = None
    extra: dict = field(default_factory=dict)
    replica: str | None = None  # who refused (a new session refused for load is offered to the others)

    @classmethod
    def of(cls, exc: ApiError, replica: str | None = None) -> "Failure":
        return cls(exc.status, exc.code, exc.message, exc.retry_after, dict(exc.extra), replica)

    @property
    def overloaded(self) -> bool:
        return self.status in (429, 503)

    def error(self) -> ApiError:
        return ApiError(self.status, self.code, self.message, retry_after=self.retry_after, **self.extra)


class VerifierReplica:
    async def __init__(self, settings: ServeSettings) -> None:
        from ray import serve

        from wisp_cloud.runtime import build_runtime

        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.deployment, self.app_name = context.deployment, context.app_name
        self.settings = settings
        self.pid = os.getpid()
        self.runtime = build_runtime(settings)
        self.service = self.runtime.service
        await self.service.start()

    def _local(self, value: str) -> str:
        replica, local = split_session_id(value)
        return local if replica == self.replica_id else value  # another replica's id: unknown here

    def __serve_build_asgi_app__(self):
        """The HTTP API of `server.create_app`, over this replica and, through a handle, the others."""
        from ray import serve

        from wisp_cloud.access import AccessPolicy
        from wisp_cloud.cluster.fleet import FleetService
        from wisp_cloud.server import create_app

        fleet = FleetService(self, serve.get_deployment_handle(self.deployment, self.app_name))
        return create_app(fleet, self.runtime.text_model, self.runtime.tokenizer,
                          access=AccessPolicy.from_settings(self.settings), served_by=self.replica_id)

    # --- the session API ---------------------------------------------------------------------------

    async def create_session(self, prompt_ids: list[int], sampling: SamplingParams, *, owner: str | None,
                             **options):
        try:
            started = await self.service.create_session(prompt_ids, sampling, owner=owner, **options)
        except ApiError as exc:
            return Failure.of(exc, self.replica_id)
        return replace(started, session_id=session_id(self.replica_id, started.session_id))

    async def verify(self, session: str, *, owner: str | None, **block):
        try:
            return await self.service.verify(self._local(session), owner=owner, **block)
        except ApiError as exc:
            return Failure.of(exc)

    async def close(self, session: str, *, owner: str | None):
        try:
            self.service.close(self._local(session), owner=owner)
        except ApiError as exc:
            return Failure.of(exc)
        return None

    async def decode(self, prompt_ids: list[int], sampling: SamplingParams, *, max_tokens: int,
                     slo_rate: float | None) -> AsyncIterator:
        """Centralized decoding, streamed token by token; a refusal is the only item."""
        tokens = self.service.decode(prompt_ids, sampling, max_tokens=max_tokens, slo_rate=slo_rate)
        try:
            async for token in tokens:
                yield token
        except ApiError as exc:
            yield Failure.of(exc)
        finally:
            await tokens.aclose()

    # --- views ------------------------------------------------------------------------------------

    async def info(self) -> dict:
        return self.service.info()

    async def status(self) -> dict:
        return {"id": self.replica_id, "pid": self.pid, "state": "running" if self.service.running else "stopped",
                **self.service.status()}

    async def render_metrics(self) -> bytes:
        return self.service.render_metrics()

    def record_routing_stats(self) -> dict:
        """What every router reads to place new sessions (`placement.ReplicaLoad`)."""
        service = self.service
        estimator = service.estimator
        return {"backlog_ms": service.dispatch.backlog_ms(), "kv_used_bytes": service.pool.used_bytes,
                "kv_budget_bytes": service.pool.budget_bytes, "sessions": len(service.sessions),
                "round_ms": estimator.with_margin(estimator.request_cost_ms(VerifyCost(ROUND_TOKENS, ROUND_CACHED))),
                "at": time.time()}

    def check_health(self) -> None:
        if not self.service.running:
            raise RuntimeError("the batch loop is not running")

    async def __del__(self) -> None:
        await self.service.stop()
