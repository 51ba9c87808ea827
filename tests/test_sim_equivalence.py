"""The simulator decides as the service does: one scripted scenario (sessions opening with given prompts and
SLOs, verify rounds of given lengths at given times, a KV pool of a few blocks so admission and eviction
matter) runs through the real VerifierService (a tiny model, a fake clock that each forward advances by the
simulated accelerator's time) and through SimServer; both must refuse the same sessions with the same code,
evict the same ones, and form the same batches (the same jobs, in order)."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import simpy

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.tiny_models import tiny_target  # noqa: E402
from tools.sim.server import ServerSettings, SimCache, SimServer  # noqa: E402
from tools.sim.server_profile import ForwardModel, ServerProfile  # noqa: E402
from wisp_cloud.admission import ACTIVE_WINDOW_S, Limits, Load, refusal, too_long  # noqa: E402
from wisp_cloud.dispatch import Dispatcher  # noqa: E402
from wisp_cloud.estimator import Margin, TimeEstimator  # noqa: E402
from wisp_cloud.generate import generate  # noqa: E402
from wisp_cloud.kv_ledger import KVLedger  # noqa: E402
from wisp_cloud.scheduler import FcfsScheduler, VerifyJob  # noqa: E402
from wisp_cloud.service import VerifierService  # noqa: E402
from wisp_cloud.session_table import SessionRecord, SessionTable  # noqa: E402
from wisp_cloud.settings import ServeSettings  # noqa: E402
from wisp_cloud.slo_window import SloWindow  # noqa: E402
from wisp_cloud.wisp_scheduler import WispScheduler  # noqa: E402
from wisp_edge.wire.errors import ApiError  # noqa: E402
from wisp_edge.wire.sampling import GREEDY  # noqa: E402

VOCAB = 32
COEFFS = (4.0, 0.5, 0.002, 0.01, 0.3)  # ms: launch, per new token, per new token x length, per cached token,
# per logit row
BLOCK = 8  # tokens per KV block
BLOCKS = 16  # the whole pool: 128 tokens
LIMITS = dict(max_batch_tokens=64, max_draft=8, max_sessions=5, max_queue=4, max_backlog_ms=80.0)


@dataclass(frozen=True)
class Open:
    name: str
    prompt: int
    slo: float | None


@dataclass(frozen=True)
class Round:
    name: str
    drafted: int
    accepted: int  # what the draft is built to get (the target's greedy tokens, then a wrong one)


@dataclass(frozen=True)
class Close:
    name: str


SCRIPT = [  # (time s, steps arriving together, in this order)
    (0.0, [Open("a", 40, 5.0), Open("b", 30, 10.0), Open("c", 60, None), Open("d", 20, 8.0)]),
    (1.0, [Round("a", 4, 2), Round("b", 6, 6), Round("d", 3, 0)]),
    (7.0, [Round("d", 2, 1), Open("e", 50, 5.0)]),  # a and b idle for 6 s: the least recently used makes room
    (8.0, [Round("a", 4, 4), Round("b", 4, 1), Round("e", 5, 3), Open("f", 20, 8.0)]),
    (9.0, [Round("b", 8, 8), Round("e", 8, 2), Round("d", 2, 2)]),
    (15.0, [Round("d", 3, 1), Open("g", 20, 8.0)]),  # e and b idle for 6 s: out of the active window
    (16.0, [Close("d"), Open("h", 8, 4.0), Open("i", 8, None), Open("j", 8, 4.0), Open("k", 8, None),
            Open("l", 8, 4.0)]),
    (17.0, [Round("g", 4, 3), Round("h", 2, 1), Round("i", 2, 2), Round("j", 2, 0), Round("e", 3, 3)]),
]


EXPECTED_OUTCOMES = [
    ["ok", "ok", "kv_full", "ok"],  # c: a's and b's queued prefills have reserved what is free
    ["ok", "ok", "ok"],
    ["ok", "ok"],  # e: a, idle for 6 s, is evicted for it (d's round is queued: d keeps its KV)
    ["session_evicted", "ok", "ok", "kv_full"],  # f: b, d and e, used within the active window, keep theirs
    ["ok", "ok", "ok"],
    ["ok", "ok"],  # g: b and e, idle for 6 s, make room
    ["ok", "ok", "ok", "ok", "ok", "overloaded"],  # j and k take the slots of idle b and e; l: 4 jobs queued
    ["ok", "ok", "ok", "ok", "session_evicted"],
]


def _estimator() -> TimeEstimator:
    est = TimeEstimator(COEFFS, margin=Margin(scale=1.1))
    est.refit_every = 1 << 62  # online refit off: the two runs plan with the same coefficients throughout
    return est


class _Recorder:
    """Spies on a scheduler's decisions: every batch formed, as (session id, kind, new tokens) per job."""

    def __init__(self, scheduler) -> None:
        self.batches: list[list[tuple]] = []
        self.last = None
        form_batch = scheduler.form_batch

        def spy(now, free, max_tokens):
            batch = form_batch(now, free, max_tokens)
            if batch.jobs:
                self.batches.append([(job.session_id, job.kind, job.new_tokens) for job in batch.jobs])
                self.last = batch
            return batch

        scheduler.form_batch = spy

    def named(self, names: dict) -> list[list[tuple]]:
        return [[(names[sid], kind, n) for sid, kind, n in batch] for batch in self.batches]


