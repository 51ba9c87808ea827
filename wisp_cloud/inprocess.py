"""An in-process `VerifierBackend`: the edge engine calls the verifier directly, no network.

It is what the foundation's main job and the lossless tests use; the HTTP server wraps the
same `Verifier` with a queue and a scheduler.
"""

from __future__ import annotations

import itertools
import time

from wisp_cloud.verifier import TargetSession, Verifier
from wisp_edge.wire.protocol import SessionStart, SessionStarted, VerifyRequest, VerifyReply
from wisp_edge.wire.vocab import VocabMismatchError


class InProcessVerifier:
    def __init__(self, verifier: Verifier, *, vocab_fingerprint: str | None = None) -> None:
        self.verifier = verifier
        self.vocab_fingerprint = vocab_fingerprint
        self.sessions: dict[str, TargetSession] = {}
        self._ids = itertools.count(1)

    def start_session(self, request: SessionStart) -> SessionStarted:
        if request.vocab_fingerprint and self.vocab_fingerprint and request.vocab_fingerprint != self.vocab_fingerprint:
            raise VocabMismatchError(f"drafter vocabulary {request.vocab_fingerprint} differs from the target's "
                                     f"{self.vocab_fingerprint}")
        session = self.verifier.open(f"s{next(self._ids)}", request.prompt_ids, request.sampling)
        t0 = time.perf_counter()
        (first,) = self.verifier.prefill([session])
        self.sessions[session.session_id] = session
        return SessionStarted(session.session_id, first, prefill_ms=(time.perf_counter() - t0) * 1000,
                              position=len(request.prompt_ids) + 1)

    def verify(self, request: VerifyRequest) -> VerifyReply:
        session = self.sessions[request.session_id]
        t0 = time.perf_counter()
        block = request.block
        (verdict,) = self.verifier.verify([(session, block.position, block.draft_ids, block.q)])
        return VerifyReply(verdict.accepted, verdict.token, verdict.bonus, (time.perf_counter() - t0) * 1000,
                           position=session.position, round_id=block.round_id)

    def close_session(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)
