"""The verifier deployment's Ray Serve request router: session affinity by id, new work placed by load.

Ray Serve calls `choose_replicas` for every request a handle sends to the verifier deployment. A request
keyed by a session id (`handle.options(session_id=...)`) goes to the replica named in the id; if that
replica is gone (killed, out of memory, scaled down) it goes wherever load says, and that replica answers
as for an unknown session, which makes the edge resend its committed tokens. A request keyed `@<replica>`
(health, metrics) goes to that replica only; one keyed `!<replicas>` (a new session they refused) to
any other. Anything else (a new session, a centralized request) is
ranked by `placement.rank` over the load each replica reports every `STATS_PERIOD_S`.

One router lives in each process holding a handle (the ingress); `routers()` lets that process list the
replicas its router currently sees.
"""

from __future__ import annotations

import importlib

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from wisp_cloud.cluster.placement import TARGET_PREFIX, ReplicaLoad, avoided, owner_of, rank

STATS_PERIOD_S = 0.5
PLACED_METHODS = frozenset({"create_session", "decode"})

_ROUTERS: dict[str, "SessionRouter"] = {}


def routers() -> list["SessionRouter"]:
    return list(_ROUTERS.values())


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
        return [[by_id[rid] for rid in group] for group in rank(loads, self._placed)]

    def _fresh_load(self, replica: str, stats) -> ReplicaLoad:
        load = ReplicaLoad.of(stats)
        if load.at != self._report_at.get(replica):  # a new report already counts what was placed before it
            self._report_at[replica] = load.at
            self._placed[replica] = 0
        return load

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        metadata = pending_request.metadata
        if metadata.call_method in PLACED_METHODS and owner_of(metadata.session_id) is None:
            self._placed[replica_id.unique_id] = self._placed.get(replica_id.unique_id, 0) + 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._placed.pop(replica_id.unique_id, None)
        self._report_at.pop(replica_id.unique_id, None)
