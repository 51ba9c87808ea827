"""The network between a device and the verifier: a base RTT per device, jitter per message, bandwidth.

A one-way trip takes half the device's base RTT times a per-message log-normal jitter, plus the message's
serialization time on the link. Profiles are assumptions (stated), not measurements: typical home Wi-Fi
plus a metro path to a cloud region is 20-40 ms; LTE 40-80 ms with more spread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

# Message sizes on the wire (HTTP/1.1 keep-alive, JSON bodies), bytes: assumptions from our protocol.
HEADERS = 250
VERIFY_UP_BASE, PER_DRAFT_TOKEN = 200, 8  # greedy: ids only, no q
VERIFY_DOWN = 300
SESSION_UP_BASE, PER_PROMPT_TOKEN = 250, 7
SESSION_DOWN = 300
STREAM_CHUNK = 180  # one SSE token chunk (centralized)


@dataclass(frozen=True)
class NetworkProfile:
    name: str
    rtt_median_ms: float  # across devices
    rtt_spread: float  # log-normal sigma of a device's base RTT around the median
    jitter: float  # log-normal sigma of each one-way trip around the base
    up_mbps: float
    down_mbps: float

    def with_rtt(self, rtt_ms: float) -> "NetworkProfile":
        return replace(self, name=f"{self.name}@{rtt_ms:g}ms", rtt_median_ms=rtt_ms)


NETWORKS = {
    "wifi-metro": NetworkProfile("wifi-metro", 30.0, 0.35, 0.15, 20.0, 50.0),
    "lan": NetworkProfile("lan", 2.0, 0.3, 0.2, 100.0, 100.0),
    "lte": NetworkProfile("lte", 60.0, 0.45, 0.25, 10.0, 30.0),
    # tools/load_test.py's link: loopback HTTP with a fixed emulated delay, the same for every device and message
    # (set the RTT to the emulated delay plus the measured HTTP round trip)
    "loopback": NetworkProfile("loopback", 1.0, 0.0, 0.0, 10_000.0, 10_000.0),
}


@dataclass
class Link:
    """One device's path to the server."""

    base_rtt_ms: float
    profile: NetworkProfile

    @classmethod
    def sample(cls, profile: NetworkProfile, rng: np.random.Generator) -> "Link":
        return cls(profile.rtt_median_ms * math.exp(rng.normal(0.0, profile.rtt_spread)), profile)

    def one_way_s(self, nbytes: int, up: bool, rng: np.random.Generator) -> float:
        jitter = math.exp(rng.normal(0.0, self.profile.jitter)) if self.profile.jitter > 0 else 1.0
        mbps = self.profile.up_mbps if up else self.profile.down_mbps
        return self.base_rtt_ms / 2000.0 * jitter + (nbytes + HEADERS) * 8 / (mbps * 1e6)
