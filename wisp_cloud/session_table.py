"""Open sessions: the round state scheduling reads, the table the service looks them up in, and what it
remembers of rounds it answered (retries are idempotent) and of sessions it dropped (so a returning edge
hears "evicted, resend your tokens" rather than "unknown").

A session belongs to the API key that opened it (`owner`, a hash of the key): any other key hears 404, as
if the session did not exist.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from wisp_edge.wire.errors import ApiError

if TYPE_CHECKING:
    from wisp_cloud.verifier import TargetSession

ACCEPTANCE_DECAY = 0.2  # weight of the latest round (about five rounds remembered: 0.3 biased alpha low)
ACCEPTANCE_PRIOR_TOKENS = 2.0  # the prior alpha counts as this many judged tokens
REPLY_MEMORY = 8  # rounds whose replies a session keeps for retries
TOMBSTONES = 65536  # forgotten session ids remembered


@dataclass(eq=False)
class SessionRecord:
    """What the scheduler and admission read of a session; the service and the simulator extend it."""

    id: Hashable
    mode: str  # "speculative" | "centralized"
    slo_rate: float | None
    first_token_time: float
    last_used: float
    generated: int = 0  # committed since the first target token (the SLO's N)
    alpha: float = 0.6  # per-token acceptance probability (the scheduler's E = sum alpha^j), see record_round
    downlink_s: float = 0.0
    busy: bool = False  # a job is queued or running
    closed: bool = False
    judged: float = ACCEPTANCE_PRIOR_TOKENS  # EWMA of draft tokens judged per round (accepted + the rejected one)

    def record_round(self, kind: str, accepted: int, draft_len: int, done: float) -> None:
        """A job of this session finished at `done`: its acceptance, its progress, the SLO clock.

        alpha is the per-token probability a draft survives, which is what the scheduler's E reads: a round
        judged accepted + 1 tokens (accepted of them survived, then one rejection) or all k when none was
        rejected, and alpha = EWMA(accepted) / EWMA(judged), the geometric model's estimate. (The share of a
        block accepted, accepted / k, is not it: a per-token 0.9 gives ~0.64 at k = 8, so E came out low,
        deadlines early and jobs were demoted needlessly.)"""
        if draft_len:
            hits = self.alpha * self.judged
            self.judged = (1 - ACCEPTANCE_DECAY) * self.judged + ACCEPTANCE_DECAY * min(draft_len, accepted + 1)
            hits = (1 - ACCEPTANCE_DECAY) * hits + ACCEPTANCE_DECAY * accepted
            self.alpha = hits / self.judged
        if kind == "prefill":
            self.first_token_time = done
        elif kind == "resume":
            self.first_token_time, self.generated = done, 0  # the SLO clock restarts with the session
        else:
            self.generated += 1 + accepted


@dataclass(eq=False, kw_only=True)
class Session(SessionRecord):
    """A served session: the target's side of it, its owner, and its recent replies."""

    target: TargetSession
    owner: str | None = None  # id of the API key that opened it (None: the server runs without keys)
    replies: OrderedDict[int, tuple[int, dict]] = field(default_factory=OrderedDict)
    pending_round: tuple[int, int, Any] | None = None  # (round id, position, future of its reply)

    @property
    def cache(self):
        return self.target.cache

    @property
    def position(self) -> int:
        """Tokens committed on the server."""
        return self.target.position

    def replay(self, round_id: int, position: int) -> dict | None:
        """The reply already given to this round drafted at `position`, if any."""
        kept = self.replies.get(round_id)
        return {**kept[1], "replayed": True} if kept is not None and kept[0] == position else None

    def remember(self, round_id: int, position: int, reply: dict) -> None:
        self.replies[round_id] = (position, reply)
        while len(self.replies) > REPLY_MEMORY:
            self.replies.popitem(last=False)


class SessionTable:
    def __init__(self, tombstones: int = TOMBSTONES) -> None:
        self._sessions: dict[Hashable, SessionRecord] = {}
        self._tombstones: OrderedDict[Hashable, tuple[str, str | None]] = OrderedDict()  # id -> (reason, owner)
        self._tombstone_limit = tombstones
        self.speculative = 0  # open speculative sessions (the fair share of the batch budget)

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[SessionRecord]:
        return iter(list(self._sessions.values()))

    def lookup(self, session_id: Hashable) -> SessionRecord | None:
        return self._sessions.get(session_id)

    def add(self, session: SessionRecord) -> None:
        self._sessions[session.id] = session
        self.speculative += session.mode == "speculative"

    def pop(self, session_id: Hashable) -> SessionRecord | None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            self.speculative -= session.mode == "speculative"
        return session

    def get(self, session_id: str, owner: str | None = None) -> Session:
        """The session, if `owner` opened it; 404 for an unknown session or another key's, 410 if it was dropped."""
        session = self._sessions.get(session_id)
        if session is not None and session.owner == owner:
            return session
        reason, dropped_owner = self._tombstones.get(session_id, (None, None))
        if reason and dropped_owner == owner:
            raise ApiError(410, "session_evicted", f"session {session_id} was {reason}: open a new session "
                                                   "with your committed tokens and resume=true")
        raise ApiError(404, "unknown_session", f"no session {session_id} (the server may have restarted): "
                                               "open a new session with your committed tokens and resume=true")

    def tombstone(self, session: Session, reason: str) -> None:
        self._tombstones[session.id] = (reason, session.owner)
        while len(self._tombstones) > self._tombstone_limit:
            self._tombstones.popitem(last=False)

    def busy(self, session_id: Hashable) -> bool:
        session = self._sessions.get(session_id)
        return session is not None and session.busy

    def least_recent_idle(self) -> SessionRecord | None:
        """The idle session used longest ago (the one to drop when every slot is taken)."""
        return min((s for s in self._sessions.values() if not s.busy), key=lambda s: s.last_used, default=None)

    def expired(self, now: float, ttl_s: float) -> list[SessionRecord]:
        return [s for s in self._sessions.values() if not s.busy and now - s.last_used > ttl_s]
