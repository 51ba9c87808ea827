"""A simulated edge device: the edge round of wisp_edge/engine.py and wisp_edge/client.py's retries, on SimPy time.

Speculative request (`speculative`): open a session (429/503: wait Retry-After, up to 60 s as the client
does), receive the first token, prefill the drafter on the device, then rounds until the answer is done.
Every decision is the engine's own round plan (wisp_edge/round_plan.py): the budget, a cloud round (empty
draft) while the drafter prefills longer than SHORT_PREFILL_S, whether to draft ahead during a round trip,
how many tokens may start before the answer is expected, and whether the block drafted ahead is kept.
What is simulated here is only what the device and the network would do:
  drafting: token by token, policy.stop_after_stats(index, stats of that token's distribution) from the
  acceptance model, each token's time from the device profile
  the round trip: the block goes up, the server verifies it in some batch, the reply comes back; the verdict
  is the acceptance model's; policy.observe(drafted, accepted, VerifyReply(...), rtt, per-token drafting ms)
  drafting ahead (`draft_ahead`): tokens of the device's speed started during the round trip (the one in
  progress when the reply comes is finished first); a kept block's tokens cost no drafting time next round
An evicted or preempted session (410) is resumed with the committed tokens and the round is sent again.
The policy is the production object (a new one per request, as `EdgeAgent.engine()` builds one per
generation); only the drafter is replaced: its per-token statistics and the target's verdicts come from
the acceptance model, its speed from the device profile.

Centralized request (`centralized`): the prompt goes up, the server decodes every token, tokens stream
down (in order, each after its own one-way delay).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import simpy

from tools.sim import network as net
from tools.sim.acceptance import RequestPath
from tools.sim.devices import DeviceProfile
from tools.sim.metrics import RequestRecord
from tools.sim.server import Refused, SimServer
from wisp_edge.round_plan import SHORT_PREFILL_S, Round, RoundPlan
from wisp_edge.wire.protocol import VerifyReply

CLIENT_MAX_WAIT_S = 60.0  # HttpVerifier.max_wait_s


CORE_SLICE_MS = 4.0  # a shared core's turn: about the Linux scheduler's slice when a few tasks compete


@dataclass
class Device:
    index: int
    profile: DeviceProfile
    link: net.Link
    rng: np.random.Generator
    core: simpy.Resource | None = None  # a CPU core shared with other devices (the validation setup), else its own

    def compute(self, env: simpy.Environment, ms: float):
        """`ms` of this device's CPU work (drafting, prefill): on its own core, just that long; on a shared core,
        in turns of CORE_SLICE_MS with the other devices' work (processor sharing, as the OS shares one core)."""
        if self.core is None:
            if ms > 0:
                yield env.timeout(ms / 1000.0)
            return
        while ms > 1e-9:
            piece = min(ms, CORE_SLICE_MS)
            with self.core.request() as turn:
                yield turn
                yield env.timeout(piece / 1000.0)
            ms -= piece


@dataclass
class Block:
    drafted: int
    accepted: int
    times_ms: list[float] = field(default_factory=list)
    hidden: int = 0  # leading tokens drafted during the previous round trip: their time is already spent


def draft_block(policy, path: RequestPath, cursor: int, budget: int, device: DeviceProfile, charge_predictor: bool,
                rng: np.random.Generator) -> Block:
    """Drafting.block with the drafter replaced by the path: one token at a time, the policy decides."""
    first_rejection = None
    drafted = 0
    for index in range(budget):
        stats = path.row(cursor, index, first_rejection)
        if first_rejection is None and not path.accepted[cursor + index]:
            first_rejection = index
        drafted += 1
        if policy.stop_after_stats(index, stats):
            break
    accepted = drafted if first_rejection is None else first_rejection
    times = device.draft_ms * np.exp(rng.normal(0.0, device.jitter, drafted)) if device.jitter > 0 else \
        np.full(drafted, device.draft_ms)
    if charge_predictor:
        times = times + device.predictor_ms  # the policy's own time counts as drafting (the engine's timer)
    return Block(drafted, accepted, times.tolist())


