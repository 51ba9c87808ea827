"""`VerifierService`'s methods served by the verifier replicas through a Ray Serve deployment handle: the
part of `fleet.FleetService` that reaches the other replicas (a replica's own work it does in place).

Session calls carry the session id as the routing key (`router.py` sends them to the replica that holds
the session); new sessions and centralized requests carry none and are placed by load. A replica that
dies under a call answers for it here: a verify hears 404 `unknown_session` (the edge resends its
committed tokens and goes on elsewhere), anything else 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from ray.exceptions import RayActorError

from wisp_cloud.cluster.placement import avoid_key, target_key
from wisp_cloud.cluster.replica import Failure
from wisp_cloud.cluster.router import routers
from wisp_cloud.metrics import Metrics
from wisp_edge.wire.errors import ApiError
from wisp_edge.wire.protocol import SessionStarted
from wisp_edge.wire.sampling import SamplingParams

log = logging.getLogger("wisp.cluster")

VIEW_TIMEOUT_S = 5.0  # a replica that does not answer /health or /metrics within this is listed as unreachable
SUMMED = ("sessions", "queue_depth", "batches_run", "kv_used_bytes", "kv_budget_bytes", "kv_evictions")


def _lost(what: str) -> ApiError:
    return ApiError(503, "replica_lost", f"the verifier replica serving {what} stopped; retry", retry_after=1.0)


def gone(session_id: str) -> ApiError:
    return ApiError(404, "unknown_session", f"session {session_id} was on a verifier replica that stopped: "
                                            "open a new session with your committed tokens and resume=true")


class RemoteService:
    def __init__(self, handle) -> None:
        self.handle = handle
        self.metrics = Metrics()  # what the ingress itself sees: refusals at the gate, HTTP status counts
        self._info: dict | None = None

    # --- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        self._info = await self._call("info")  # also brings this process's router up

    async def stop(self) -> None:
        pass

    @property
    def running(self) -> bool:
        return bool(self.replica_ids())

    def replica_ids(self) -> list[str]:
        return sorted({rid for router in routers() for rid in router.replica_ids()})

    async def _call(self, method: str, *args, key: str | None = None, lost: ApiError | None = None,
                    keep_failure: bool = False, **kwargs):
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
        """Placed by load; a replica that refuses for load passes the newcomer on to the others, so it hears
        429/503 only when every replica is full (with the last one's Retry-After)."""
        result = await self._call("create_session", prompt_ids, params, keep_failure=True, **options)
        if not isinstance(result, Failure):
            return result
        if not result.overloaded or result.replica is None or len(self.replica_ids()) <= 1:
            raise result.error()
        return await self._offer(prompt_ids, params, [result.replica], result, **options)

    async def _offer(self, prompt_ids: list[int], params: SamplingParams, refused: list[str], last: Failure,
                     **options) -> SessionStarted:
        """A newcomer that the replicas in `refused` turned away for load, offered to the others in turn."""
        while True:
            try:
                result = await asyncio.wait_for(
                    self._call("create_session", prompt_ids, params, key=avoid_key(refused), keep_failure=True,
                               **options), VIEW_TIMEOUT_S)
            except TimeoutError:  # nobody else left to ask
                raise last.error() from None
            if not isinstance(result, Failure):
                return result
            last = result
            if not result.overloaded or result.replica is None or len(refused) + 1 >= len(self.replica_ids()):
                raise result.error()
            refused.append(result.replica)

    async def verify(self, session_id: str, **block) -> dict:
        return await self._call("verify", session_id, key=session_id, lost=gone(session_id), **block)

    async def close(self, session_id: str, owner: str | None = None) -> None:
        await self._call("close", session_id, key=session_id, owner=owner)

    async def decode(self, prompt_ids: list[int], params: SamplingParams, *, max_tokens: int,
                     slo_rate: float | None = None) -> AsyncIterator[int]:
        stream = self.handle.options(stream=True).decode.remote(prompt_ids, params, max_tokens=max_tokens,
                                                                 slo_rate=slo_rate)
        try:
            async for item in stream:
                if isinstance(item, Failure):
                    raise item.error()
                yield item
        except RayActorError:
            raise _lost("this request") from None
        finally:
            stream.cancel()

    def info(self) -> dict:
        return dict(self._info or {})

    # --- views over every replica ----------------------------------------------------------------

    async def _each(self, method: str) -> dict[str, object]:
        """`method` of every replica this ingress sees, or the exception it raised, by replica id."""
        ids = self.replica_ids()
        # One at a time, not gathered: calls made while serving one HTTP request share its internal request
        # id, and Ray Serve 2.60's router indexes pending requests by that id, so of two concurrent calls
        # one was matched to the other's replica and the other was never routed (it hung until the
        # timeout: half of all /health answers listed a live replica as unreachable).
        results: dict[str, object] = {}
        for rid in ids:
            try:
                results[rid] = await self._ask(rid, method)
            except Exception as exc:  # noqa: BLE001  (listed as unreachable below)
                results[rid] = exc
        for rid, value in results.items():
            if isinstance(value, BaseException):
                log.warning("replica did not answer", extra={"replica": rid, "method": method,
                                                             "error": repr(value)})
        return results

    async def _ask(self, replica: str, method: str):
        return await asyncio.wait_for(self._call(method, key=target_key(replica)), VIEW_TIMEOUT_S)

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
        texts = {"handle": self.metrics.render()}  # what this process itself counted
        texts.update({rid: text for rid, text in (await self._each("render_metrics")).items()
                      if isinstance(text, bytes)})
        return merge_metrics(texts)


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
