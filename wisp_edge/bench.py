"""`wisp-edge bench`: how the speculation policies fare on this device, against this verifier.

For each emulated extra round trip and each policy it runs the same greedy prompts and reports
tokens/s, wasted drafting time per token (drafting spent on tokens after the first rejection),
tokens per round and the controller's own time per token. Greedy, so every policy must produce
the same tokens: a difference is reported as a lossless failure. Extra round trip is emulated in
the client (an httpx transport that sleeps half before the request and half after the reply), so
the verifier still serves a real round. `tools/bench_edge.py` runs this against a verifier it
starts on loopback.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import numpy as np

from wisp_edge.client import HttpVerifier
from wisp_edge.controller.policy import make_policy

QUESTIONS = (
    "Why is the sky blue?",
    "Give me three tips for learning to cook.",
    "What is the capital of France, and what is it known for?",
    "Explain what a CPU does in simple words.",
    "Write a short poem about the sea.",
    "How do plants make their food?",
)


class DelayedTransport(httpx.HTTPTransport):
    """Adds a fixed round trip: half before the request leaves, half before the reply is read."""

    def __init__(self, rtt_ms: float) -> None:
        super().__init__()
        self.half_s = rtt_ms / 2000.0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        time.sleep(self.half_s)
        response = super().handle_request(request)
        time.sleep(self.half_s)
        return response


class TimedPolicy:
    """Wraps a policy to measure its own time (stop decisions, bound updates)."""

    def __init__(self, inner) -> None:
        self.inner, self.seconds = inner, 0.0

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds += time.perf_counter() - t0

    def max_draft(self) -> int:
        return self._timed(self.inner.max_draft)

    def stop_after(self, index, logits, q) -> bool:
        return self._timed(self.inner.stop_after, index, logits, q)

    def observe(self, *args) -> None:
        self._timed(self.inner.observe, *args)


class OracleStop:
    """A stop rule with hindsight, for this bench only: it knows the target's greedy answer and what the
    drafter proposes at each position of it, so it drafts exactly the tokens that will be accepted (up to
    k_max) and never one that will be rejected, except a block's first (a rule decides only after a token
    is drafted). No stop rule can do better on these prompts, so it bounds what a better predictor could
    gain over SLED's threshold."""

    def __init__(self, drafter, k_max: int) -> None:
        self.drafter, self.k_max = drafter, k_max
        self.answers: dict[tuple[int, ...], tuple[list[int], list[int]]] = {}
        self.prompt: list[int] = []

    def learn(self, prompt: list[int], answer: list[int]) -> None:
        """The drafter's own proposal at every position of the target's answer (teacher forcing)."""
        self.drafter.reset(prompt)
        proposals = []
        for token in answer:
            proposals.append(int(np.argmax(self.drafter.logits())))
            self.drafter.append(token)
        self.answers[tuple(prompt)] = (list(answer), proposals)

    def start(self, prompt: list[int]) -> None:
        self.prompt = list(prompt)

    def max_draft(self) -> int:
        return self.k_max

    def stop_after(self, index, logits, q) -> bool:
        answer, proposals = self.answers[tuple(self.prompt)]
        sequence = self.drafter.tokens
        j = len(sequence) - len(self.prompt) - 1  # the answer position of the token just drafted
        if index + 1 >= self.k_max or j + 1 >= len(answer) or sequence[-1] != answer[j]:
            return True
        return proposals[j + 1] != answer[j + 1]  # the next draft would be rejected: send now

    def observe(self, *args) -> None:
        pass


@dataclass
class PolicyResult:
    tokens_per_s: float
    wasted_ms_per_token: float
    tokens_per_round: float
    controller_us_per_token: float
    tokens: int
    outputs: list[list[int]] = field(repr=False)
    rounds: list = field(repr=False, default_factory=list)  # every RoundStats, in order

    def row(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("outputs", "rounds")}


def drafting_speed(drafter, prompt: list[int], n: int = 32) -> float:
    """Greedy tokens/s of the drafter alone on this device."""
    drafter.reset(prompt)
    drafter.logits()
    t0 = time.perf_counter()
    for _ in range(n):
        drafter.append(int(np.argmax(drafter.logits())))
    return n / (time.perf_counter() - t0)