def _open(env: simpy.Environment, server: SimServer, dev: Device, rec: RequestRecord, tokens: int, slo: float,
          *, mode: str, resume: bool, max_tokens: int = 0, on_token=None):
    """Open (or resume) a session; returns it once its prefill is done and the reply has arrived, else None."""
    give_up = env.now + CLIENT_MAX_WAIT_S
    while True:
        yield env.timeout(dev.link.one_way_s(net.SESSION_UP_BASE + net.PER_PROMPT_TOKEN * tokens, True, dev.rng))
        try:
            session, done = server.open_session(tokens, slo, mode=mode, resume=resume, max_tokens=max_tokens,
                                                on_token=on_token)
        except Refused as r:
            rec.refused += 1
            yield env.timeout(dev.link.one_way_s(net.SESSION_DOWN, False, dev.rng))
            if r.status == 413 or env.now + r.retry_after > give_up:
                return None
            yield env.timeout(r.retry_after)
            continue
        reply = yield done
        yield env.timeout(dev.link.one_way_s(net.SESSION_DOWN, False, dev.rng))
        if "error" in reply:  # preempted during its prefill: try again
            rec.resumes += 1
            continue
        return session


def ahead_started(plan: RoundPlan, rnd: Round, rtt_ms: float, token_ms: float) -> int:
    """AheadDrafter.verify on simulated time: tokens of `token_ms` each, started while the call is out, as the
    plan allows."""
    n = 0
    while n * token_ms <= rtt_ms and plan.may_start_ahead(rnd, n, n * token_ms, token_ms if n else None):
        n += 1
    return n