def _prompt(name: str, length: int) -> list[int]:
    return np.random.default_rng([ord(name)]).integers(0, VOCAB, length).tolist()


# --- the service ------------------------------------------------------------------------------------------

class _Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def _run_service(model, forward: ForwardModel) -> tuple[list, list, dict]:
    clock = _Clock()
    settings = ServeSettings(kv_block_tokens=BLOCK, online_refit=False, policy="wisp", **LIMITS)
    service = VerifierService(model, settings, _estimator(), model_id="tiny", vocab_fingerprint=None,
                              kv_budget_bytes=BLOCKS * BLOCK * model.kv_bytes_per_token, clock=clock)
    recorder = _Recorder(service.dispatch.scheduler)
    run_forward = service.batches._forward

    def forward_in_simulated_time(work):
        results, _ = run_forward(work)
        ms = forward.mean_ms([job.cost for job in recorder.last.jobs])
        clock.now += ms / 1000.0
        return results, ms

    service.batches._forward = forward_in_simulated_time
    ids, tokens, outcomes, verdicts = {}, {}, [], {}

    async def step(key: tuple, item) -> str:
        try:
            if isinstance(item, Open):
                prompt = _prompt(item.name, item.prompt)
                started = await service.create_session(prompt, GREEDY, slo_rate=item.slo)
                ids[item.name] = started.session_id
                tokens[item.name] = prompt + [started.first_token]
                return "ok"
            if item.name not in ids:
                return "never_opened"
            if isinstance(item, Close):
                service.close(ids[item.name])
                return "ok"
            committed = tokens[item.name]
            greedy = generate(model, committed, max_new_tokens=item.accepted + 1)
            draft = greedy[:item.accepted]
            if item.accepted < item.drafted:
                draft += [(greedy[item.accepted] + 1) % VOCAB] * (item.drafted - item.accepted)
            reply = await service.verify(ids[item.name], position=len(committed), round_id=len(committed),
                                         draft=draft, q=None)
            committed += draft[:reply["accepted"]] + [reply["token"]]
            verdicts[key] = reply["accepted"]
            return "ok"
        except ApiError as exc:
            return exc.code

    async def main():
        await service.start()
        for t, items in SCRIPT:
            assert clock.now <= t, "the script leaves each group time to finish"
            clock.now = t
            outcomes.append(await asyncio.gather(*(asyncio.create_task(step((t, i), item))
                                                   for i, item in enumerate(items))))
        await service.stop()

    asyncio.run(main())
    return outcomes, recorder.named({sid: name for name, sid in ids.items()}), verdicts


# --- the simulator ----------------------------------------------------------------------------------------