def base_rtt_ms(http: httpx.Client, n: int = 10) -> float:
    """Median round trip of `GET /health`: the network and the HTTP stack, no model work."""
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        http.get("/health").raise_for_status()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def delayed_client(settings, extra_rtt_ms: float) -> httpx.Client:
    """An HTTP client to the verifier whose every round trip takes `extra_rtt_ms` longer."""
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    return httpx.Client(base_url=settings.server.rstrip("/"), headers=headers,
                        transport=DelayedTransport(extra_rtt_ms), timeout=settings.timeout_s)


def delayed_backend(settings, extra_rtt_ms: float) -> HttpVerifier:
    return HttpVerifier(settings.server, client=delayed_client(settings, extra_rtt_ms),
                        max_wait_s=settings.max_wait_s)


def run_policy(agent, policy_name: str, extra_rtt_ms: float, prompts: list[list[int]], tokens: int,
               *, k_max: int = 16, fixed_k: int = 4, draft_ahead: bool = True,
               oracle: OracleStop | None = None) -> PolicyResult:
    """`policy_name` "oracle" runs `oracle` (it must have learnt every prompt's answer)."""
    backend = delayed_backend(agent.settings, extra_rtt_ms)
    new = wasted_ms = 0
    wall = 0.0
    outputs, rounds = [], []
    # One controller across the prompts, as an agent keeps it: its estimates carry over.
    policy = TimedPolicy(oracle if policy_name == "oracle" else
                         make_policy(policy_name, agent.drafter, k_max=k_max, draft_length=fixed_k))
    try:
        for prompt in prompts:
            if policy_name == "oracle":
                oracle.start(prompt)
            engine = agent.engine(policy=policy, backend=backend, draft_ahead=draft_ahead)
            outputs.append([t.id for t in engine.generate(prompt, max_new_tokens=tokens)])
            s = engine.stats
            new += s.new_tokens
            wall += s.wall_s
            rounds += s.rounds
            wasted_ms += sum(r.wasted_drafting_ms for r in s.rounds)
    finally:
        backend.close()
    return PolicyResult(round(new / wall, 2), round(wasted_ms / new, 2), round(new / max(len(rounds), 1), 2),
                        round(policy.seconds / new * 1e6, 1), new, outputs, rounds)


def _pooled(runs: list[PolicyResult]) -> dict:
    """One policy's repeats as one row: the median tokens/s (and every run's), the rest pooled."""
    new = sum(r.tokens for r in runs)
    row = {"tokens_per_s": round(statistics.median(r.tokens_per_s for r in runs), 2),
           "wasted_ms_per_token": round(sum(r.wasted_ms_per_token * r.tokens for r in runs) / new, 2),
           "tokens_per_round": round(statistics.median(r.tokens_per_round for r in runs), 2),
           "controller_us_per_token": round(statistics.median(r.controller_us_per_token for r in runs), 1),
           "tokens": new}
    if len(runs) > 1:
        row["tokens_per_s_runs"] = [r.tokens_per_s for r in runs]
    return row


def warm_up(agent, prompts: list[list[int]], tokens: int) -> None:
    """One untimed answer per prompt, so that no measured run pays a first-time cost (the verifier's
    prefill before its prefix cache holds the prompt, first-call allocations) that later runs skip."""
    backend = delayed_backend(agent.settings, 0.0)
    try:
        for prompt in prompts:
            agent.engine(policy=make_policy("fixed", agent.drafter, draft_length=4), backend=backend,
                         draft_ahead=True).generate(prompt, max_new_tokens=min(tokens, 8))
    finally:
        backend.close()


