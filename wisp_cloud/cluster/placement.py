"""Pure rules of the cluster router: which replica a session id belongs to, and where a new session goes.

A session id is `<replica id>.<id on that replica>`: the replica that opens a session names it, so any
router (one per ingress process, sharing nothing) sends its rounds back there without a shared table.
A call aimed at one replica (health, metrics) carries `@<replica id>`; a new session that some replicas
refused for load carries `!<id>,<id>` and goes to another, so a newcomer hears 429 only when all are full. New sessions and centralized
requests go to the replica with the shortest predicted backlog (its own estimator's), then the least
KV in use, then the fewest sessions; sessions placed since a replica's last report count against it,
so a burst between two reports spreads instead of piling onto the replica that looked idlest.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass

SEPARATOR = "."
TARGET_PREFIX = "@"
STATS_PERIOD_S = 0.5  # how often each replica reports its load to every router
AVOID_PREFIX = "!"  # a new session that the replicas listed after it refused: place it elsewhere


def session_id(replica: str, local_id: str) -> str:
    return f"{replica}{SEPARATOR}{local_id}"


def split_session_id(value: str) -> tuple[str | None, str]:
    """(replica, id on that replica); (None, value) for an id no replica of this cluster made."""
    replica, sep, local = value.partition(SEPARATOR)
    return (replica, local) if sep and replica and local else (None, value)


def target_key(replica: str) -> str:
    return f"{TARGET_PREFIX}{replica}"


def avoid_key(replicas: list[str]) -> str:
    return AVOID_PREFIX + ",".join(replicas)


def avoided(key: str) -> set[str]:
    return set(key[len(AVOID_PREFIX):].split(",")) if key.startswith(AVOID_PREFIX) else set()


def owner_of(key: str) -> str | None:
    """The replica a routing key names: a targeted call's, or a session's; None: place by load."""
    if not key or key.startswith(AVOID_PREFIX):
        return None
    if key.startswith(TARGET_PREFIX):
        return key[len(TARGET_PREFIX):]
    return split_session_id(key)[0]


@dataclass(frozen=True)
class ReplicaLoad:
    """What a replica reports about itself (its `record_routing_stats`), read by every router."""

    backlog_ms: float = 0.0  # its estimator's prediction for the jobs it has queued
    kv_used_bytes: float = 0.0
    kv_budget_bytes: float = 1.0
    sessions: int = 0
    round_ms: float = 0.0  # its estimator's time for one more short job: what a newcomer adds
    at: float = 0.0  # when it reported (tells a fresh report from the one already counted)

    @classmethod
    def of(cls, stats: Mapping | None) -> "ReplicaLoad":
        if not stats:
            return cls()
        names = cls.__dataclass_fields__
        return cls(**{k: float(v) if k != "sessions" else int(v) for k, v in stats.items() if k in names})

    def score(self, placed: int) -> tuple[float, float, int]:
        """Lower is better: predicted wait, share of KV in use, sessions (each counting `placed` newcomers)."""
        per_session = self.kv_used_bytes / self.sessions if self.sessions else 0.0
        kv_share = (self.kv_used_bytes + placed * per_session) / max(1.0, self.kv_budget_bytes)
        return self.backlog_ms + placed * self.round_ms, kv_share, self.sessions + placed


def rank(loads: Mapping[Hashable, ReplicaLoad], placed: Mapping[Hashable, int]) -> list[list[Hashable]]:
    """Replicas best first, one per rank (the router tries them in order)."""
    order = sorted(loads, key=lambda r: loads[r].score(placed.get(r, 0)))
    return [[r] for r in order]
