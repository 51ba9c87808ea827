"""The rejection predictor each simulated drafter uses: the shipped weights, or weights trained for a parametric pair.

Trace replay uses the weights shipped for that drafter (models/predictor/<drafter>.npz, trained on the
train split; the simulator replays the held-out split). A parametric pair gets its own predictor, trained
as the paper trains one per pair: rounds of fixed length k = 10 drawn from the parametric model on the
*train* split's feature rows, labelled like tools/train_predictor.py (accepted 0, first rejection 1, later
excluded), then the same `train_mlp` and `choose_tau` (Youden's J on a validation split by answer). The
result is cached in tools/sim/profiles/predictors/ (training needs torch; replaying does not).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from tools.sim.acceptance import ParametricAcceptance, TraceAcceptance
from wisp_edge.controller.features import BlockFeatures
from wisp_edge.controller.predictor import PREDICTOR_DIR, RejectionPredictor

CACHE_DIR = Path(__file__).resolve().parent / "profiles" / "predictors"
TRAIN_K = 10


def predictor_for(acceptance: TraceAcceptance, *, train_if_missing: bool = True) -> RejectionPredictor:
    if not isinstance(acceptance, ParametricAcceptance):
        return RejectionPredictor.load(PREDICTOR_DIR / f"{acceptance.predictor_name}.npz")
    path = CACHE_DIR / f"{acceptance.predictor_name}.npz"
    if path.exists():
        return RejectionPredictor.load(path)
    if not train_if_missing:
        raise FileNotFoundError(f"{path}: train it with `python tools/simulate.py --train-predictor ...`")
    predictor = train_parametric(acceptance)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    predictor.save(path)
    return predictor


def labelled_rounds(acceptance: ParametricAcceptance, rng: np.random.Generator, k: int = TRAIN_K):
    """Fixed-k rounds along each train answer: feature rows [n, 7], labels [n], answer id [n]."""
    rows, labels, answer = [], [], []
    model = ParametricAcceptance(acceptance.traces, acceptance.target_alpha, split="train")
    for a, stream in enumerate(model.streams):
        accepted = rng.random(len(stream.accepted)) < np.clip(stream.stats[:, 0], 0, 1) ** model.gamma
        features = BlockFeatures()
        cursor = 0
        while cursor + k <= len(accepted):
            block = accepted[cursor: cursor + k]
            first = int(np.argmin(block)) if not block.all() else None
            for i in range(k):
                if first is not None and i > first:
                    break  # after the first rejection: excluded from training (train_predictor's -1)
                rows.append(features.from_stats(i, tuple(stream.stats[cursor + i])))
                labels.append(0 if first is None or i < first else 1)
                answer.append(a)
            cursor += (k if first is None else first) + 1
    return np.stack(rows).astype(np.float32), np.asarray(labels, np.int8), np.asarray(answer)


def train_parametric(acceptance: ParametricAcceptance, seed: int = 0) -> RejectionPredictor:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import train_predictor as tp  # torch: only needed here

    rng = np.random.default_rng(seed)
    x, y, answer = labelled_rounds(acceptance, rng)
    answers = np.unique(answer)
    val_answers = rng.choice(answers, size=max(1, len(answers) // 5), replace=False)
    val = np.isin(answer, val_answers)
    layers, mean, scale, info = tp.train_mlp(x[~val], y[~val], x[val], y[val], hidden=tp.HIDDEN, seed=seed)
    predictor = RejectionPredictor(layers, mean, scale, 0.5, acceptance.predictor_name, "0" * 64)
    predictor.tau = tp.choose_tau(predictor.p_reject_batch(x[val]), y[val])
    predictor.meta = {"k": TRAIN_K, "tau_rule": "youden_j_on_validation", "alpha": acceptance.target_alpha,
                      "gamma": acceptance.gamma, "trace": acceptance.traces.name, "rows": int(len(y)),
                      "first_rejections": int(y.sum()), **info}
    return predictor