def speculative(env: simpy.Environment, server: SimServer, dev: Device, rec: RequestRecord, path: RequestPath,
                policy, charge_predictor: bool, drafter_prefill: str = "cloud", draft_ahead: bool = False):
    t_open = env.now
    session = yield from _open(env, server, dev, rec, rec.prompt_tokens, rec.slo, mode="speculative", resume=False)
    if session is None:
        rec.failed = True
        return
    rec.t_first = rec.t_last = env.now
    rec.tokens = 1
    rec.token_log.append((env.now, 1))
    plan = RoundPlan(rec.output_tokens)
    cursor, ahead_free = 0, 0
    token_ms = dev.profile.draft_ms + (dev.profile.predictor_ms if charge_predictor else 0.0)

    def round_trip(rnd: Round, block: Block):
        """Send one block (drafting time first), resume the session if it was evicted, commit the reply;
        drafts ahead during the round trip when the plan says so (sets `ahead_free` for the next block)."""
        nonlocal session, cursor, ahead_free
        drafting_ms = sum(block.times_ms[block.hidden:])
        if dev.core is not None:  # token by token on the shared core; the engine's timer reads the wall time,
            for i in range(block.hidden, block.drafted):  # turns waited for included, and so do the policies
                t = env.now
                yield from dev.compute(env, block.times_ms[i])
                block.times_ms[i] = (env.now - t) * 1000.0
            drafting_ms = 0.0
        t0 = env.now + drafting_ms / 1000.0
        while True:  # drafting and the uplink in one timeout: fewer events, same times
            yield env.timeout(drafting_ms / 1000.0 +
                              dev.link.one_way_s(net.VERIFY_UP_BASE + net.PER_DRAFT_TOKEN * block.drafted, True, dev.rng))
            drafting_ms = 0.0
            try:
                reply = yield server.verify(session, block.drafted, block.accepted, plan.net_ms)
            except Refused:
                reply = {"error": 410}
            yield env.timeout(dev.link.one_way_s(net.VERIFY_DOWN, False, dev.rng))
            yield from dev.compute(env, dev.profile.round_cpu_ms)
            if "error" not in reply:
                break
            rec.resumes += 1  # evicted or preempted: reopen with the committed tokens, resend the round
            session = yield from _open(env, server, dev, rec, rec.prompt_tokens + rec.tokens, rec.slo,
                                       mode="speculative", resume=True)
            if session is None:
                rec.failed = True
                return False
        rtt_ms = (env.now - t0) * 1000.0
        accepted = reply["accepted"]
        ahead_free = 0
        if draft_ahead and plan.drafts_ahead(rec.tokens, rnd, block.drafted):
            started = ahead_started(plan, rnd, rtt_ms, token_ms)
            yield env.timeout(max(0.0, started * token_ms - rtt_ms) / 1000.0)  # the token in progress ends first
            guess = cursor + block.drafted
            if plan.keep_ahead(block.drafted, accepted, started > 0 and guess < len(path) and path.accepted[guess]):
                ahead_free = started - 1
        result = VerifyReply(accepted, 0, accepted == block.drafted, reply["verify_ms"], reply["queue_ms"],
                             reply["batch_size"], reply["suggested_max_draft"], token_ms=reply["token_ms"])
        plan.observe(rtt_ms, reply["verify_ms"], reply["queue_ms"], block.times_ms)
        policy.observe(block.drafted, accepted, result, rtt_ms, block.times_ms)
        rec.add_round(block.drafted, accepted, block.times_ms, reply["queue_ms"], reply["verify_ms"], rtt_ms,
                      block.hidden)
        cursor += accepted + 1
        rec.tokens += accepted + 1
        rec.t_last = env.now
        rec.token_log.append((env.now, accepted + 1))
        return True

    # The engine prefills the drafter (prompt + first token) after the session opens. "cloud" (the engine's
    # default, decode_while_prefilling): a prefill longer than SHORT_PREFILL_S runs while the verifier decodes
    # (cloud rounds), then the drafter catches up on those tokens. "sequential": the device waits for it.
    # What-ifs: "overlapped" prefills the prompt while the server does; "free" costs nothing.
    prefill_s = (rec.prompt_tokens + 1) / dev.profile.prefill_tok_s
    if drafter_prefill == "cloud" and prefill_s > SHORT_PREFILL_S:
        prefill = env.process(dev.compute(env, prefill_s * 1000.0))  # in the background, on the device's CPU
        decoded = 0
        while not prefill.processed and not plan.finished(rec.tokens):
            before = rec.tokens
            if not (yield from round_trip(plan.next_round(rec.tokens, None), Block(0, 0))):
                return
            decoded += rec.tokens - before
            rec.cloud_rounds += 1
        if not plan.finished(rec.tokens):
            yield prefill
        prefill_s = decoded / dev.profile.prefill_tok_s  # then the drafter catches up on the cloud's tokens
    elif drafter_prefill == "overlapped":
        prefill_s = max(1.0 / dev.profile.prefill_tok_s, t_open + prefill_s - env.now)
    elif drafter_prefill == "free":
        prefill_s = 0.0
    if not plan.finished(rec.tokens):
        yield from dev.compute(env, prefill_s * 1000.0)
    while not plan.finished(rec.tokens):
        rnd = plan.next_round(rec.tokens, policy.max_draft(), ahead_free)
        block = draft_block(policy, path, cursor, rnd.budget, dev.profile, charge_predictor, dev.rng)
        block.hidden = min(rnd.reuse, block.drafted)
        if not (yield from round_trip(rnd, block)):
            return
    server.close(session)


def centralized(env: simpy.Environment, server: SimServer, dev: Device, rec: RequestRecord):
    arrivals: list[float] = []

    def on_token(t_done: float, index: int) -> None:  # streamed in order: never before the previous one
        t = t_done + dev.link.one_way_s(net.STREAM_CHUNK, False, dev.rng)
        arrivals.append(max(t, arrivals[-1]) if arrivals else t)

    session = yield from _open(env, server, dev, rec, rec.prompt_tokens, rec.slo, mode="centralized", resume=False,
                               max_tokens=rec.output_tokens, on_token=on_token)
    if session is None:
        rec.failed = True
        return
    if rec.output_tokens > 1:
        reply = yield session.finished
        if "error" in reply:
            rec.failed = True
    server.close(session)
    if arrivals:
        yield env.timeout(max(0.0, arrivals[-1] - env.now))
        rec.t_first, rec.t_last, rec.tokens = arrivals[0], arrivals[-1], len(arrivals)
        rec.token_log = [(t, 1) for t in arrivals]
        rec.rounds = len(arrivals) - 1