def _run_simulator(model, forward: ForwardModel, verdicts: dict) -> tuple[list, list, SimServer]:
    env = simpy.Environment()
    bytes_per_token = model.kv_bytes_per_token
    profile = ServerProfile("tiny", _estimator(), bytes_per_token, BLOCKS * BLOCK * bytes_per_token,
                            LIMITS["max_batch_tokens"], 0.0, COEFFS)
    server = SimServer(env, profile, WispScheduler(profile.estimator), forward, np.random.default_rng(0),
                       ServerSettings(kv_block_tokens=BLOCK, **LIMITS))
    recorder = _Recorder(server.scheduler)
    sessions, outcomes = {}, []

    def step(key: tuple, item):
        """Submit at once; returns the outcome now, or the event that will carry it."""
        try:
            if isinstance(item, Open):
                sessions[item.name], done = server.open_session(item.prompt, item.slo)
                return done
            if item.name not in sessions:
                return "never_opened"
            if isinstance(item, Close):
                server.close(sessions[item.name])
                return "ok"
            return server.verify(sessions[item.name], item.drafted, verdicts.get(key, 0), None)
        except ApiError as exc:
            return exc.code

    def driver():
        for t, items in SCRIPT:
            yield env.timeout(t - env.now)
            results = [step((t, i), item) for i, item in enumerate(items)]
            pending = [r for r in results if isinstance(r, simpy.Event)]
            if pending:
                yield env.all_of(pending)
            outcomes.append([r if isinstance(r, str) else "evicted_while_queued" if "error" in r.value else "ok"
                             for r in results])

    env.process(driver())
    env.run()
    return outcomes, recorder.named({s.id: name for name, s in sessions.items()}), server


def test_the_simulator_admits_evicts_and_batches_as_the_service_does():
    model = tiny_target(vocab=VOCAB, seed=3)
    forward = ForwardModel(COEFFS, 0.0)
    service_outcomes, service_batches, verdicts = _run_service(model, forward)
    sim_outcomes, sim_batches, server = _run_simulator(model, forward, verdicts)
    assert type(server.dispatch) is Dispatcher and type(server.scheduler) is WispScheduler
    assert service_outcomes == EXPECTED_OUTCOMES  # the scenario reaches the rules it is meant to
    assert sim_outcomes == service_outcomes
    assert sim_batches == service_batches


# --- the pure parts both drive ----------------------------------------------------------------------------

def test_the_parts_the_simulator_drives_import_without_torch():
    import subprocess

    code = "import sys, tools.sim.server, wisp_cloud.dispatch; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_admission_names_the_first_rule_broken():
    limits = Limits(max_queue=4, max_backlog_ms=100.0, max_sessions=2)
    calm = Load(queue_depth=1, backlog_ms=10.0, slo_attainment=1.0, slo_jobs=0, open_sessions=1, idle_session=False,
                kv_needed=100, kv_available=100)
    assert refusal(calm, limits) is None
    cases = [(dict(queue_depth=4, backlog_ms=2500.0), 429, "queue_full", 3.0),
             (dict(backlog_ms=101.0), 429, "backlog", 1.0),
             (dict(slo_attainment=0.45, slo_jobs=20), 429, "slo", 1.0),
             (dict(open_sessions=2), 503, "sessions_full", 1.0),
             (dict(kv_available=99), 503, "kv_full", 1.0)]
    for change, status, reason, retry in cases:
        refused = refusal(replace(calm, **change), limits)
        assert (refused.status, refused.reason, refused.retry_after) == (status, reason, retry), change
    assert refusal(replace(calm, open_sessions=2, idle_session=True), limits) is None  # one idle session makes room
    assert refusal(replace(calm, slo_attainment=0.0, slo_jobs=19), limits) is None  # too few rounds to judge
    assert refusal(replace(calm, slo_attainment=0.0, slo_jobs=50, queue_depth=0), limits) is None  # nothing queued
    assert too_long(10, 2048, 1024).status == 413 and too_long(10, 1024, 1024) is None


