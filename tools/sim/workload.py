"""What the devices ask for: prompt and answer lengths, SLO classes, and when they ask (arrivals).

Arrivals are a closed population: each active device sends a request, waits for the whole answer, thinks
for an exponential time, and sends the next. "Steady" keeps N devices active; "bursty" adds extra devices
for a window (`Burst`), so concurrency jumps from a base to m x base and back. Lengths are log-normal and
clipped (assumed: chat-like prompts of ~200 tokens and answers of ~160; the paper's were not recovered).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

SLO_CLASSES = (2.0, 4.0, 6.0, 8.0)  # tokens/s, the paper's


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
    prompt: Lengths = Lengths(200, 0.6, 16, 1024)
    output: Lengths = Lengths(160, 0.5, 32, 512)
    think_s: float = 1.0  # mean pause between a device's requests
    stagger_s: float = 10.0  # first requests spread uniformly over this window
    slo_mix: tuple[tuple[float, float], ...] = ((2.0, 0.25), (4.0, 0.25), (6.0, 0.25), (8.0, 0.25))
    bursts: tuple[Burst, ...] = field(default_factory=tuple)

    def with_slo(self, rate: float) -> "Workload":
        return Workload(self.prompt, self.output, self.think_s, self.stagger_s, ((rate, 1.0),), self.bursts)

    def slo_of(self, rng: np.random.Generator) -> float:
        u, acc = rng.random(), 0.0
        for rate, share in self.slo_mix:
            acc += share
            if u < acc:
                return rate
        return self.slo_mix[-1][0]


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
