"""Generation off the UI thread: the edge agent (drafter here, verifier over HTTP) in a background thread.

The worker never touches widgets: it hands plain events to `post`, which the app wraps with Kivy's
Clock so they are applied on the UI thread (tests pass a queue). A turn keeps the token ids it has
committed, so when the verifier goes away (or is overloaded) mid-answer the worker waits for it and
continues from prompt + committed tokens in a new session: under greedy decoding the answer is the
same as if nothing had happened, and no committed token is lost. A wrong API key, a drafter that
does not fit the served model, a missing drafter file end the turn with a readable message.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from mobile_app.state import AppSettings
from wisp_edge.agent import EdgeAgent
from wisp_edge.client import VerifierBusy, VerifierRequestError, VerifierUnreachable
from wisp_edge.drafters import load_drafter
from wisp_edge.drafters.base import Drafter
from wisp_edge.engine import SpeculativeEngine
from wisp_edge.health import is_healthy
from wisp_edge.wire.protocol import VerifierUnavailable
from wisp_edge.wire.text import IncrementalDecoder
from wisp_edge.wire.vocab import VocabMismatchError

log = logging.getLogger("wisp.app")

BUSY_FALLBACK_S = 2.0  # when a refusal carries no Retry-After


# --- events (worker -> UI thread); `turn` lets the UI drop what a cancelled turn still sends ----------

@dataclass(frozen=True)
class LiveStats:
    tokens: int
    tokens_per_s: float
    acceptance: float  # accepted / drafted over this answer's rounds
    draft_length: int  # tokens drafted in the latest round
    rtt_ms: float  # the latest verify round trip (network + queue + verification)
    rounds: int


@dataclass(frozen=True)
class Progress:
    """Committed text: `piece` decodes one or more tokens; `from_draft` is the last token's flag."""

    turn: int
    piece: str
    from_draft: bool
    stats: LiveStats | None  # None: unchanged


@dataclass(frozen=True)
class Notice:
    """Something went wrong and the worker is retrying by itself (unreachable, overloaded)."""

    turn: int
    text: str
    kind: str  # "unreachable" | "busy"


@dataclass(frozen=True)
class Failed:
    """The turn ended on an error that retrying will not fix."""

    turn: int
    text: str


@dataclass(frozen=True)
class Activity:
    """What the worker is doing, for the status line ('loading the drafter', 'connecting')."""

    turn: int
    text: str


@dataclass(frozen=True)
class Finished:
    turn: int
    cancelled: bool
    tokens: int


@dataclass(frozen=True)
class Reachability:
    url: str
    reachable: bool


class _ObservedAgent(EdgeAgent):
    """The edge agent, remembering the engine of the generation in progress for live round statistics."""

    current: SpeculativeEngine | None = None

    def engine(self, **overrides) -> SpeculativeEngine:
        self.current = super().engine(**overrides)
        return self.current