def bench(agent, *, extra_rtts_ms: list[float], policies: list[str], prompts: int = 3, tokens: int = 40,
          fixed_k: int = 4, k_max: int = 16, draft_ahead: str = "on", repeats: int = 1,
          out: Callable[[str], None] = print) -> dict:
    """Every policy at every extra round trip on the same prompts; prints a table, returns the report.

    `draft_ahead`: "on" (the agent's default), "off", or "both": each policy runs without and then with
    drafting during verification, listed as `name` and `name+ahead`, with the tok/s ratio of the two.
    `repeats`: each policy runs this many times per round trip, the policies in a rotated order each
    time (so none always runs first or last), and the row gives the median tokens/s.
    Policy "oracle" is the stop rule with hindsight (`OracleStop`): the target's answers come from an
    untimed run of the first other policy.
    """
    variants = {"on": [True], "off": [False], "both": [False, True]}[draft_ahead]
    info = agent.connect()
    prompt_ids = [agent.chat_ids([{"role": "user", "content": q}]) for q in QUESTIONS[:prompts]]
    with httpx.Client(base_url=agent.settings.server.rstrip("/"), timeout=agent.settings.timeout_s) as http:
        rtt = base_rtt_ms(http)
    speed = drafting_speed(agent.drafter, prompt_ids[0])
    warm_up(agent, prompt_ids, tokens)
    oracle = None
    if "oracle" in policies:
        others = [p for p in policies if p != "oracle"] or ["fixed"]
        answers = run_policy(agent, others[0], 0.0, prompt_ids, tokens, k_max=k_max, fixed_k=fixed_k).outputs
        oracle = OracleStop(agent.drafter, k_max)
        for prompt, answer in zip(prompt_ids, answers):
            oracle.learn(prompt, answer)
    report: dict = {"server": agent.settings.server, "model": info["model"], "drafter": agent.drafter.name,
                    "drafting_tokens_per_s": round(speed, 1), "base_rtt_ms": round(rtt, 2), "prompts": prompts,
                    "tokens": tokens, "repeats": repeats, "results": {}, "lossless": True}
    out(f"drafter {agent.drafter.name}: {speed:.0f} tok/s alone; base round trip {rtt:.1f} ms; "
        f"{prompts} prompts x {tokens} tokens, greedy, {repeats} run(s) per policy in rotated order")
    out(f"{'+rtt ms':>7} {'policy':>7} {'tok/s':>7} {'wasted ms/tok':>14} {'tok/round':>10} {'controller us/tok':>18}")
    labels = [(name, ahead, f"{name}+ahead" if ahead and len(variants) > 1 else name)
              for name in policies for ahead in variants]
    for extra in extra_rtts_ms:
        runs: dict[str, list[PolicyResult]] = {label: [] for _, _, label in labels}
        reference = None
        for repeat in range(repeats):
            shift = repeat % len(labels)
            for name, ahead, label in labels[shift:] + labels[:shift]:
                r = run_policy(agent, name, extra, prompt_ids, tokens, k_max=k_max, fixed_k=fixed_k, draft_ahead=ahead,
                               oracle=oracle)
                reference = reference or r.outputs
                if r.outputs != reference:
                    report["lossless"] = False
                    out(f"{extra:>7.0f} {label:>7} OUTPUT DIFFERS (lossless broken)")
                runs[label].append(r)
        for name, ahead, label in labels:
            row = {**_pooled(runs[label]), "same_output": all(r.outputs == reference for r in runs[label])}
            if ahead and len(variants) > 1:
                row["speedup_from_drafting_ahead"] = round(
                    row["tokens_per_s"] / report["results"][str(int(extra))][name]["tokens_per_s"], 3)
            report["results"].setdefault(str(int(extra)), {})[label] = row
            spread = (f"  runs {min(row['tokens_per_s_runs']):.2f}-{max(row['tokens_per_s_runs']):.2f}"
                      if "tokens_per_s_runs" in row else "")
            out(f"{extra:>7.0f} {label:>7} {row['tokens_per_s']:>7.2f} {row['wasted_ms_per_token']:>14.2f} "
                f"{row['tokens_per_round']:>10.2f} {row['controller_us_per_token']:>18.1f}" + spread
                + (f"  x{row['speedup_from_drafting_ahead']:.2f} vs {name}" if "speedup_from_drafting_ahead" in row
                   else ""))
    return report
