"""What the rejection predictor reads: statistics of the drafter's next-token distribution (numpy only).

Every statistic comes from the raw logits at temperature 1, whatever the sampling temperature, so
one predictor serves greedy and sampled drafting. The cost is one exp over the vocabulary plus a
few reductions (~0.15 ms for 49,152 logits on one core); the top-2 is read from the exponentials
(zero the argmax, take the max) because that is cheaper than `np.partition` on float32 rows.
"""

from __future__ import annotations

import math

import numpy as np

# Per token: the distribution's shape (0-4), where the token sits in its block (5), and the
# running confidence of the block so far (6: log of the product of top-1 probabilities).
FEATURE_NAMES = ("top1_prob", "entropy", "margin", "logit_gap", "logit_std", "position", "block_log_top1")
N_FEATURES = len(FEATURE_NAMES)
MAX_LOGIT_GAP = 50.0  # masked (-inf) logits would make the gap infinite


def distribution_stats(logits: np.ndarray) -> tuple[float, float, float, float, float]:
    """logits: [vocab], finite -> (top-1 prob, entropy in nats, top-1 minus top-2 prob, top-1 minus top-2
    logit, std of the logits), all at temperature 1."""
    assert logits.ndim == 1 and logits.shape[0] >= 2, f"expected one row of >= 2 logits, got {logits.shape}"
    top = int(np.argmax(logits))
    z = logits - logits[top]  # [vocab], <= 0
    e = np.exp(z)
    total = float(e.sum())  # >= 1
    # H = log Z - sum(e * z) / Z  (softmax entropy without materialising p or log p)
    entropy = math.log(total) - float(np.dot(e, z)) / total
    e[top] = 0.0
    second = float(e.max())  # exp(l2 - l1)
    top1 = 1.0 / total
    gap = min(-math.log(second), MAX_LOGIT_GAP) if second > 0.0 else MAX_LOGIT_GAP
    n = z.shape[0]
    mean = float(z.sum()) / n
    std = math.sqrt(max(float(np.dot(z, z)) / n - mean * mean, 0.0))  # the std is shift-invariant
    return top1, max(entropy, 0.0), top1 - second / total, gap, std


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
    return 1.0 / float(np.exp(logits - logits.max()).sum())
