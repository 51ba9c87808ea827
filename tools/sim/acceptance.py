"""Which draft tokens the target accepts, and what the drafter's distribution looked like for each.

Both models give a request a *committed path*: per answer position, the drafter's distribution statistics
(`distribution_stats`: top-1 prob, entropy, margin, logit gap, logit std) when drafting that position from
the committed prefix, and whether the target accepts its (greedy) token there. Under greedy decoding this
is a property of the position, not of how rounds are cut, so a block drafted from position c reads
positions c, c+1, ... until the first rejection; drafting past a rejection reads the rows the real drafter
produced past its own rejected token (logged), or, beyond those, the next positions' rows as stand-ins.

- `TraceAcceptance`: replays rounds logged from the shipped pair (tools/collect_traces.py): the public
  sets' streams (split "public": MT-Bench + HumanEval) where the trace has them, else the held-out prompts',
  concatenated in random order. Positions where the logged round ended all-accepted
  (the bonus token, never drafted) are absent: the stream skips them.
- `ParametricAcceptance`: a model for other pairs. The statistics come from a trace (realistic feature
  rows, in their order); a position is accepted with probability top1^gamma, gamma set so that the mean
  acceptance along the path is `alpha` (a drafter whose agreement with the target grows with its own
  confidence, calibrated to a target pair's acceptance rate).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
TRACES_DIR = ROOT / "models" / "traces"
ACCEPTED, FIRST_REJECTED, AFTER = 0, 1, -1


@dataclass
class Stream:
    """One logged answer's committed path. stats: [n, 5]; accepted: [n]; off: rows drafted past a rejection at
    position i are off_stats[off_start[i]: off_start[i] + off_len[i]]."""

    stats: np.ndarray
    accepted: np.ndarray
    off_start: np.ndarray
    off_len: np.ndarray
    off_stats: np.ndarray


def _stream(rounds: list) -> Stream:
    stats, accepted, off_start, off_len, off = [], [], [], [], []
    for _drafted, _accepted, _dms, _vms, rows in rounds:
        rejected = False
        for row in rows:
            label = row[5]
            if rejected:  # drafted after the first rejection: off the committed path
                off.append(row[:5])
                off_len[-1] += 1
                continue
            stats.append(row[:5])
            accepted.append(label == ACCEPTED)
            off_start.append(len(off))
            off_len.append(0)
            rejected = label == FIRST_REJECTED
    as_rows = lambda x: np.asarray(x, dtype=np.float64).reshape(-1, 5)  # noqa: E731
    return Stream(as_rows(stats), np.asarray(accepted, bool), np.asarray(off_start, np.int64),
                  np.asarray(off_len, np.int64), as_rows(off))


@dataclass
class TraceSet:
    header: dict
    streams: dict[str, list[Stream]]  # by split
    draft_ms: float  # logged drafting time per token on the collecting machine

    @property
    def name(self) -> str:
        return self.header["drafter"]

    def acceptance_rate(self, split: str = "heldout") -> float:
        acc = np.concatenate([s.accepted for s in self.streams[split]])
        return float(acc.mean())


@lru_cache(maxsize=8)
def load_traces(name_or_path: str) -> TraceSet:
    path = Path(name_or_path)
    if not path.suffix:
        path = TRACES_DIR / f"{name_or_path}.jsonl.gz"
    if not path.exists():
        raise FileNotFoundError(f"{path}: run `python tools/collect_traces.py --from-cache` (or without it to collect)")
    with gzip.open(path, "rt") as f:
        header = json.loads(f.readline())
        if header.get("format") != "wisp-trace/1":
            raise ValueError(f"{path} is not a wisp-trace/1 file")
        streams: dict[str, list[Stream]] = {}
        drafted = draft_ms = 0.0
        for line in f:
            prompt = json.loads(line)
            streams.setdefault(prompt["split"], []).append(_stream(prompt["rounds"]))
            for r in prompt["rounds"][1:]:  # a prompt's first round also prefills the drafter
                drafted += r[0]
                draft_ms += r[2]
    return TraceSet(header, streams, draft_ms / max(drafted, 1))


@dataclass
class RequestPath:
    """The committed path one request will follow (several logged answers back to back)."""

    stats: np.ndarray  # [L, 5]
    accepted: np.ndarray  # [L] bool
    off_start: np.ndarray  # [L]
    off_len: np.ndarray  # [L]
    off_stats: np.ndarray  # [M, 5]

    def __len__(self) -> int:
        return len(self.accepted)

    def row(self, cursor: int, index: int, first_rejection: int | None) -> tuple[float, ...]:
        """Statistics of the `index`-th token of a block drafted at `cursor`."""
        if first_rejection is None or index <= first_rejection:
            return tuple(self.stats[cursor + index])
        at = cursor + first_rejection
        past = index - first_rejection - 1
        if past < self.off_len[at]:
            return tuple(self.off_stats[self.off_start[at] + past])
        return tuple(self.stats[min(at + 1 + past, len(self.stats) - 1)])


def _concat(streams: list[Stream], order: np.ndarray, need: int) -> RequestPath:
    parts, total = [], 0
    for i in order:
        parts.append(streams[i])
        total += len(streams[i].accepted)
        if total >= need:
            break
    offsets = np.cumsum([0] + [len(p.off_stats) for p in parts[:-1]])
    return RequestPath(np.concatenate([p.stats for p in parts]), np.concatenate([p.accepted for p in parts]),
                       np.concatenate([p.off_start + o for p, o in zip(parts, offsets)]),
                       np.concatenate([p.off_len for p in parts]), np.concatenate([p.off_stats for p in parts]))


def default_split(traces: TraceSet) -> str:
    """What a simulation replays: the public sets' rounds (MT-Bench + HumanEval) where the trace has them,
    else the held-out home-made prompts'."""
    return "public" if "public" in traces.streams else "heldout"


