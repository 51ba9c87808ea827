"""When to stop drafting: the learned rejection predictor and the training-free fallbacks.

`RejectionPredictor` is a 3-layer MLP run in numpy (the edge install has no torch). It reads the
features of each drafted token (`features.FEATURE_NAMES`) and gives P(this token is the block's
first rejection); `PredictorPolicy` stops the block once that reaches tau. Weights are trained for
one drafter file (`tools/train_predictor.py`) and stored with its sha256 in
`models/predictor/<name>.npz`; `load_predictor_for` refuses weights made for another drafter.
Until weights exist, `ConfidencePolicy` (SLED: stop below a top-1 probability) or `EntropyPolicy`
(AdaEDL's entropy bound) decide. All policies are pure: logits in, a decision out.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import threading
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path

import numpy as np

from wisp_edge.controller.features import (FEATURE_NAMES, N_FEATURES, DistributionStats, compiled_kernels,
                                          data_address, distribution_stats, top1_prob)
from wisp_edge.drafters import MODELS_DIR
from wisp_edge.wire.protocol import VerifyReply

PREDICTOR_DIR = MODELS_DIR / "predictor"
_F32 = np.dtype(np.float32)
_ONE_FLOAT32 = (4,)  # the strides of a contiguous float32 row


@dataclass
class RejectionPredictor:
    """P(first rejection) from one feature row: sigmoid(MLP((x - mean) / scale))."""

    layers: list[tuple[np.ndarray, np.ndarray]]  # 3 x (W [in, out], b [out]), ReLU between
    mean: np.ndarray  # [n_features]
    scale: np.ndarray  # [n_features]
    tau: float  # stop when p_reject >= tau
    drafter: str  # the short name it was trained for
    drafter_sha256: str  # the drafter file it was trained for
    feature_names: tuple[str, ...] = FEATURE_NAMES
    meta: dict = field(default_factory=dict)  # provenance: draft length collected at, tau rule, date

    def __post_init__(self) -> None:
        assert len(self.layers) == 3, "a 3-layer MLP"
        assert self.layers[0][0].shape[0] == len(self.feature_names) == self.mean.shape[0] == self.scale.shape[0]
        assert self.layers[-1][0].shape[1] == 1
        self._inv_scale = (1.0 / self.scale).astype(np.float32)
        # The per-token path: the standardisation folded into the first layer (in float64),
        # W0' = W0 / scale, b0' = b0 - (mean / scale) W0, and every bias as one more weight row read
        # against a constant 1 at the end of each input, so a layer is one dot into a reused buffer and
        # one in-place ReLU (which leaves the 1 alone).
        (w0, b0), (w1, b1), (w2, b2) = self.layers
        inv = 1.0 / self.scale.astype(np.float64)
        b0_folded = b0 - (self.mean * inv) @ w0.astype(np.float64)
        self._w0 = np.vstack([w0 * inv[:, None], b0_folded[None]]).astype(np.float32)  # [f + 1, h1]
        self._w1 = np.vstack([w1, b1[None]]).astype(np.float32)  # [h1 + 1, h2]
        self._w2 = np.concatenate([w2[:, 0], b2]).astype(np.float32)  # [h2 + 1]
        self._local = threading.local()

    def scorer(self) -> "Scorer":
        """The per-token MLP with its own buffers (one per thread)."""
        return Scorer(self)

    def logit(self, features: np.ndarray) -> np.ndarray:
        """features: [n, n_features] -> [n] pre-sigmoid scores."""
        h = (features - self.mean) * self._inv_scale  # [n, f]
        for i, (w, b) in enumerate(self.layers):
            h = h @ w + b
            if i < len(self.layers) - 1:
                np.maximum(h, 0.0, out=h)
        return h[:, 0]

    def p_reject_batch(self, features: np.ndarray) -> np.ndarray:
        """features: [n, n_features] -> [n] probabilities of being the first rejection."""
        return 0.5 * (1.0 + np.tanh(0.5 * self.logit(features.astype(np.float32, copy=False))))  # sigmoid, no overflow

    def p_reject(self, features: np.ndarray) -> float:
        """features: [n_features] -> P(this drafted token is the block's first rejection)."""
        scorer = getattr(self._local, "scorer", None)
        if scorer is None:
            scorer = self._local.scorer = self.scorer()
        scorer.x[:-1] = features
        return scorer.p_reject()

    def save(self, path: str | Path) -> None:
        arrays = {f"w{i}": w for i, (w, _) in enumerate(self.layers)}
        arrays |= {f"b{i}": b for i, (_, b) in enumerate(self.layers)}
        meta = {"tau": self.tau, "drafter": self.drafter, "drafter_sha256": self.drafter_sha256,
                "feature_names": list(self.feature_names), **self.meta}
        np.savez(path, mean=self.mean, scale=self.scale, meta=np.array(json.dumps(meta)), **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "RejectionPredictor":
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            layers = [(z[f"w{i}"].astype(np.float32), z[f"b{i}"].astype(np.float32)) for i in range(3)]
            mean, scale = z["mean"].astype(np.float32), z["scale"].astype(np.float32)
        names = tuple(meta.pop("feature_names"))
        if names != FEATURE_NAMES:
            raise ValueError(f"{path} was trained on features {names}, this build computes {FEATURE_NAMES}; "
                             "retrain with tools/train_predictor.py")
        return cls(layers, mean, scale, float(meta.pop("tau")), meta.pop("drafter"), meta.pop("drafter_sha256"),
                   names, meta)


class Scorer:
    """One row through `RejectionPredictor`'s MLP: one call of the compiled kernel when the install built it,
    else five numpy calls into buffers it owns; no allocation either way."""

    _pack = struct.Struct(f"{N_FEATURES}f").pack_into

    def __init__(self, predictor: RejectionPredictor, *, use_compiled: bool = True) -> None:
        self.w0, self.w1 = predictor._w0, predictor._w1
        self.w2 = predictor._w2[:, None].copy()  # [h2 + 1, 1]: the last layer a matrix product too
        self.x = np.ones(self.w0.shape[0], np.float32)  # [f + 1]: write the features into x[:-1]
        self.h1 = np.ones(self.w1.shape[0], np.float32)  # [h1 + 1]
        self.h2 = np.ones(self.w2.shape[0], np.float32)  # [h2 + 1]
        self.out = np.empty(1, np.float32)
        self._h1, self._h2 = self.h1[:-1], self.h2[:-1]
        self._x_bytes = memoryview(self.x).cast("B")
        kernels = compiled_kernels() if use_compiled else None
        if kernels is not None:  # the arrays above live as long as this scorer, so their addresses stay valid
            arrays = (self.w0, self.w1, self.w2, self.x)
            assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays)
            self._mlp3, self._mlp3_args = kernels.mlp3, (*(a.ctypes.data for a in arrays), self.w0.shape[0] - 1,
                                                         self.w0.shape[1], self.w1.shape[1])
            # The whole rule in one call: statistics, feature row (written into x) and score.
            self.stop_score = partial(kernels.stop_score, *self._mlp3_args) if self.w0.shape[0] == 8 else None
        else:
            self._mlp3 = self.stop_score = None

    def set_row(self, *features: float) -> None:
        """Write one feature row (N_FEATURES numbers) into `x[:-1]`, as float32, without a numpy call."""
        self._pack(self._x_bytes, 0, *features)

    def score(self) -> float:
        """The pre-sigmoid score for the features in `x[:-1]`."""
        if self._mlp3 is not None:
            return self._mlp3(*self._mlp3_args)
        np.dot(self.x, self.w0, out=self._h1)
        np.maximum(self.h1, 0.0, out=self.h1)
        np.dot(self.h1, self.w1, out=self._h2)
        np.maximum(self.h2, 0.0, out=self.h2)
        np.dot(self.h2, self.w2, out=self.out)
        return float(self.out[0])

    def p_reject(self) -> float:
        """P(first rejection) for the features in `x[:-1]`."""
        return 0.5 * (1.0 + math.tanh(0.5 * self.score()))  # sigmoid, no overflow


def score_threshold(tau: float) -> float | None:
    """The pre-sigmoid score s with sigmoid(s) >= tau exactly when s >= it; None for tau >= 1, where the
    float sigmoid saturating at 1 decides (compare `p_reject` then)."""
    if tau <= 0.0:
        return -math.inf
    return math.log(tau / (1.0 - tau)) if tau < 1.0 else None


@lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, cached per (path, size, mtime): drafters are ~100 MB."""
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def load_predictor_for(drafter, directory: str | Path = PREDICTOR_DIR) -> RejectionPredictor | None:
    """The weights in `directory` trained for this drafter's file (by sha256), or None.

    None also when the drafter has no file (`model_path`): callers then use a fallback policy.
    """
    model_path = getattr(drafter, "model_path", None)
    directory = Path(directory)
    if model_path is None or not Path(model_path).exists() or not directory.is_dir():
        return None
    sha = file_sha256(model_path)
    for path in sorted(directory.glob("*.npz")):
        try:
            predictor = RejectionPredictor.load(path)
        except (ValueError, KeyError, OSError):
            continue  # weights for another feature set or a damaged file: not ours
        if predictor.drafter_sha256 == sha:
            return predictor
    return None


class _NoFeedback:
    def observe(self, drafted: int, accepted: int, result: VerifyReply, rtt_ms: float,
                drafting_ms: list[float]) -> None:
        pass


class _DraftsOnWhenWorthwhile(_NoFeedback):
    """The override every stop rule shares: a doubtful token is drafted anyway when the chance that it gets
    committed is at least `min_worthwhile` (set by the controller from the round trip; 1 means never).

    That chance is the token's own acceptance estimate times the block's so far: a token is committed
    only if every token before it in the block is. Judging the token alone (as before) drafted deep into
    blocks whose earlier tokens were already doubtful; with the student (about half its tokens accepted)
    it drafted 0.8 to 1.9 ms of waste per token at +20 to +100 ms without committing more per round.
    """

    min_worthwhile: float = 1.0
    _prefix_accept: float = 1.0  # the block's tokens so far all accepted, as the rule estimates it

    def _stops(self, index: int, doubtful: bool, accept: float) -> bool:
        """doubtful: the rule's own verdict on this token; accept: its estimated chance of acceptance."""
        if index == 0:
            self._prefix_accept = 1.0
        chance = self._prefix_accept * min(max(accept, 0.0), 1.0)
        self._prefix_accept = chance
        return doubtful and chance <= self.min_worthwhile


@dataclass
class PredictorPolicy(_DraftsOnWhenWorthwhile):
    """Stop after the token whose predicted P(first rejection) reaches tau, or at k_max.

    `min_worthwhile` (set by the controller from the measured round trip): a token past tau is drafted
    anyway while the block's chance of being committed through it, the product of 1 - P over its tokens,
    is above it (drafting on is cheaper than the round it may save).
    """

    predictor: RejectionPredictor
    k_max: int = 8
    tau: float | None = None  # None: the tau chosen at training time
    min_worthwhile: float = 1.0  # acceptance below which one more drafted token does not pay

    def __post_init__(self) -> None:
        assert self.k_max >= 1
        self._scorer = self.predictor.scorer()
        self._stats = None  # this policy's DistributionStats, for the vocabulary it first sees
        self._log_top1 = 0.0  # the block's running log product of top-1 probabilities (BlockFeatures' last)
        self._tau = self.predictor.tau if self.tau is None else self.tau
        self._threshold = (math.nan, math.nan)  # (tau in force, its pre-sigmoid score)

    def max_draft(self) -> int:
        return self.k_max

    def stop_after(self, index: int, logits: np.ndarray, q: np.ndarray | None) -> bool:
        fused = self._scorer.stop_score
        if fused is not None and logits.dtype is _F32 and logits.strides == _ONE_FLOAT32 and logits.shape[0] >= 2:
            score, self._log_top1 = fused(data_address(logits), logits.shape[0], index, self._log_top1)
            return self._decide_score(index, score)
        stats = self._stats
        if stats is None or stats.n != logits.shape[0]:
            assert logits.ndim == 1 and logits.shape[0] >= 2, f"expected one row of >= 2 logits, got {logits.shape}"
            stats = self._stats = DistributionStats(logits.shape[0])
        top1, entropy, margin, gap, std = stats(logits)
        return self._decide(index, top1, entropy, margin, gap, std)

    def stop_after_stats(self, index: int, stats: tuple[float, float, float, float, float]) -> bool:
        """The same decision from `distribution_stats(logits)` (the simulator replays logged stats)."""
        return self._decide(index, *stats)

    def _decide(self, index: int, top1: float, entropy: float, margin: float, gap: float, std: float) -> bool:
        self._log_top1 = (0.0 if index == 0 else self._log_top1) + math.log(max(top1, 1e-12))
        scorer = self._scorer
        scorer.set_row(top1, entropy, margin, gap, std, index, self._log_top1)  # as BlockFeatures' row
        return self._decide_score(index, scorer.score())

    def _decide_score(self, index: int, score: float) -> bool:
        """From the MLP's pre-sigmoid score: past tau, and not worth drafting on."""
        tau = self._tau
        if tau != self._threshold[0]:
            self._threshold = (tau, score_threshold(tau))
        threshold, p_reject = self._threshold[1], 0.5 * (1.0 + math.tanh(0.5 * score))
        return self._stops(index, p_reject >= tau if threshold is None else score >= threshold, 1.0 - p_reject)


@dataclass
class ConfidencePolicy(_DraftsOnWhenWorthwhile):
    """SLED's rule: stop after a token whose top-1 probability (temperature 1) is below the threshold."""

    threshold: float = 0.5
    k_max: int = 8
    min_worthwhile: float = 1.0  # the controller lowers the threshold to this when round trips dominate

    def max_draft(self) -> int:
        return self.k_max

    def stop_after(self, index: int, logits: np.ndarray, q: np.ndarray) -> bool:
        return self.stop_after_stats(index, (top1_prob(logits), 0.0, 0.0, 0.0, 0.0))

    def stop_after_stats(self, index: int, stats: tuple[float, float, float, float, float]) -> bool:
        return self._stops(index, stats[0] < self.threshold, stats[0])  # top-1 as the acceptance estimate


@dataclass
class EntropyPolicy(_DraftsOnWhenWorthwhile):
    """AdaEDL's bound, simplified: stop when 1 - sqrt(gamma * H) < lam, H the drafter's entropy in nats.

    1 - sqrt(gamma * H) approximates a lower bound on the token's acceptance probability. AdaEDL
    also moves lam online with the observed acceptance rate; here lam is fixed, at the value tuned on
    the 4-bit drafter's held-out rounds (stop above 2.5 nats; `models/predictor/manifest.json`:
    22.0 tokens/s there against 18.0 with lam 0.5, which stopped at 1.25 nats and cut drafts short).
    """

    lam: float = 0.29
    gamma: float = 0.2
    k_max: int = 8
    min_worthwhile: float = 1.0  # the controller lowers lam to this when round trips dominate

    def max_draft(self) -> int:
        return self.k_max

    def stop_after(self, index: int, logits: np.ndarray, q: np.ndarray) -> bool:
        return self.stop_after_stats(index, distribution_stats(logits))

    def stop_after_stats(self, index: int, stats: tuple[float, float, float, float, float]) -> bool:
        accept = 1.0 - math.sqrt(self.gamma * stats[1])  # AdaEDL's acceptance bound
        return self._stops(index, accept < self.lam, accept)


def policy_for(drafter, k_max: int = 8, directory: str | Path = PREDICTOR_DIR):
    """The predictor policy when weights for this drafter exist, else SLED's confidence rule."""
    predictor = load_predictor_for(drafter, directory)
    return PredictorPolicy(predictor, k_max) if predictor else ConfidencePolicy(k_max=k_max)
