"""What the rejection predictor reads: statistics of the drafter's next-token distribution.

Every statistic comes from the raw logits at temperature 1, whatever the sampling temperature, so
one predictor serves greedy and sampled drafting. They are computed for every drafted token, so the
cost matters: one exp over the vocabulary and a few cheap passes (argmaxes, shifts, BLAS dots) into
per-thread buffers reused from token to token, no allocation. The exp is the expensive pass (numpy's
float32 exp: ~80 us for 49,152 logits on an AVX2 core), so when llama.cpp is installed its SIMD
exp-and-sum (`ggml_vec_soft_max_f32`, ~30 us, the sum kept in float64) does it. All the values are
exact to float32 rounding either way: nothing is truncated, since a drafter's distribution can
spread over most of the vocabulary (the student's median entropy is 5 nats, with 95% of its 49,152
logits within 20 of the maximum), so statistics over the logits near the maximum alone would be off.
The top-2 is read from the exponentials (zero the top, take the argmax), cheaper than `np.partition`.
Costs per drafted token: `tools/bench_controller.py` (docs/results/controller/bench.json).
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import sys
import threading
from functools import cache
from pathlib import Path

import numpy as np

# Per token: the distribution's shape (0-4), where the token sits in its block (5), and the
# running confidence of the block so far (6: log of the product of top-1 probabilities).
FEATURE_NAMES = ("top1_prob", "entropy", "margin", "logit_gap", "logit_std", "position", "block_log_top1")
N_FEATURES = len(FEATURE_NAMES)
MAX_LOGIT_GAP = 50.0  # masked (-inf) logits would make the gap infinite
_GGML_CPU = {"linux": "libggml-cpu.so", "darwin": "libggml-cpu.dylib", "win32": "ggml-cpu.dll"}


@cache
def ggml_softmax():
    """llama.cpp's `ggml_vec_soft_max_f32(n, y, x, max)` (y = exp(x - max), returns the sum as a
    double), or None without llama-cpp-python. An internal but exported ggml symbol: the library is
    loaded by path (no `import llama_cpp`) and used only once it agrees with numpy on a test row."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "lib" / _GGML_CPU.get(sys.platform, "libggml-cpu.so")
    try:
        fn = ctypes.CDLL(str(path)).ggml_vec_soft_max_f32
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_double, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float]
    x = np.linspace(-30.0, 0.0, 37, dtype=np.float32)
    y = np.empty_like(x)
    total = fn(x.shape[0], y.ctypes.data, x.ctypes.data, 0.0)
    want = np.exp(x.astype(np.float64))
    ok = np.allclose(y, want, rtol=1e-6, atol=0.0) and math.isclose(total, want.sum(), rel_tol=1e-6)
    return fn if ok else None


class DistributionStats:
    """`distribution_stats` for one vocabulary size, with its buffers; one instance per thread."""

    def __init__(self, n: int, *, use_ggml: bool = True) -> None:
        self.n = n
        self.z = np.empty(n, np.float32)  # logits - max, <= 0
        self.e = np.empty(n, np.float32)  # exp(z)
        self.ones = np.ones(n, np.float32)
        self._ggml = ggml_softmax() if use_ggml else None
        self._z_ptr, self._e_ptr = self.z.ctypes.data, self.e.ctypes.data

    def shift(self, logits: np.ndarray) -> int:
        """z = logits - max(logits) -> the argmax."""
        assert logits.shape == (self.n,), f"expected one row of {self.n} logits, got {logits.shape}"
        top = int(np.argmax(logits))
        np.subtract(logits, logits[top], out=self.z, casting="same_kind")
        return top

    def exp_sum(self) -> float:
        """e = exp(z) -> sum(e), accumulated in float64 by ggml, pairwise by numpy."""
        if self._ggml is not None:
            return self._ggml(self.n, self._e_ptr, self._z_ptr, 0.0)
        np.exp(self.z, out=self.e)
        return float(self.e.sum())

    def __call__(self, logits: np.ndarray) -> tuple[float, float, float, float, float]:
        top = self.shift(logits)
        total = self.exp_sum()  # >= 1
        # H = log Z - sum(e * z) / Z  (softmax entropy without materialising p or log p)
        entropy = math.log(total) - float(np.dot(self.e, self.z)) / total
        self.e[top] = 0.0
        second = float(self.e[np.argmax(self.e)])  # exp(l2 - l1); in the engine argmax is 3x cheaper than max
        top1 = 1.0 / total
        gap = min(-math.log(second), MAX_LOGIT_GAP) if second > 0.0 else MAX_LOGIT_GAP
        return top1, max(entropy, 0.0), top1 - second / total, gap, self.std(logits)

    def std(self, logits: np.ndarray) -> float:
        """About the mean, in `e` (free by now): E[x^2] - mean^2 in float32 would cancel badly when the
        logits sit far from 0 (or from their max) relative to their spread."""
        mean = float(np.dot(logits, self.ones)) / self.n
        np.subtract(logits, mean, out=self.e, casting="same_kind")
        return math.sqrt(float(np.dot(self.e, self.e)) / self.n)


class _PerThread(threading.local):
    def __init__(self) -> None:
        self.by_size: dict[int, DistributionStats] = {}


_scratch = _PerThread()


def _stats_for(logits: np.ndarray) -> DistributionStats:
    assert logits.ndim == 1 and logits.shape[0] >= 2, f"expected one row of >= 2 logits, got {logits.shape}"
    n = logits.shape[0]
    stats = _scratch.by_size.get(n)
    if stats is None:
        stats = _scratch.by_size[n] = DistributionStats(n)
    return stats


def distribution_stats(logits: np.ndarray) -> tuple[float, float, float, float, float]:
    """logits: [vocab], finite -> (top-1 prob, entropy in nats, top-1 minus top-2 prob, top-1 minus top-2
    logit, std of the logits), all at temperature 1. The caller's row is not modified."""
    return _stats_for(logits)(logits)


class BlockFeatures:
    """Feature rows for the tokens of a draft block, in order; index 0 starts a new block.

    Holds the running product of top-1 probabilities, so feed it every token of a block.
    """

    def __init__(self) -> None:
        self._log_top1 = 0.0

    def __call__(self, index: int, logits: np.ndarray) -> np.ndarray:
        """index: the token's position in its block (from 0); logits: [vocab] -> [N_FEATURES] float32."""
        return self.from_stats(index, distribution_stats(logits))

    def from_stats(self, index: int, stats: tuple[float, float, float, float, float]) -> np.ndarray:
        """The same row from `distribution_stats` already computed (the simulator replays logged stats)."""
        top1, entropy, margin, gap, std = stats
        if index == 0:
            self._log_top1 = 0.0
        self._log_top1 += math.log(max(top1, 1e-12))
        return np.array([top1, entropy, margin, gap, std, index, self._log_top1], dtype=np.float32)


def top1_prob(logits: np.ndarray) -> float:
    """logits: [vocab] -> the largest softmax probability at temperature 1 (SLED's confidence)."""
    stats = _stats_for(logits)
    stats.shift(logits)
    return 1.0 / stats.exp_sum()