class TraceAcceptance:
    """Replay of the shipped pair's logged rounds (the public sets' prompts, or the held-out ones)."""

    def __init__(self, traces: TraceSet, split: str | None = None) -> None:
        split = split or default_split(traces)
        self.traces, self.split = traces, split
        self.streams = [s for s in traces.streams[split] if len(s.accepted)]
        self.name = f"trace:{traces.name}"
        self.predictor_name = traces.name  # models/predictor/<name>.npz was trained for this drafter

    @property
    def alpha(self) -> float:
        return float(np.concatenate([s.accepted for s in self.streams]).mean())

    def path(self, rng: np.random.Generator, tokens: int) -> RequestPath:
        need = tokens + 64  # room for drafting past the answer's last position
        order = rng.permutation(len(self.streams))
        while sum(len(self.streams[i].accepted) for i in order) < need:
            order = np.concatenate([order, rng.permutation(len(self.streams))])
        return _concat(self.streams, order, need)


def solve_gamma(top1: np.ndarray, alpha: float) -> float:
    """gamma with mean(top1 ** gamma) = alpha (monotone decreasing in gamma), by bisection on log gamma."""
    top1 = np.clip(top1, 1e-6, 1.0)
    lo, hi = -12.0, 6.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if np.mean(top1 ** np.exp(mid)) > alpha:
            lo = mid
        else:
            hi = mid
    return float(np.exp(0.5 * (lo + hi)))


class ParametricAcceptance(TraceAcceptance):
    """Feature rows from a trace; acceptance ~ Bernoulli(top1 ** gamma), mean `alpha` along the path."""

    def __init__(self, traces: TraceSet, alpha: float, split: str | None = None) -> None:
        super().__init__(traces, split)
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.target_alpha = alpha
        top1 = np.concatenate([s.stats[:, 0] for s in self.streams])
        self.gamma = solve_gamma(top1, alpha)
        self.name = f"param:{alpha:g}@{traces.name}"
        self.predictor_name = parametric_predictor_name(traces.name, alpha)

    @property
    def alpha(self) -> float:
        return self.target_alpha

    def path(self, rng: np.random.Generator, tokens: int) -> RequestPath:
        p = super().path(rng, tokens)
        p.accepted = rng.random(len(p.accepted)) < np.clip(p.stats[:, 0], 0.0, 1.0) ** self.gamma
        return p


def parametric_predictor_name(trace: str, alpha: float) -> str:
    return f"param-{trace}-a{alpha:g}"


def make_acceptance(spec: str) -> TraceAcceptance:
    """'q4' / 'student' (trace replay) or 'param:0.75' / 'param:0.75@student' (parametric, q4 rows by default)."""
    if spec.startswith("param:"):
        body = spec.split(":", 1)[1]
        alpha, _, trace = body.partition("@")
        return ParametricAcceptance(load_traces(trace or "q4"), float(alpha))
    return TraceAcceptance(load_traces(spec))
