"""What a replica's own HTTP app serves: its verifier for the work that is its own, the fleet for the rest.

Every replica is an ingress of the Ray Serve application, so Serve's HTTP proxy hands a request straight
to a replica, chosen by `router.SessionRouter`: a round whose `x-session-id` header names a session goes
to the replica holding it, everything else is placed by load. That is one hop from the proxy to the
verifier (a separate ingress deployment cost a second process hop per round). What the chosen replica
cannot answer alone goes on through a handle to the deployment (the same router):

- a round of a session held by another replica (a client that sends no `x-session-id` header) is
  passed to the owner; one extra hop, never a wrong answer. A round for a replica that is gone hears
  404 `unknown_session` (the edge resends its committed tokens and goes on here);
- a new session it refuses for load is offered to the others, so a client hears 429/503 with
  Retry-After only when every replica is full;
- `/health` and `/metrics` ask every replica, one at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from ray.exceptions import RayActorError

from wisp_cloud.cluster.placement import avoid_key, split_session_id, target_key
from wisp_cloud.cluster.replica import Failure
from wisp_cloud.cluster.router import routers
from wisp_edge.wire.errors import ApiError
from wisp_edge.wire.protocol import SessionStarted
from wisp_edge.wire.sampling import SamplingParams

log = logging.getLogger("wisp.cluster")

VIEW_TIMEOUT_S = 5.0  # a replica that does not answer /health or /metrics within this is listed as unreachable
SUMMED = ("sessions", "queue_depth", "batches_run", "kv_used_bytes", "kv_budget_bytes", "kv_evictions")


def _lost(what: str) -> ApiError:
    return ApiError(503, "replica_lost", f"the verifier replica serving {what} stopped; retry", retry_after=1.0)


def _gone(session_id: str) -> ApiError:
    return ApiError(404, "unknown_session", f"session {session_id} was on a verifier replica that stopped: "
                                            "open a new session with your committed tokens and resume=true")


def _settled(result):
    if isinstance(result, Failure):
        raise result.error()
    return result


class FleetService:
    """`VerifierService`'s interface for `server.create_app`, over this replica and, through `handle`, the rest."""

    def __init__(self, replica, handle) -> None:
        self.replica, self.handle = replica, handle
        self.me = replica.replica_id
        self.metrics = replica.service.metrics  # the access gate's counts go with this replica's series
        self._info = replica.service.info()

    # --- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        pass  # the replica started its verifier before building this app

    async def stop(self) -> None:
        pass  # the replica stops its verifier when Serve removes it

    @property
    def running(self) -> bool:
        return self.replica.service.running

    def info(self) -> dict:
        return dict(self._info)

    def replica_ids(self) -> list[str]:
        return sorted({self.me, *(rid for router in routers() for rid in router.replica_ids())})

    async def _bring_up_router(self) -> None:
        """This process's router starts with its first call through the handle and then lists the replicas."""
        if not routers():
            await self._call("info")

    async def _call(self, method: str, *args, key: str | None = None, lost: ApiError | None = None,
                    keep_failure: bool = False, **kwargs):
        """`method` of the replica the router picks for `key` (none: by load)."""
        handle = self.handle.options(session_id=key) if key else self.handle
        try:
            result = await getattr(handle, method).remote(*args, **kwargs)
        except RayActorError:
            log.warning("replica lost under a call", extra={"method": method, "key": key})
            raise lost or _lost(f"this {method}") from None
        if isinstance(result, Failure) and not keep_failure:
            raise result.error()
        return result

    # --- the service's methods ---------------------------------------------------------------------

    async def create_session(self, prompt_ids: list[int], params: SamplingParams, **options) -> SessionStarted:
        """Here (the router placed it here by load); refused for load, offered to the other replicas in turn,
        so a client hears 429/503 only when every replica is full (with the last one's Retry-After)."""
        last = await self.replica.create_session(prompt_ids, params, **options)
        if not isinstance(last, Failure):
            return last
        if not last.overloaded:
            raise last.error()
        await self._bring_up_router()
        refused = [self.me]
        while len(refused) < len(self.replica_ids()):
            try:
                result = await asyncio.wait_for(
                    self._call("create_session", prompt_ids, params, key=avoid_key(refused), keep_failure=True,
                               **options), VIEW_TIMEOUT_S)
            except TimeoutError:  # nobody else left to ask
                break
            if not isinstance(result, Failure):
                return result
            last = result
            if not result.overloaded or result.replica is None:
                break
            refused.append(result.replica)
        raise last.error()

    async def verify(self, session_id: str, **block) -> dict:
        owner = split_session_id(session_id)[0]
        if owner == self.me:
            return _settled(await self.replica.verify(session_id, **block))
        await self._bring_up_router()
        if owner not in self.replica_ids():
            raise _gone(session_id)  # its replica died: the edge resumes here, no further hop
        return await self._call("verify", session_id, key=session_id, lost=_gone(session_id), **block)

    async def close(self, session_id: str, owner: str | None = None) -> None:
        if split_session_id(session_id)[0] == self.me:
            _settled(await self.replica.close(session_id, owner=owner))
        else:
            await self._call("close", session_id, key=session_id, owner=owner)

    async def decode(self, prompt_ids: list[int], params: SamplingParams, *, max_tokens: int,
                     slo_rate: float | None = None) -> AsyncIterator[int]:
        tokens = self.replica.decode(prompt_ids, params, max_tokens=max_tokens, slo_rate=slo_rate)
        try:
            async for item in tokens:
                yield _settled(item)
        finally:
            await tokens.aclose()

    # --- views over every replica ----------------------------------------------------------------

    async def _each(self, method: str) -> dict[str, object]:
        """`method` of every replica this one sees, or the exception it raised, by replica id."""
        await self._bring_up_router()
        # One at a time, not gathered: calls made while serving one HTTP request share its internal request
        # id, and Ray Serve 2.60's router indexes pending requests by that id, so of two concurrent calls
        # one was matched to the other's replica and the other was never routed (it hung until the
        # timeout: half of all /health answers listed a live replica as unreachable).
        results: dict[str, object] = {}
        for rid in self.replica_ids():
            try:
                results[rid] = await (getattr(self.replica, method)() if rid == self.me else asyncio.wait_for(
                    self._call(method, key=target_key(rid)), VIEW_TIMEOUT_S))
            except Exception as exc:  # noqa: BLE001  (listed as unreachable below)
                log.warning("replica did not answer", extra={"replica": rid, "method": method, "error": repr(exc)})
                results[rid] = exc
        return results

    async def status(self) -> dict:
        replicas = [value if isinstance(value, dict) else {"id": rid, "state": "unreachable",
                                                           "error": type(value).__name__}
                    for rid, value in (await self._each("status")).items()]
        live = [r for r in replicas if r.get("state") == "running"]
        first = live[0] if live else {}
        return {"model": first.get("model"), "policy": first.get("policy"),
                "replicas_running": len(live), **{k: sum(r.get(k, 0) for r in live) for k in SUMMED},
                "replicas": [{"id": r["id"], "pid": r.get("pid"), "state": r["state"],
                              **{k: r.get(k) for k in ("sessions", "queue_depth", "kv_used_bytes",
                                                       "kv_budget_bytes", "batches_run")}}
                             for r in replicas]}

    async def render_metrics(self) -> bytes:
        return merge_metrics({rid: text for rid, text in (await self._each("render_metrics")).items()
                              if isinstance(text, bytes)})


class _Parsed:
    """A registry collector that yields families already parsed (to render them again)."""

    def __init__(self, families) -> None:
        self.families = families

    def collect(self):
        return self.families


def merge_metrics(texts: dict[str, bytes], label: str = "replica") -> bytes:
    """Prometheus texts of several processes as one, each sample labelled with where it came from."""
    families: dict[str, object] = {}
    for source, text in texts.items():
        for family in text_string_to_metric_families(text.decode()):
            merged = families.setdefault(family.name, family)
            samples = [s._replace(labels={**s.labels, label: source}) for s in family.samples]
            if merged is family:
                family.samples = samples
            else:
                merged.samples.extend(samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Parsed(list(families.values())))
    return generate_latest(registry)
