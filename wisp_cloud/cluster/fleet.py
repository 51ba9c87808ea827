"""What a replica's own HTTP app serves: its verifier for the work that is its own, the fleet for the rest.

Every replica is an ingress of the Ray Serve application, so Serve's HTTP proxy hands a request straight
to a replica, chosen by `router.SessionRouter`: a round whose `x-session-id` header names a session goes
to the replica holding it, everything else is placed by load. That is one hop from the proxy to the
verifier (a separate ingress deployment cost a second process hop per round). What the chosen replica
cannot answer alone goes on through a handle to the deployment (the same router):

- a round of a session held by another replica (a client that sends no `x-session-id` header) is
  passed to the owner; one extra hop, never a wrong answer;
- a new session it refuses for load is offered to the others, so a client hears 429/503 with
  Retry-After only when every replica is full;
- `/health` and `/metrics` ask every replica, one at a time (`RemoteService._each`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from wisp_cloud.cluster.placement import split_session_id
from wisp_cloud.cluster.remote import RemoteService, gone, merge_metrics
from wisp_cloud.cluster.replica import Failure
from wisp_cloud.cluster.router import routers
from wisp_edge.wire.protocol import SessionStarted
from wisp_edge.wire.sampling import SamplingParams


def _settled(result):
    if isinstance(result, Failure):
        raise result.error()
    return result


class FleetService(RemoteService):
    def __init__(self, replica, handle) -> None:
        super().__init__(handle)
        self.replica = replica
        self.me = replica.replica_id
        self.metrics = replica.service.metrics  # the access gate's counts go with this replica's series
        self._info = replica.service.info()

    async def start(self) -> None:
        pass  # the replica started its verifier before building this app

    @property
    def running(self) -> bool:
        return self.replica.service.running

    def replica_ids(self) -> list[str]:
        return sorted({self.me, *(rid for router in routers() for rid in router.replica_ids())})

    def _mine(self, session_id: str) -> bool:
        return split_session_id(session_id)[0] == self.me

    async def create_session(self, prompt_ids: list[int], params: SamplingParams, **options) -> SessionStarted:
        result = await self.replica.create_session(prompt_ids, params, **options)
        if not isinstance(result, Failure):
            return result
        if not result.overloaded:
            raise result.error()
        await self._bring_up_router()
        if len(self.replica_ids()) <= 1:
            raise result.error()
        return await self._offer(prompt_ids, params, [self.me], result, **options)

    async def verify(self, session_id: str, **block) -> dict:
        if self._mine(session_id):
            return _settled(await self.replica.verify(session_id, **block))
        await self._bring_up_router()
        if split_session_id(session_id)[0] not in self.replica_ids():
            raise gone(session_id)  # its replica died: the edge resumes here, no further hop
        return await super().verify(session_id, **block)

    async def close(self, session_id: str, owner: str | None = None) -> None:
        if self._mine(session_id):
            _settled(await self.replica.close(session_id, owner=owner))
            return
        await super().close(session_id, owner=owner)

    async def decode(self, prompt_ids: list[int], params: SamplingParams, *, max_tokens: int,
                     slo_rate: float | None = None) -> AsyncIterator[int]:
        tokens = self.replica.decode(prompt_ids, params, max_tokens=max_tokens, slo_rate=slo_rate)
        try:
            async for item in tokens:
                yield _settled(item)
        finally:
            await tokens.aclose()

    async def _bring_up_router(self) -> None:
        """This process's router starts with its first call through the handle and then lists the replicas."""
        if not routers():
            await self._call("info")

    async def _each(self, method: str) -> dict[str, object]:
        await self._bring_up_router()
        return await super()._each(method)

    async def _ask(self, replica: str, method: str):
        return await getattr(self.replica, method)() if replica == self.me else await super()._ask(replica, method)

    async def render_metrics(self) -> bytes:
        return merge_metrics({rid: text for rid, text in (await self._each("render_metrics")).items()
                              if isinstance(text, bytes)})
