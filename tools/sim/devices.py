"""Edge devices: how fast each one drafts, prefills its drafter, and runs the stop rule.

Drafting a token with llama.cpp on a small board is memory-bound: time per token ~ bytes read per token /
achieved memory bandwidth. The achieved bandwidth of each board comes from published llama.cpp
measurements; the bytes per token from the drafter's size. Sources (text-generation speed, tg):
- Raspberry Pi 4B / 5: TinyLlama-1.1B q8_0 (1.17 GB) at 3 / 9 tok/s and prompt processing at 10 / 35-45
  tok/s (J. Tunney, "LLaMA Now Goes Faster on CPUs", 2024, llama.cpp 2024-03-26 and llamafile 0.7 rows),
  i.e. ~3.5 / ~10.5 GB/s achieved; Pi 5 llama3.2:3b Q4_K_M (2.0 GB) at 4.9 tok/s (J. Geerling,
  ai-benchmarks issue #7, Jan 2025) agrees (~9.8 GB/s).
- Jetson Orin Nano 8 GB (68 GB/s LPDDR5, llama.cpp CUDA): SmolLM2-135M at 165 tok/s on the Orin Nano
  Super at 25 W (smolhub.com "Tiny LLM Benchmark: Jetson Orin Nano Super 8GB", 2025), i.e. a ~6 ms
  per-token floor of launch overhead; our figure adds the bandwidth time of the bigger drafter.
- A Qwen3-0.6B Q4_K_M-class drafter reads ~0.35 GB per token (0.44B non-embedding parameters at ~4.5
  bits plus the tied 151,936 x 1,024 output head): ~35 ms on a Pi 5, ~100 ms on a Pi 4B, ~15 ms on an
  Orin Nano: ESTIMATES by the arithmetic above, not measurements of ours.
- The shipped drafters on one core of our 2-core VM: measured (README "Benchmarks": Q4_1 54 tok/s,
  student q8_0 117 tok/s).
- Stop-rule cost per drafted token: the paper's MLP predictor 0.46 ms on a Pi 5 and 2.04 ms on a Pi 4B;
  ours 0.112 ms on the VM (models/predictor/manifest.json, features + MLP). Only the predictor is
  charged: the confidence rule reads a softmax the sampler computes anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    draft_ms: float  # mean time to draft one token
    prefill_tok_s: float  # the drafter's prompt processing speed (the engine prefills it after the first token)
    predictor_ms: float  # the rejection predictor's own time per drafted token
    jitter: float = 0.05  # log-normal sigma of a token's drafting time
    source: str = ""
    round_cpu_ms: float = 0.0  # the device's own work per round besides drafting (the HTTP client: building
    # the request, reading the reply); measured for the validation's device, 0 (folded into the RTT) elsewhere


DEVICES = {
    "pi4b": DeviceProfile("pi4b", 100.0, 20.0, 2.04, source="Raspberry Pi 4B, Qwen3-0.6B Q4_K_M-class drafter "
                                                          "(estimate from ~3.5 GB/s achieved)"),
    "pi5": DeviceProfile("pi5", 35.0, 80.0, 0.46, source="Raspberry Pi 5, Qwen3-0.6B Q4_K_M-class drafter "
                                                        "(estimate from ~10 GB/s achieved)"),
    "orin-nano": DeviceProfile("orin-nano", 15.0, 1000.0, 0.46, source="Jetson Orin Nano 8GB, llama.cpp CUDA, "
                                                                      "Qwen3-0.6B Q4_K_M-class drafter (estimate)"),
    "vm-q4": DeviceProfile("vm-q4", 1000 / 54, 400.0, 0.112, source="our VM, 1 core: shipped Q4_1 drafter "
                                                                   "(measured 54 tok/s)"),
    "vm-student": DeviceProfile("vm-student", 1000 / 117, 800.0, 0.112, source="our VM, 1 core: shipped student "
                                                                              "q8_0 (measured 117 tok/s)"),
}

# Fleets: which share of the devices is of each kind.
FLEETS = {
    "paper": {"pi5": 0.5, "orin-nano": 0.5},  # boards that can draft a 0.6B model fast enough for 8 tok/s
    "pi-mix": {"pi4b": 0.2, "pi5": 0.5, "orin-nano": 0.3},
    "pi5": {"pi5": 1.0},
    "orin-nano": {"orin-nano": 1.0},
    "pi4b": {"pi4b": 1.0},
    "vm-q4": {"vm-q4": 1.0},
    "vm-student": {"vm-student": 1.0},
}


def fleet_device(fleet: str, index: int, seed: int) -> DeviceProfile:
    """Device `index` of a fleet: drawn from (seed, index) alone, so adding devices never changes the others."""
    shares = FLEETS[fleet]
    u = np.random.default_rng([seed, index, 11]).random()
    acc = 0.0
    for name, share in shares.items():
        acc += share
        if u < acc:
            return DEVICES[name]
    return DEVICES[next(reversed(shares))]