class GenerationWorker:
    """One turn at a time in a daemon thread; `cancel` ends it at the next committed token (at once in a wait)."""

    def __init__(self, post: Callable[[object], None], *, health_poll_s: float = 1.0) -> None:
        self.post = post
        self.health_poll_s = health_poll_s
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._drafter: tuple[tuple[str, int], Drafter] | None = None  # kept across turns and setting changes
        self._agent: tuple[dict, _ObservedAgent] | None = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, turn: int, messages: list[dict], settings: AppSettings) -> None:
        if self.busy:
            raise RuntimeError("a generation is already running")
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(turn, list(messages), settings, self._cancel),
                                        name=f"wisp-generation-{turn}", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        self._cancel.set()

    def join(self, timeout_s: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout_s)
        return not self.busy

    def close(self) -> None:
        self.cancel()
        self.join(2.0)
        if self._agent is not None:
            self._agent[1].close()

    # --- the turn ----------------------------------------------------------------------------------

    def _run(self, turn: int, messages: list[dict], settings: AppSettings, cancel: threading.Event) -> None:
        committed: list[int] = []
        try:
            agent = self._agent_for(turn, settings)
            decoder = IncrementalDecoder(agent.detokenize)
            while not cancel.is_set():
                try:
                    self._generate(turn, agent, messages, settings, committed, decoder, cancel)
                    break
                except VerifierUnreachable:
                    agent.info = None  # the server that comes back may be another one: ask it again
                    self.post(Reachability(settings.server_url, False))
                    self.post(Notice(turn, f"Cannot reach the verifier at {settings.server_url} — retrying…",
                                     "unreachable"))
                    self._wait_until_reachable(settings.server_url, cancel)
                except VerifierBusy as exc:
                    wait = getattr(exc, "retry_after_s", None) or BUSY_FALLBACK_S
                    self.post(Notice(turn, f"The verifier is overloaded; retry in {wait:.0f} s", "busy"))
                    cancel.wait(wait)
            tail = decoder.flush()
            if tail:
                self.post(Progress(turn, tail, False, None))  # a character split at the very end
        except Exception as exc:  # every failure becomes a message in the chat, never a crash
            self.post(Failed(turn, _readable(exc, settings)))
            if not isinstance(exc, (VerifierRequestError, VocabMismatchError, FileNotFoundError)):
                log.exception("generation failed")
        self.post(Finished(turn, cancel.is_set(), len(committed)))

    def _generate(self, turn: int, agent: _ObservedAgent, messages: list[dict], settings: AppSettings,
                  committed: list[int], decoder: IncrementalDecoder, cancel: threading.Event) -> None:
        """One attempt: continue the answer from the tokens committed so far, until EOS or the token budget."""
        if agent.info is None:
            self.post(Activity(turn, f"connecting to {settings.server_url}…"))
        prompt = agent.chat_ids(messages)
        self.post(Reachability(settings.server_url, True))
        budget = settings.max_tokens - len(committed)
        if budget <= 0:
            return
        started = time.perf_counter()
        base = len(committed)
        tokens = agent.generate(prompt + committed, max_new_tokens=budget, params=settings.sampling(), cancel=cancel)
        try:
            for token in tokens:
                if token.id in agent.eos_ids:
                    break
                committed.append(token.id)
                piece = decoder.push(token.id)
                stats = _live_stats(agent, len(committed) - base, started)
                self.post(Progress(turn, piece, token.from_draft, stats))
                if cancel.is_set():
                    break
        finally:
            tokens.close()

    def _agent_for(self, turn: int, settings: AppSettings) -> _ObservedAgent:
        """The drafter is loaded once per (file, threads); the agent is rebuilt when the connection changes."""
        edge = settings.edge_settings()
        drafter_key = (edge.drafter, edge.threads)
        if self._drafter is None or self._drafter[0] != drafter_key:
            self.post(Activity(turn, f"loading the drafter {edge.drafter}…"))
            if self._agent is not None:
                self._agent[1].close()
                self._agent = None
            if self._drafter is not None:
                self._drafter[1].close()
                self._drafter = None
            self._drafter = (drafter_key, load_drafter(edge.drafter, n_threads=edge.threads))
        config = edge.model_dump()
        if self._agent is None or self._agent[0] != config:
            if self._agent is not None:
                self._agent[1].close()
            self._agent = (config, _ObservedAgent(edge, drafter=self._drafter[1]))
        return self._agent[1]

    def _wait_until_reachable(self, url: str, cancel: threading.Event) -> None:
        while not cancel.wait(self.health_poll_s):
            if is_healthy(url):
                self.post(Reachability(url, True))
                return


def _live_stats(agent: _ObservedAgent, tokens: int, started: float) -> LiveStats:
    """`tokens` committed since `started` (this attempt), with the rounds of the engine in use."""
    rounds = agent.current.stats.rounds if agent.current is not None else []
    drafted = sum(r.drafted for r in rounds)
    accepted = sum(r.accepted for r in rounds)
    elapsed = time.perf_counter() - started
    return LiveStats(tokens=tokens, tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0,
                     acceptance=accepted / drafted if drafted else 0.0,
                     draft_length=rounds[-1].drafted if rounds else 0,
                     rtt_ms=rounds[-1].rtt_ms if rounds else 0.0, rounds=len(rounds))


def _readable(exc: Exception, settings: AppSettings) -> str:
    if isinstance(exc, VerifierRequestError):
        if exc.status == 401:
            return "The verifier refused the API key (401). Check it in Settings."
        return f"The verifier refused the request ({exc.status} {exc.code}): {exc.message}"
    if isinstance(exc, VocabMismatchError):
        return f"This drafter cannot work with the served model: {exc}"
    if isinstance(exc, FileNotFoundError):
        return f"Cannot load the drafter ({exc}). Choose another one in Settings."
    if isinstance(exc, VerifierUnavailable):
        return f"The verifier at {settings.server_url} is unavailable: {exc}"
    return f"Something went wrong: {exc.__class__.__name__}: {exc}"