def test_the_slo_window_counts_the_latest_outcomes_of_the_last_seconds():
    window = SloWindow(window_s=10.0, kept=3)
    assert window.attainment(0.0) == (1.0, 0)
    for t, met in [(1.0, True), (2.0, False), (3.0, True), (4.0, True)]:
        window.record(t, met)
    assert window.attainment(4.0) == (2 / 3, 3)  # the first fell out of the three kept
    assert window.attainment(13.5) == (1.0, 1)  # only t = 4 is within 10 s
    assert window.attainment(20.0) == (1.0, 0)


def test_only_rounds_bound_by_the_token_rate_count_toward_attainment():
    """A prefill's deadline (one token's time after it was queued) is no rate: a cold prompt always misses
    it. Counted, every prefill was a miss and admission refused newcomers with `slo` for it."""
    dispatch = Dispatcher(FcfsScheduler(), TimeEstimator(), KVLedger(1 << 20, 64, 16), SessionTable(),
                          Limits(8, 1000.0, 8), max_batch_tokens=256, max_draft=8)
    session = SessionRecord("s", "speculative", slo_rate=4.0, first_token_time=0.0, last_used=0.0)

    def job(kind: str) -> VerifyJob:
        return VerifyJob(kind, "s", new_tokens=40 if kind == "prefill" else 5, cached_tokens=0,
                         draft_len=0 if kind == "prefill" else 4, arrival=0.0, slo_rate=4.0, kind=kind)

    late = 5.0  # seconds: past every deadline below
    assert dispatch.finish(job("prefill"), session, 0, late) is None
    assert dispatch.finish(job("resume"), session, 0, late) is None
    assert dispatch.slo.attainment(late) == (1.0, 0)
    assert dispatch.finish(job("verify"), session, 4, late) is False
    assert dispatch.slo.attainment(late) == (0.0, 1)


def test_an_empty_queue_does_not_hand_a_recent_sessions_kv_to_a_newcomer():
    """A session between two rounds keeps its KV against newcomers even at an instant when nothing is
    queued (its edge is drafting); only once it has been idle for ACTIVE_WINDOW_S may a newcomer take it."""
    ledger = KVLedger(budget_bytes=4 * 4 * 2, bytes_per_token=2, block_tokens=4)  # 4 blocks of 4 tokens
    sessions = SessionTable()
    dispatch = Dispatcher(FcfsScheduler(), TimeEstimator(), ledger, sessions, Limits(8, 1000.0, 8),
                          max_batch_tokens=256, max_draft=8)
    held = SessionRecord("held", "speculative", slo_rate=4.0, first_token_time=0.0, last_used=10.0)
    sessions.add(held)
    ledger.add("held", SimCache(capacity=ledger.planned_capacity(0, 12)))  # 3 of the 4 blocks
    assert len(dispatch) == 0  # nothing queued: the old rule called this a quiet server and took held's KV
    refused, _ = dispatch.admission(10.0 + ACTIVE_WINDOW_S / 2, prompt_tokens=7)
    assert refused is not None and refused.code == "kv_full"
    refused, _ = dispatch.admission(10.0 + ACTIVE_WINDOW_S + 0.1, prompt_tokens=7)
    assert refused is None  # idle past the window: it makes room (and resends its tokens when it returns)


def test_the_ledger_reserves_queued_growth_and_evicts_the_least_recent_unkept():
    ledger = KVLedger(budget_bytes=10 * 4 * 2, bytes_per_token=2, block_tokens=4)  # 10 blocks of 4 tokens
    caches = {sid: SimCache(capacity=ledger.planned_capacity(0, n)) for sid, n in zip("abc", (9, 5, 3))}
    for sid, cache in caches.items():
        ledger.add(sid, cache)
    assert ledger.used_bytes == (12 + 8 + 4) * 2 and ledger.growth_bytes(caches["b"], 9) == 4 * 2
    ledger.reserve("job", 8)
    assert ledger.reserved_bytes == 8
    ledger.unreserve("job")
    ledger.touch("a")  # b is now least recently used, then c, then a
    assert ledger.evictable_bytes(lambda sid: sid == "c") == (12 + 8) * 2
    assert ledger.evict_for(ledger.free_bytes + 4 * 2, busy=lambda sid: sid == "b") == ["c"]
    assert "c" not in ledger and ledger.evictions == 1
