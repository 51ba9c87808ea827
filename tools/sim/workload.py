"""What the devices ask for: prompt and answer lengths, SLO classes, and when they ask (arrivals).

Arrivals are a closed population: each active device sends a request, waits for the whole answer, thinks
for an exponential time, and sends the next. "Steady" keeps N devices active; "bursty" adds extra devices
for a window (`Burst`), so concurrency jumps from a base to m x base and back. Lengths are log-normal and
clipped (assumed: chat-like prompts of ~200 tokens and answers of ~160; the paper's were not recovered).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

SLO_CLASSES = (2.0, 4.0, 6.0, 8.0)  # tokens/s, the paper's
PUBLIC_PROMPT_TOKENS = Path(__file__).resolve().parent / "profiles" / "public_prompt_tokens.json"


@dataclass(frozen=True)
class Lengths:
    median: float
    sigma: float
    lo: int
    hi: int

    def sample(self, rng: np.random.Generator) -> int:
        return int(min(self.hi, max(self.lo, round(self.median * math.exp(rng.normal(0.0, self.sigma))))))


@dataclass(frozen=True)
class Burst:
    start_s: float
    end_s: float
    multiplier: float  # concurrency during the burst, relative to the base


@dataclass(frozen=True)
class Workload:
    prompt: Lengths | CategoryLengths = Lengths(200, 0.6, 16, 1024)
    output: Lengths = Lengths(160, 0.5, 32, 512)
    think_s: float = 1.0  # mean pause between a device's requests
    stagger_s: float = 10.0  # first requests spread uniformly over this window
    slo_mix: tuple[tuple[float, float], ...] = ((2.0, 0.25), (4.0, 0.25), (6.0, 0.25), (8.0, 0.25))
    bursts: tuple[Burst, ...] = field(default_factory=tuple)
    name: str = "synthetic chat lengths"  # where the lengths come from, named in every results file
    replayed_prompts: tuple[tuple[int, ...], ...] = ()  # a real run's prompt lengths, per device in request order
    # (device i mod len, request k mod its count); empty: drawn from `prompt`
    prompt_by_slo: tuple[tuple[float, Lengths], ...] = ()  # classes whose prompts come from their own lengths
    # (heterogeneous requests: e.g. long documents at a loose rate beside short chats at a tight one)

    def prompt_tokens(self, device: int, k: int, rng: np.random.Generator, slo: float | None = None) -> int:
        drawn = self.prompt.sample(rng)  # drawn even when replayed: the rng stream stays the same
        own = next((lengths for rate, lengths in self.prompt_by_slo if rate == slo), None)
        if own is not None:
            return own.sample(rng)
        if not self.replayed_prompts:
            return drawn
        mine = self.replayed_prompts[device % len(self.replayed_prompts)]
        return mine[k % len(mine)]

    def with_slo(self, rate: float | None) -> "Workload":
        """One SLO class for every request; None keeps the workload's own mix."""
        return self if rate is None else replace(self, slo_mix=((rate, 1.0),))

    def slo_of(self, rng: np.random.Generator) -> float:
        u, acc = rng.random(), 0.0
        for rate, share in self.slo_mix:
            acc += share
            if u < acc:
                return rate
        return self.slo_mix[-1][0]


@dataclass(frozen=True)
class CategoryLengths:
    """Prompt lengths of a public set: a category drawn uniformly, then one of its prompts (so HumanEval's 164
    problems weigh as much as one MT-Bench category of 10)."""

    by_category: tuple[tuple[int, ...], ...]
    lo: int = 16

    def sample(self, rng: np.random.Generator) -> int:
        values = self.by_category[rng.integers(len(self.by_category))]
        return max(self.lo, int(values[rng.integers(len(values))]))


def public_prompt_lengths(path: Path = PUBLIC_PROMPT_TOKENS) -> CategoryLengths | None:
    """The public sets' prompt lengths in target tokens (tools/workload_report.py writes them); None if absent."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    groups: dict[str, list[int]] = {}
    for tokens, category in zip(data["tokens"], data["category"]):
        groups.setdefault(category, []).append(int(tokens))
    return CategoryLengths(tuple(tuple(v) for _, v in sorted(groups.items())))


def public_workload() -> Workload:
    """The default workload: MT-Bench + HumanEval prompt lengths; answers stay log-normal (no reference
    answers ship with MT-Bench, and the target's own answers run to the token budget)."""
    lengths = public_prompt_lengths()
    if lengths is None:
        return Workload()
    return Workload(prompt=lengths, name="MT-Bench + HumanEval prompts (categories equally weighted), "
                                         "answers log-normal (median 160)")


QUICK = Workload(prompt=Lengths(128, 0.5, 16, 512), output=Lengths(48, 0.3, 24, 96), stagger_s=4.0)


@dataclass(frozen=True)
class Request:
    device: int
    index: int  # the device's n-th request
    arrival: float
    prompt_tokens: int
    output_tokens: int
    slo: float
    measured: bool  # counted in the results (inside the measurement window)


def device_window(index: int, n_base: int, bursts: tuple[Burst, ...], horizon_s: float) -> tuple[float, float]:
    """When device `index` issues requests: base devices all along, burst devices inside their bursts."""
    if index < n_base:
        return 0.0, horizon_s
    extra = index - n_base
    for b in bursts:
        n_extra = int(round(n_base * (b.multiplier - 1.0)))
        if extra < n_extra:
            return b.start_s, b.end_s
        extra -= n_extra
    raise IndexError(index)


def burst_devices(n_base: int, bursts: tuple[Burst, ...]) -> int:
    return n_base + sum(int(round(n_base * (b.multiplier - 1.0))) for b in bursts)
