"""The verifier deployment's Ray Serve request router: session affinity by id, new work placed by load.

Ray Serve calls `choose_replicas` for every request sent to the verifier deployment: by Serve's HTTP proxy
(keyed by the request's `x-session-id` header) and by the replicas' handles to each other. A request
keyed by a session id (the header, or `handle.options(session_id=...)`) goes to the replica named in the id; if that
replica is gone (killed, out of memory, scaled down) it goes wherever load says, and that replica answers
as for an unknown session, which makes the edge resend its committed tokens. A request keyed `@<replica>`
(health, metrics) goes to that replica only; one keyed `!<replicas>` (a new session they refused) to
any other. Anything else (a new session, a centralized request) is
ranked by `placement.rank` over the load each replica reports every `placement.STATS_PERIOD_S`.

One router lives in each process that routes (the proxy, each replica); `routers()` lets a replica list
the replicas its router currently sees.
"""

from __future__ import annotations

import importlib
import pickle

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from wisp_cloud.cluster.placement import TARGET_PREFIX, ReplicaLoad, avoided, owner_of, rank


PLACED_METHODS = frozenset({"create_session", "decode"})
HTTP_CALL = "__call__"

_ROUTERS: dict[str, "SessionRouter"] = {}


def routers() -> list["SessionRouter"]:
    return list(_ROUTERS.values())


def adds_work(request: PendingRequest) -> bool:
    """Whether a request placed by load brings new work (a session, a centralized request): a replica's own
    method of that kind, or an HTTP POST from Serve's proxy (a GET for health or metrics adds none)."""
    method = request.metadata.call_method
    if method != HTTP_CALL:
        return method in PLACED_METHODS
    try:  # the proxy's request: its pickled ASGI scope (Ray Serve 2.60's StreamingHTTPRequest)
        return pickle.loads(request.args[0]).asgi_scope.get("method") == "POST"
    except Exception:  # noqa: BLE001  (another Ray's format: count it, as before)
        return True


class SessionRouter(RequestRouter):
    def initialize_state(self, **kwargs) -> None:
        self._placed: dict[str, int] = {}  # replica id -> sessions placed since its last report
        self._report_at: dict[str, float] = {}
        # Ray Serve ships this class by value, so the module's own globals are reached by importing it.
        registry = importlib.import_module("wisp_cloud.cluster.router")._ROUTERS
        registry[str(self._deployment_id)] = self  # the newest router of this process for the deployment

    def replica_ids(self) -> list[str]:
        return sorted(r.unique_id for r in self._replicas)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is None:
            return [candidate_replicas]
        pending_request.routing_context.should_backoff = True  # an empty answer must not spin the loop
        key = pending_request.metadata.session_id
        owner = owner_of(key)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if owner is not None and owner in by_id:
            return [[by_id[owner]]]
        if key.startswith(TARGET_PREFIX):
            return []  # that replica is gone: the caller's timeout answers
        skip = avoided(key)
        loads = {rid: self._fresh_load(rid, r.routing_stats) for rid, r in by_id.items() if rid not in skip}
        if not loads:
            return []
        ranked = rank(loads, self._placed)
        if adds_work(pending_request):
            # Counted as placed now, not when routed: Ray Serve reports a routed request only on its strict
            # queue-length path, and a burst between two load reports must spread.
            self._placed[ranked[0][0]] = self._placed.get(ranked[0][0], 0) + 1
        return [[by_id[rid] for rid in group] for group in ranked]

    def _fresh_load(self, replica: str, stats) -> ReplicaLoad:
        load = ReplicaLoad.of(stats)
        if load.at != self._report_at.get(replica):  # a new report already counts what was placed before it
            self._report_at[replica] = load.at
            self._placed[replica] = 0
        return load

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._placed.pop(replica_id.unique_id, None)
        self._report_at.pop(replica_id.unique_id, None)
