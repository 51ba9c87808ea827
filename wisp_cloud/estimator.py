"""Verification time estimator: a linear model of one batched verify forward.

    T(B) = c0 + c1 * sum(n_i) + c2 * sum(n_i * L_i) + c3 * sum(C_i) + c4 * sum(R_i) + c5 * |B|
           + c6 * rows * chunk * K + c7 * rows * K + c8 * min(sum(n_i), 8)

n_i = new (uncached) tokens of request i, L_i = its total length after the round (C_i + n_i), C_i = its
cached prefix tokens, R_i = the rows of logits it reads (a verify block all of its n_i rows, a prefill only
its last, a resume none). c0 is the per-batch launch cost, c1 the per-token MLP/projection cost, c2 the
attention cost of new tokens against the whole context, c3 reading the cached KV, c4 the output
projection of one row (a [hidden x vocab] product: for the shipped target about a fifth of a token's
FLOPs, so a verify token costs more than a prompt token; without it the held-out error on the full
profile grid was 13%, with it 7%), c5 the fixed cost of one request in the batch (its block table,
gather, sampling and verification: on one CPU thread about 10 ms, which made a batch of eight decode steps
take three times one step, not the 1.3 times the token terms give).

The last three are the batch's own, not its members': c6 and c7 price the paged attention's layout
(`attention_rows.padded_layout`: `rows` of `chunk` query slots, every row padded to the longest row's
`K` keys, so one long context or one long prefill makes every row in the batch pay: the score matrices
and the gathered keys); c8 prices the first tokens of a forward, whose matrix products run at a fraction
of their speed below eight rows (on this CPU a decode step costs 45 ms and an 8-token block 95 ms, while
each token past the eighth adds about 1.4 ms). Without them the held-out error on the full profile grid
was 8.5%, with them about 4%, against 0.85% between two measurements of the same grid.

A batch's time is therefore the intercept, each member's own cost (`request_cost_ms`, the first six
terms) and the batch's terms (`layout_ms`); a scheduler that prices a batch incrementally keeps the
layout as it grows (`attention_rows.LayoutTally`, O(log n) per request).

Coefficients are fitted by non-negative least squares: a negative cost per token is physically wrong and
would let the scheduler believe that adding work makes a batch faster. By default the residuals are
relative (each row divided by its measured time): timing noise grows with the batch, and a 3 ms error
matters on a 6 ms warm batch, not on a 300 ms prefill; plain least squares lets the big batches drown the
intercept, the term that prices small batches. Predictions carry a configurable
safety margin (under-estimates eat SLO slack; over-estimates shrink batches). Accuracy is reported on
held-out samples without the margin, since the margin is a deliberate bias.

Pure policy: plain numbers in, milliseconds out; no clock, no torch. A sample is (costs, measured_ms).
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from scipy.optimize import nnls

from wisp_cloud.attention_rows import padded_layout

FEATURE_NAMES = ("intercept_ms", "per_new_token_ms", "per_new_token_x_len_ms", "per_cached_token_ms",
                 "per_logit_row_ms", "per_request_ms", "per_padded_score_ms", "per_gathered_key_ms",
                 "per_small_batch_token_ms")
N_TERMS = len(FEATURE_NAMES)
SMALL_BATCH_TOKENS = 8  # c8's reach: below this many rows a forward's matrix products run slowly
FORMAT = "wisp-estimator/4"
# /1: four coefficients (no logit rows), /2: five (no per-request term), /3: six (no layout terms); the
# missing terms read as 0
OLD_FORMATS = ("wisp-estimator/1", "wisp-estimator/2", "wisp-estimator/3")


@dataclass(frozen=True)
class VerifyCost:
    """What one request asks of a verify forward: tokens to run now, the prefix already in its KV, and the
    rows of logits it reads (None: every new token's, as a verify block does)."""

    new_tokens: int
    cached_tokens: int
    logit_rows: int | None = None

    def __post_init__(self) -> None:
        if self.new_tokens < 0 or self.cached_tokens < 0:
            raise ValueError(f"token counts must be >= 0, got new={self.new_tokens} cached={self.cached_tokens}")
        if self.logit_rows is None:  # a verify block: one row per token (frozen, hence object.__setattr__)
            object.__setattr__(self, "logit_rows", self.new_tokens)
        if not 0 <= self.logit_rows <= self.new_tokens:
            raise ValueError(f"logit_rows must be in [0, new_tokens={self.new_tokens}], got {self.logit_rows}")

    @property
    def rows(self) -> int:
        """R: rows of logits the forward computes for this request."""
        return self.logit_rows

    @property
    def total_len(self) -> int:
        """L: the request's length after the round."""
        return self.new_tokens + self.cached_tokens


Sample = tuple[Sequence[VerifyCost], float]  # (the batch, measured milliseconds)


def batch_features(batch: Iterable[VerifyCost]) -> tuple[float, ...]:
    """[1, sum n, sum n*L, sum C, sum R, requests, rows*chunk*K, rows*K, min(sum n, 8)]: the model's design
    row for one batch (the last three from the paged attention's layout, `attention_rows.padded_layout`)."""
    new = new_x_len = cached = rows = count = 0
    news, caches = [], []
    for req in batch:
        new += req.new_tokens
        new_x_len += req.new_tokens * req.total_len
        cached += req.cached_tokens
        rows += req.rows
        count += 1
        news.append(req.new_tokens)
        caches.append(req.cached_tokens)
    att_rows, chunk, keys = padded_layout(news, caches)
    return (1.0, float(new), float(new_x_len), float(cached), float(rows), float(count),
            float(att_rows * chunk * keys), float(att_rows * keys), float(min(new, SMALL_BATCH_TOKENS)))


@dataclass(frozen=True)
class Margin:
    """Safety margin on a prediction: predicted = raw * scale + extra_ms."""

    scale: float = 1.0
    extra_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.scale <= 0 or self.extra_ms < 0:
            raise ValueError(f"margin needs scale > 0 and extra_ms >= 0, got {self}")

    def apply(self, raw_ms: float) -> float:
        return raw_ms * self.scale + self.extra_ms


@dataclass(frozen=True)
class FitReport:
    """Accuracy of the raw model (no margin) on a set of samples."""

    n: int
    r2: float
    mae_ms: float
    mape_pct: float


def split(samples: Sequence[Sample], holdout_fraction: float, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """(fit, holdout) by a seeded shuffle; each side keeps at least one sample when there are two or more."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    order = np.random.default_rng(seed).permutation(len(samples))
    n_holdout = int(round(len(samples) * holdout_fraction))
    if len(samples) >= 2 and holdout_fraction > 0:
        n_holdout = min(max(n_holdout, 1), len(samples) - 1)
    holdout = [samples[i] for i in order[:n_holdout]]
    fit = [samples[i] for i in order[n_holdout:]]
    return fit, holdout


def _design(samples: Sequence[Sample]) -> tuple[np.ndarray, np.ndarray]:
    X = np.array([batch_features(batch) for batch, _ in samples], dtype=np.float64)  # [n_samples, N_TERMS]
    y = np.array([ms for _, ms in samples], dtype=np.float64)  # [n_samples]
    return X.reshape(len(samples), len(FEATURE_NAMES)), y


def _accuracy(predicted: np.ndarray, measured: np.ndarray) -> FitReport:
    err = predicted - measured
    ss_res = float(np.sum(err**2))
    ss_tot = float(np.sum((measured - measured.mean()) ** 2)) if len(measured) else 0.0
    if ss_tot > 0:
        r2 = 1.0 - ss_res / ss_tot
    else:  # constant targets: R^2 is undefined; call a perfect fit 1 and anything else 0
        r2 = 1.0 if ss_res == 0 else 0.0
    positive = measured > 0
    mape = float(np.mean(np.abs(err[positive]) / measured[positive]) * 100) if positive.any() else 0.0
    mae = float(np.mean(np.abs(err))) if len(err) else 0.0
    return FitReport(n=len(measured), r2=r2, mae_ms=mae, mape_pct=mape)


class TimeEstimator:
    """T(batch) in milliseconds, fitted offline from a profile and refitted online from live batches.

    Online refit (`observe`) keeps a bounded window of the most recent live samples and refits every
    `refit_every` observations on the profile samples plus that window: the profile anchors regions the
    live traffic has not visited lately (say, no cold prompts for an hour), while the window tracks drift.
    `version` changes whenever predictions can change, so callers caching per-request costs know to redo them.
    """

    def __init__(
        self,
        coefficients: Sequence[float] = (0.0,) * len(FEATURE_NAMES),
        *,
        margin: Margin = Margin(),
        metadata: dict[str, Any] | None = None,
        window: int = 512,
        refit_every: int = 64,
        min_refit_samples: int = 16,
        relative: bool = True,
    ) -> None:
        self.version = 0
        self._set_coefficients(coefficients)
        self._margin = margin
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.window = window
        self.refit_every = refit_every
        self.min_refit_samples = min_refit_samples
        self.relative = relative
        self.read_format = FORMAT  # the format it was loaded from (`from_dict`)
        self.profile: list[Sample] = []
        self.recent: deque[Sample] = deque(maxlen=window)
        self._since_refit = 0

    # --- coefficients and margin -------------------------------------------------------------

    def _set_coefficients(self, coefficients: Sequence[float]) -> None:
        """In FEATURE_NAMES order; trailing terms left out are 0 (as older profile formats load)."""
        c = [float(x) for x in coefficients]
        if not 1 <= len(c) <= len(FEATURE_NAMES) or any(x < 0 or not math.isfinite(x) for x in c):
            raise ValueError(f"need up to {len(FEATURE_NAMES)} finite non-negative coefficients, got {coefficients}")
        c += [0.0] * (len(FEATURE_NAMES) - len(c))
        self.c0, self.c1, self.c2, self.c3, self.c4, self.c5, self.c6, self.c7, self.c8 = c
        self.version += 1

    @property
    def coefficients(self) -> tuple[float, ...]:
        return self.c0, self.c1, self.c2, self.c3, self.c4, self.c5, self.c6, self.c7, self.c8

    @property
    def margin(self) -> Margin:
        return self._margin

    @margin.setter
    def margin(self, margin: Margin) -> None:
        self._margin = margin
        self.version += 1

    # --- prediction ----------------------------------------------------------------------------

    def request_cost_ms(self, req: VerifyCost) -> float:
        """The request's own raw cost in any batch: the first six terms less the intercept (no layout terms,
        which belong to the batch: `layout_bound_ms`; no margin)."""
        n = req.new_tokens
        return (self.c1 * n + self.c2 * n * (n + req.cached_tokens) + self.c3 * req.cached_tokens + self.c4 * req.rows
                + self.c5)

    def marginal_token_ms(self, req: VerifyCost) -> float:
        """What one more draft token adds to this request's verification (raw, its own terms): the price an
        edge pays for drafting on, beside its drafting time (on a CPU verifier about as much again)."""
        more = VerifyCost(req.new_tokens + 1, req.cached_tokens, req.rows + 1)
        return self.request_cost_ms(more) - self.request_cost_ms(req)

    def layout_ms(self, rows: int, chunk: int, keys: int, tokens: int) -> float:
        """The batch's own terms: its attention layout (`attention_rows`: `rows` of `chunk` queries padded to
        `keys` keys) and its `tokens` new tokens' small-batch cost. A batch builder keeps a `LayoutTally`."""
        return self.c6 * rows * chunk * keys + self.c7 * rows * keys + self.c8 * min(tokens, SMALL_BATCH_TOKENS)

    def with_margin(self, raw_ms: float) -> float:
        return self._margin.apply(raw_ms)

    def backlog_ms(self, queued: Iterable[VerifyCost], max_batch_tokens: int) -> float:
        """Predicted time to drain a queue (admission control): each request's own cost and its attention
        as one row of its own, plus per batch of at most `max_batch_tokens` the intercept and the small-batch
        term, with the margin (padding between requests of one batch is left out: who shares a batch with
        whom is the scheduler's choice)."""
        costs = list(queued)
        if not costs:
            return 0.0
        tokens = sum(c.new_tokens for c in costs)
        batches = max(1, math.ceil(tokens / max_batch_tokens))
        own = sum(self.request_cost_ms(c) + self.c6 * c.new_tokens * c.total_len + self.c7 * c.total_len
                  for c in costs)
        return self.with_margin(own + batches * (self.c0 + self.c8 * min(SMALL_BATCH_TOKENS, tokens)))

    def predict_raw(self, batch: Iterable[VerifyCost]) -> float:
        """The fitted model alone; an empty batch costs nothing (there is no forward)."""
        costs = list(batch)
        if not costs:
            return 0.0
        total = self.c0 + sum(self.request_cost_ms(r) for r in costs)
        tokens = sum(r.new_tokens for r in costs)
        if self.c6 or self.c7:  # the layout only when priced (a profile of an older format has neither)
            return total + self.layout_ms(*padded_layout([r.new_tokens for r in costs],
                                                          [r.cached_tokens for r in costs]), tokens)
        return total + self.c8 * min(tokens, SMALL_BATCH_TOKENS)

    def predict(self, batch: Iterable[VerifyCost]) -> float:
        """T(batch) in ms with the safety margin: what a scheduler should plan with."""
        costs = list(batch)
        return self.with_margin(self.predict_raw(costs)) if costs else 0.0

    def predict_one(self, req: VerifyCost) -> float:
        """T({i}) in ms with the margin."""
        return self.with_margin(self.predict_raw([req]))

    # --- fitting and accuracy ----------------------------------------------------------------------

    def fit(self, samples: Sequence[Sample]) -> FitReport:
        """Non-negative least squares on the samples (they become the profile); returns in-sample accuracy."""
        if len(samples) < len(FEATURE_NAMES):
            raise ValueError(f"need at least {len(FEATURE_NAMES)} samples to fit, got {len(samples)}")
        report = self._fit_on(samples)  # first: a refused fit leaves the estimator as it was
        self.profile = list(samples)
        self.recent.clear()
        self._since_refit = 0
        self.metadata["fit"] = asdict(report)
        return report

    def fit_holdout(self, samples: Sequence[Sample], holdout_fraction: float = 0.3, seed: int = 0) -> FitReport:
        """Split, fit on one part, and return (and record) accuracy on the held-out part, as the paper reports."""
        fit_part, holdout = split(samples, holdout_fraction, seed)
        self.fit(fit_part)
        report = self.evaluate(holdout)
        self.metadata["holdout"] = asdict(report)
        return report

    def evaluate(self, samples: Sequence[Sample]) -> FitReport:
        """R^2, MAE and MAPE of the raw model (margin excluded) against measured times."""
        X, y = _design(samples)
        return _accuracy(X @ np.array(self.coefficients), y)

    def _fit_on(self, samples: Sequence[Sample]) -> FitReport:
        X, y = _design(samples)
        if self.relative and not np.all(y > 0):
            raise ValueError("relative fitting needs every measured time > 0")
        weights = 1.0 / y if self.relative else np.ones_like(y)  # [n_samples]
        # Columns span ~1 to ~1e7 (n*L); scale each to unit norm so NNLS is well conditioned. A positive
        # column scale keeps the non-negativity constraint intact.
        Xw = X * weights[:, None]  # [n_samples, N_TERMS]
        norms = np.linalg.norm(Xw, axis=0)
        norms[norms == 0] = 1.0
        scaled, _ = nnls(Xw / norms, y * weights)
        coefficients = scaled / norms
        self._set_coefficients(coefficients)
        return _accuracy(X @ coefficients, y)

    # --- online ----------------------------------------------------------------------------------

    def observe(self, batch: Sequence[VerifyCost], measured_ms: float) -> bool:
        """Record a live batch's measured time; refit every `refit_every` observations. True if it refitted."""
        if not batch or not math.isfinite(measured_ms) or measured_ms <= 0:
            return False  # an empty or broken measurement teaches nothing
        self.recent.append((list(batch), float(measured_ms)))
        self._since_refit += 1
        if self._since_refit < self.refit_every:
            return False
        self._since_refit = 0
        samples = self.profile + list(self.recent)
        if len(samples) < max(self.min_refit_samples, len(FEATURE_NAMES)):
            return False
        self.metadata["online"] = asdict(self._fit_on(samples))
        return True

    # --- persistence -------------------------------------------------------------------------------

    def to_dict(self, include_profile: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT,
            "coefficients": dict(zip(FEATURE_NAMES, self.coefficients)),
            "margin": asdict(self._margin),
            "metadata": self.metadata,
            "window": self.window,
            "refit_every": self.refit_every,
            "min_refit_samples": self.min_refit_samples,
            "relative": self.relative,
        }
        if include_profile:  # kept so a loaded estimator refits online exactly as the saved one would
            out["profile"] = [[[[r.new_tokens, r.cached_tokens, r.rows] for r in batch], ms] for batch, ms in self.profile]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TimeEstimator:
        if data.get("format") not in (FORMAT, *OLD_FORMATS):
            raise ValueError(f"not a {FORMAT} profile (format={data.get('format')!r})")
        est = cls(
            [data["coefficients"].get(name, 0.0) for name in FEATURE_NAMES],
            margin=Margin(**data["margin"]),
            metadata=data.get("metadata", {}),
            window=data["window"],
            refit_every=data["refit_every"],
            min_refit_samples=data["min_refit_samples"],
            relative=data.get("relative", True),
        )
        est.profile = [([VerifyCost(*req) for req in batch], float(ms)) for batch, ms in data.get("profile", [])]
        est.read_format = data["format"]  # an older format loads, but a server re-profiles its default file
        return est

    def save(self, path: str | Path, include_profile: bool = True) -> None:
        Path(path).write_text(json.dumps(self.to_dict(include_profile), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TimeEstimator:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __repr__(self) -> str:
        terms = ", ".join(f"{name}={value:.4g}" for name, value in zip(FEATURE_NAMES, self.coefficients))
        return f"TimeEstimator({terms}, margin={self._margin})"


def make_metadata(model: str, device: str, dtype: str, **extra: Any) -> dict[str, Any]:
    """The identity of a profile: coefficients are only valid for this (model, device, dtype)."""
    return {"model": model, "device": device, "dtype": dtype, **extra}
