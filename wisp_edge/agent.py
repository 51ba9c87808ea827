"""The edge agent: one drafter and one verifier connection, shared by the CLI, the local API and the app.

It learns what the verifier serves (`/v1/info`: vocabulary fingerprint, chat template, EOS ids,
limits) and refuses a drafter with another vocabulary; it renders chats with the served model's
template and tokenizes on the device (token ids cross the wire). A drafter holds one sequence, so
generations take turns (a lock); `agenerate` runs one in a worker thread and hands its tokens to
asyncio, for the local OpenAI-compatible API. Prometheus counters (`wisp_edge_*`) count drafts,
draft tokens, accepted tokens and acceptance per position in the block.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram

from wisp_edge.client import HttpVerifier
from wisp_edge.controller.policy import make_policy
from wisp_edge.drafters import load_drafter
from wisp_edge.drafters.base import Drafter
from wisp_edge.drafters.counters import DrafterCounters
from wisp_edge.engine import CommittedToken, DraftPolicy, GenerationStats, SpeculativeEngine
from wisp_edge.wire.openai import TextModel
from wisp_edge.wire.protocol import VerifierUnavailable
from wisp_edge.wire.sampling import SamplingParams
from wisp_edge.settings import EdgeSettings
from wisp_edge.wire.vocab import VocabMismatchError, fingerprint


class EdgeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.drafts = Counter("wisp_edge_drafts", "Verify rounds (draft blocks sent)", registry=r)
        self.draft_tokens = Counter("wisp_edge_draft_tokens", "Tokens drafted and sent for verification", registry=r)
        self.accepted_tokens = Counter("wisp_edge_accepted_tokens", "Drafted tokens the verifier accepted", registry=r)
        self.accepted_per_position = Counter("wisp_edge_accepted_per_position",
                                             "Accepted drafted tokens by their position in the block",
                                             ["position"], registry=r)
        self.emitted_tokens = Counter("wisp_edge_emitted_tokens", "Tokens committed and returned", registry=r)
        self.unverified_tokens = Counter("wisp_edge_unverified_tokens",
                                         "Drafter-only tokens returned while the verifier was unreachable", registry=r)
        self.wasted_drafting = Counter("wisp_edge_wasted_drafting_seconds",
                                       "Drafting time spent on tokens after the first rejection", registry=r)
        self.round_seconds = Histogram("wisp_edge_verify_round_seconds", "Round trip of a verify call",
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=r)
        self.faults = Counter("wisp_edge_faults", "Faults the client rode out without losing a token: retries "
                              "(network), replayed_rounds (a cut reply answered from the server's record), "
                              "busy_waits (429/503 waited out), resumes", ["kind"], registry=r)
        self.cloud_rounds = Counter("wisp_edge_cloud_rounds", "Rounds the verifier decoded alone (empty draft) "
                                    "while the drafter prefilled the prompt", registry=r)
        self.ahead_ready = Counter("wisp_edge_ahead_ready_rounds", "Rounds whose block was drafted while the "
                                   "previous one was being verified (drafting ahead)", registry=r)
        self.ahead_wasted = Counter("wisp_edge_ahead_wasted_drafting_seconds", "Drafting ahead rolled back (a wrong "
                                    "guess or a rejected block); it overlapped a round trip", registry=r)
        self.drafter_prefill = Histogram("wisp_edge_drafter_prefill_seconds", "The drafter's prompt prefill",
                                         buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)

    def record(self, stats: GenerationStats) -> None:
        """Count one finished (or cancelled) generation."""
        for r in stats.rounds:
            self.drafts.inc()
            self.draft_tokens.inc(r.drafted)
            self.accepted_tokens.inc(r.accepted)
            for position in range(r.accepted):
                self.accepted_per_position.labels(str(position)).inc()
            self.wasted_drafting.inc(r.wasted_drafting_ms / 1000)
            self.round_seconds.observe(r.rtt_ms / 1000)
        for kind, n in stats.faults.items():
            if n:
                self.faults.labels(kind).inc(n)
        self.cloud_rounds.inc(stats.cloud_rounds)
        self.ahead_ready.inc(stats.ahead_ready)
        self.ahead_wasted.inc(stats.ahead_wasted_ms / 1000)
        if stats.drafter_prefill_ms:
            self.drafter_prefill.observe(stats.drafter_prefill_ms / 1000)


class EdgeAgent:
    def __init__(self, settings: EdgeSettings, *, drafter: Drafter | None = None,
                 backend: HttpVerifier | None = None) -> None:
        self.settings = settings
        self.drafter = drafter or load_drafter(settings.drafter, n_threads=settings.threads, n_ctx=settings.n_ctx,
                                               state_cache=settings.state_cache)
        self.backend = backend or HttpVerifier(settings.server, api_key=settings.api_key,
                                               timeout_s=settings.timeout_s, max_wait_s=settings.max_wait_s)
        self.metrics = EdgeMetrics()
        self.metrics.registry.register(DrafterCounters(self.drafter))  # prefill and prefix-reuse token counters
        self.info: dict | None = None
        self._lock = threading.Lock()
        self.last_stats = GenerationStats()
        # One controller for the agent's life: what it learns of the network, the drafter's speed and
        # the acceptance carries over from one generation to the next (generations take turns).
        self.policy = make_policy(settings.policy, self.drafter, k_max=settings.k_max,
                                  draft_length=settings.draft_length)

    def connect(self) -> dict:
        """Ask the verifier what it serves and check the drafter speaks the same vocabulary."""
        info = self.backend.info()
        mine = fingerprint(self.drafter.token_pieces())
        if mine != info["vocab_fingerprint"]:
            raise VocabMismatchError(f"drafter {self.drafter.name} has vocabulary {mine} but {info['model']} has "
                                     f"{info['vocab_fingerprint']} (size:hash): they cannot speculate together")
        self.info = info
        return info

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return tuple(self._info()["eos_token_ids"])

    def _info(self) -> dict:
        if self.info is not None:
            return self.info
        try:
            return self.connect()
        except VerifierUnavailable:
            if not self.settings.allow_local or not hasattr(self.drafter, "offline_info"):
                raise
            # No verifier to ask: the drafter's own EOS and chat template; nothing will be verified.
            offline = self.drafter.offline_info()
            return {"model": self.drafter.name, "vocab_size": self.drafter.vocab_size,
                    "vocab_fingerprint": fingerprint(self.drafter.token_pieces()), "max_seq_len": self.settings.n_ctx,
                    **offline}

    def text_model(self) -> TextModel:
        info = self._info()
        template = (info["chat_template"], info.get("bos_token") or "", info.get("eos_token") or "") \
            if info.get("chat_template") else None
        return TextModel(info["model"], min(info["max_seq_len"], self.settings.n_ctx), info["vocab_size"],
                         frozenset(info["eos_token_ids"]), template)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        return self.tokenize(self.text_model().render_chat(messages))

    def tokenize(self, text: str) -> list[int]:
        """As the target's tokenizer does by default (special tokens in the text are parsed)."""
        return self.drafter.tokenize(text)

    def detokenize(self, ids: list[int]) -> str:
        return self.drafter.detokenize(ids)

    def engine(self, *, policy: DraftPolicy | None = None, backend: HttpVerifier | None = None,
               draft_ahead: bool | None = None) -> SpeculativeEngine:
        """An engine for one generation, as the settings say; the benchmark swaps in its own policy,
        backend (with an emulated round trip) and drafting-ahead choice."""
        return SpeculativeEngine(self.drafter, backend or self.backend, policy or self.policy, eos_ids=self.eos_ids,
                                 vocab_fingerprint=self._info()["vocab_fingerprint"],
                                 allow_local=self.settings.allow_local, slo_tokens_per_s=self.settings.slo_tokens_per_s,
                                 decode_while_prefilling=self.settings.decode_while_prefilling,
                                 draft_ahead=self.settings.draft_ahead if draft_ahead is None else draft_ahead)

    def generate(self, prompt_ids: list[int], *, max_new_tokens: int, params: SamplingParams = SamplingParams(),
                 cancel: threading.Event | None = None) -> Iterator[CommittedToken]:
        """Committed tokens one by one (EOS included); generations on one drafter take turns."""
        with self._lock:
            engine = self.engine()
            tokens = engine.generate(prompt_ids, max_new_tokens=max_new_tokens, params=params)
            try:
                for token in tokens:
                    if not token.verified:
                        self.metrics.unverified_tokens.inc()
                    self.metrics.emitted_tokens.inc()
                    yield token
                    if cancel is not None and cancel.is_set():
                        break
            finally:
                tokens.close()
                self.last_stats = engine.stats
                self.metrics.record(engine.stats)

    async def agenerate(self, prompt_ids: list[int], *, max_new_tokens: int,
                        params: SamplingParams = SamplingParams()) -> AsyncIterator[int]:
        """`generate` in a worker thread, its tokens handed to the event loop; closing it cancels the run."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        done = object()

        def work() -> None:
            try:
                for token in self.generate(prompt_ids, max_new_tokens=max_new_tokens, params=params, cancel=cancel):
                    loop.call_soon_threadsafe(queue.put_nowait, token.id)
                loop.call_soon_threadsafe(queue.put_nowait, done)
            except BaseException as exc:  # handed to the consumer, which raises it
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        worker = loop.run_in_executor(None, work)
        try:
            while True:
                item = await queue.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()
            await asyncio.shield(worker)

    def close(self) -> None:
        self.backend.close()
