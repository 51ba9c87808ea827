#!/usr/bin/env python3
"""Train the rejection predictor (`wisp_edge.controller`) for the shipped drafters, against the real target.

    python tools/train_predictor.py --drafter all        # ~25 min on 2 cores; budgets per drafter in DEFAULTS
    python tools/train_predictor.py --drafter q4 --reuse-data   # retrain from the cached rounds

1. Collect: greedy generation through the real engine and the in-process verifier (the code the
   server runs), with fixed drafts of k tokens, on training chat prompts (tools.build.distill.prompts,
   held-out sources excluded, and past the first --skip-prompts that distilled the student). Every
   drafted token keeps its feature row; labels: 0 accepted, 1 the block's first rejection, -1 after
   it (excluded from training and metrics, kept to count waste).
2. Train the 3-layer MLP in torch with class-weighted BCE; train/validation split by prompt.
3. tau: maximise TPR - FPR on validation (Youden's J: stopped first rejections minus stopped
   accepted tokens). Two other operating points are reported: the paper's (80% of acceptable
   tokens kept) and the best throughput of a simple cost model (measured drafting and verify time).
4. Evaluate on models/student/heldout_prompts.jsonl (never trained on): miss rate at the first
   rejection and recall of acceptable tokens for the predictor and both fallbacks, per-call latency.
Writes <out>/<drafter>.npz (numpy weights + features' mean/scale + tau + drafter sha256) and
<out>/manifest.json; collected rounds are cached in --data-dir (--reuse-data trains from them).
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from tools.build.distill import prompts as pr  # noqa: E402
from wisp_cloud.local_pair import LocalPair  # noqa: E402
from wisp_cloud.model.loader import load_model  # noqa: E402
from wisp_cloud.settings import DEFAULT_TARGET  # noqa: E402
from wisp_edge.controller.features import FEATURE_NAMES, BlockFeatures  # noqa: E402
from wisp_edge.controller.predictor import (ConfidencePolicy, EntropyPolicy, PredictorPolicy,  # noqa: E402
                                            RejectionPredictor, file_sha256)
from wisp_edge.drafters import SHIPPED_DRAFTERS, resolve_drafter_path  # noqa: E402

HELDOUT = ROOT / "models" / "student" / "heldout_prompts.jsonl"
EXCLUDED, ACCEPTED, FIRST_REJECTED = -1, 0, 1
# Per drafter, unless a flag says otherwise. q4 rejects ~2.5% of tokens, so it needs long answers and
# more rounds for positives; the student rejects about every other token, so k = 8 loses almost
# nothing (few blocks get that far) and shorter answers spread its budget over more prompts.
DEFAULTS = {"q4": dict(k=10, answer_tokens=128, minutes=8.0, heldout_minutes=6.0),
            "student": dict(k=8, answer_tokens=64, minutes=8.0, heldout_minutes=3.0)}
HIDDEN = (64, 32)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- collection


@dataclass
class RecordingPolicy:
    """FixedLength(k) that keeps each drafted token's features and labels them from the verdict.

    A drafted EOS ends the block before the policy is asked about it, so it has no feature row
    and no label.
    """

    k: int
    features: list = field(default_factory=list)  # [F] float32 per drafted token
    labels: list = field(default_factory=list)
    rounds: list = field(default_factory=list)  # (drafted, accepted, drafting ms, verify ms, feature rows)

    def __post_init__(self) -> None:
        self._block_features = BlockFeatures()
        self._rows = 0

    def max_draft(self) -> int:
        return self.k

    def stop_after(self, index: int, logits: np.ndarray, q: np.ndarray) -> bool:
        self.features.append(self._block_features(index, logits))
        self._rows += 1
        return False

    def observe(self, drafted, accepted, result, rtt_ms, drafting_ms) -> None:
        labels = [ACCEPTED] * accepted + [FIRST_REJECTED] * (accepted < drafted) + [EXCLUDED] * (drafted - accepted - 1)
        self.labels += labels[: self._rows]
        self.rounds.append((drafted, accepted, sum(drafting_ms), result.verify_ms, self._rows))
        self._rows = 0


def collect(pair: LocalPair, prompts: list[str], *, k: int, answer_tokens: int, max_prompt: int, minutes: float,
            desc: str) -> dict:
    """Run greedy rounds on prompts until the time budget; arrays by drafted token and by round."""
    policy = RecordingPolicy(k)
    # No drafting ahead: a block drafted during a round trip and then dropped adds feature rows no verdict labels.
    engine = pair.engine(policy, draft_ahead=False)
    token_prompt, token_round, round_prompt = [], [], []
    start = time.time()
    deadline = start + 60 * minutes
    bar = tqdm(prompts, desc=desc, unit="prompt", mininterval=10, file=sys.stderr)
    used = 0
    for i, text in enumerate(bar):
        if time.time() > deadline:
            break
        ids = pair.chat_prompt_ids(text)
        if len(ids) > max_prompt:
            continue
        n_rounds = len(policy.rounds)
        for _ in engine.generate(ids, max_new_tokens=answer_tokens):
            pass
        for r in range(n_rounds, len(policy.rounds)):
            token_round += [r] * policy.rounds[r][4]
            round_prompt.append(i)
        token_prompt += [i] * (len(policy.labels) - len(token_prompt))
        used += 1
        labels = np.asarray(policy.labels)
        bar.set_postfix(tokens=int((labels >= 0).sum()), rejections=int((labels == 1).sum()), refresh=False)
    bar.close()
    rounds = np.asarray(policy.rounds, dtype=np.float64).reshape(-1, 5)
    assert len(token_round) == len(policy.labels) == len(policy.features)
    return dict(features=np.stack(policy.features).astype(np.float32), labels=np.asarray(policy.labels, np.int8),
                prompt=np.asarray(token_prompt, np.int32), round=np.asarray(token_round, np.int32),
                round_drafted=rounds[:, 0].astype(np.int32), round_accepted=rounds[:, 1].astype(np.int32),
                round_draft_ms=rounds[:, 2], round_verify_ms=rounds[:, 3],
                round_prompt=np.asarray(round_prompt, np.int32),
                prompts_used=np.int32(used), minutes=np.float64((time.time() - start) / 60))


def training_prompts(skip: int, seed: int) -> list[str]:
    """Training prompts: held-out source texts excluded; the first `skip` (the student's distillation
    prompts, in the same seeded order) left out so the student is judged on text it never saw."""
    train, _ = pr.split_prompts(pr.build_prompts(), n_heldout=200, seed=0)
    held_hashes = {p.text_hash for p in pr.read_jsonl(HELDOUT)}
    train = [p.prompt for p in train[skip:] if p.text_hash not in held_hashes]
    np.random.default_rng(seed).shuffle(train)
    return train


# ---------------------------------------------------------------- training


def mlp(n_in: int, hidden: tuple[int, int]) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(n_in, hidden[0]), torch.nn.ReLU(), torch.nn.Linear(*hidden),
                               torch.nn.ReLU(), torch.nn.Linear(hidden[1], 1))


def train_mlp(x_train, y_train, x_val, y_val, *, hidden=HIDDEN, epochs=200, patience=20, seed=0):
    """Class-weighted BCE with Adam; keeps the epoch with the best validation loss.  x: [n, F], y: [n] in {0, 1}."""
    torch.manual_seed(seed)
    mean, scale = x_train.mean(0), x_train.std(0) + 1e-6  # [F]
    xt = torch.from_numpy((x_train - mean) / scale)
    xv = torch.from_numpy((x_val - mean) / scale)
    yt, yv = torch.from_numpy(y_train.astype(np.float32)), torch.from_numpy(y_val.astype(np.float32))
    pos_weight = torch.tensor((yt == 0).sum().item() / max((yt == 1).sum().item(), 1))
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    net = mlp(x_train.shape[1], hidden)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    best, best_state, since = float("inf"), None, 0
    for epoch in range(epochs):
        net.train()
        for idx in torch.randperm(len(xt)).split(512):
            opt.zero_grad()
            loss_fn(net(xt[idx])[:, 0], yt[idx]).backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            val = loss_fn(net(xv)[:, 0], yv).item()
        if val < best - 1e-5:
            best, best_state, since = val, {k: v.clone() for k, v in net.state_dict().items()}, 0
        else:
            since += 1
            if since >= patience:
                break
    net.load_state_dict(best_state)
    layers = [(m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy())
              for m in net if isinstance(m, torch.nn.Linear)]  # W: [in, out]
    return layers, mean.astype(np.float32), scale.astype(np.float32), dict(epochs=epoch + 1, val_loss=round(best, 4),
                                                                            pos_weight=round(pos_weight.item(), 2))


# ---------------------------------------------------------------- metrics


def stop_metrics(stops: np.ndarray, labels: np.ndarray) -> dict:
    """Per drafted token: miss rate at the first rejection and recall of acceptable tokens."""
    first, ok = labels == FIRST_REJECTED, labels == ACCEPTED
    return {"miss_rate_first_rejection": round(float((~stops[first]).mean()), 4),
            "recall_acceptable": round(float((~stops[ok]).mean()), 4)}


def auc(scores: np.ndarray, y: np.ndarray) -> float:
    """Area under the ROC curve: the Mann-Whitney statistic, ties at their average rank."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # [n], 1-based
    n1 = int(y.sum())
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(y) - n1)))


def simulate(data: dict, stops: np.ndarray, draft_ms: float, round_ms: float) -> dict:
    """Replay each recorded round under a stop rule (greedy, so the labels do not change).

    A block stopped at token j before the first rejection r commits j+1 drafts and the bonus token;
    otherwise r drafts and the correction, and tokens r+1..j are waste. Cost: round_ms + drafted x
    draft_ms. Approximate: the rest of a stopped round is not redrafted with fresh block features.
    """
    rounds, labels = data["round"], data["labels"]
    starts = np.flatnonzero(np.r_[True, rounds[1:] != rounds[:-1]])
    ends = np.r_[starts[1:], len(rounds)]
    drafted = committed = wasted = 0
    for s, e in zip(starts, ends):
        stop_at = np.flatnonzero(stops[s:e])
        j = int(stop_at[0]) if len(stop_at) else e - s - 1
        rejected = np.flatnonzero(labels[s:e] == FIRST_REJECTED)
        r = int(rejected[0]) if len(rejected) else e - s
        drafted += j + 1
        committed += j + 2 if j < r else r + 1
        wasted += max(0, j - r)
    n = len(starts)
    return {"drafted_per_round": round(drafted / n, 3), "committed_per_round": round(committed / n, 3),
            "wasted_per_round": round(wasted / n, 3),
            "tokens_per_s": round(1000 * committed / (n * round_ms + drafted * draft_ms), 2)}


def fallback_stops(features: np.ndarray) -> dict[str, np.ndarray]:
    """The training-free rules at their defaults, read from the stored feature rows."""
    conf, ent = ConfidencePolicy(), EntropyPolicy()
    return {f"confidence_{conf.threshold}": features[:, 0] < conf.threshold,
            f"entropy_lam{ent.lam}_gamma{ent.gamma}": 1.0 - np.sqrt(ent.gamma * features[:, 1]) < ent.lam}


def choose_tau(p: np.ndarray, labels: np.ndarray) -> float:
    """Youden's J on validation: the tau maximising (stopped first rejections) - (stopped accepted tokens).

    p: [n] scores, stop when p >= tau; labels: [n], -1 rows ignored."""
    keep = labels >= 0
    p, y = p[keep], labels[keep]
    best_tau, best_j = 0.5, -1.0
    for tau in np.unique(np.quantile(p, np.linspace(0.01, 0.99, 197))):
        stop = p >= tau
        j = stop[y == 1].mean() - stop[y == 0].mean()
        if j > best_j:
            best_tau, best_j = float(tau), float(j)
    return best_tau


def latency_us(policy, rows: list[np.ndarray], calls: int = 3000) -> float:
    """Median microseconds per stop_after call over real drafter logits rows (features + model)."""
    q = np.zeros(1)
    times = []
    for i in range(calls):
        t0 = time.perf_counter()
        policy.stop_after(i % 8, rows[i % len(rows)], q)
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e6, 1)


def logits_rows(pair: LocalPair, text: str, n: int = 64) -> list[np.ndarray]:
    pair.drafter.reset(pair.chat_prompt_ids(text))
    rows = []
    for _ in range(n):
        rows.append(pair.drafter.logits())
        pair.drafter.append(int(np.argmax(rows[-1])))
    return rows


# ---------------------------------------------------------------- main


def split_by_prompt(data: dict, val_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    prompts = np.unique(data["prompt"])
    rng = np.random.default_rng(seed)
    val_prompts = rng.choice(prompts, size=max(1, int(round(val_share * len(prompts)))), replace=False)
    val = np.isin(data["prompt"], val_prompts)
    return ~val, val


def subset(data: dict, mask: np.ndarray) -> dict:
    return {key: data[key][mask] for key in ("features", "labels", "round", "prompt")}


def load_or_collect(path: Path, reuse: bool, make, command: str) -> dict:
    """The cached rounds at `path` when reusing and present, else collect them (and cache)."""
    if reuse and path.exists():
        with np.load(path) as z:
            return dict(z)
    data = make()
    data["command"] = np.array(command)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **data)
    return data


def sizes(data: dict) -> dict:
    labels = data["labels"]
    return {"prompts": int(len(np.unique(data["prompt"]))), "rounds": int(len(np.unique(data["round"]))),
            "drafted": int(len(labels)), "accepted": int((labels == ACCEPTED).sum()),
            "first_rejected": int((labels == FIRST_REJECTED).sum()), "excluded": int((labels == EXCLUDED).sum())}


def evaluate(predictor: RejectionPredictor, val: dict, held: dict, cost: dict, k: int) -> dict:
    """Held-out metrics per rule: the predictor, the fallbacks at their defaults and tuned, fixed k."""
    p_held = predictor.p_reject_batch(held["features"])
    rules = {"predictor": p_held >= predictor.tau, **fallback_stops(held["features"])}
    # The fallbacks' single statistic with its threshold tuned like tau, for a like-for-like comparison.
    for rule, column, sign in (("confidence_tuned", 0, -1.0), ("entropy_tuned", 1, 1.0)):
        threshold = choose_tau(sign * val["features"][:, column], val["labels"])
        label = f"{rule}({FEATURE_NAMES[column]} {'<=' if sign < 0 else '>='} {sign * threshold:.3f})"
        rules[label] = sign * held["features"][:, column] >= threshold
    rules[f"fixed_k{k}"] = np.zeros(len(p_held), bool)
    results = {rule: {**stop_metrics(stops, held["labels"]), **simulate(held, stops, **cost)}
               for rule, stops in rules.items()}
    labelled, y = held["labels"] >= 0, (held["labels"] == FIRST_REJECTED).astype(int)
    conf_rule, entropy_rule = list(fallback_stops(held["features"][:1]))
    scores = {"predictor": p_held, conf_rule: -held["features"][:, 0], entropy_rule: held["features"][:, 1]}
    for rule, score in scores.items():
        results[rule]["auc"] = round(auc(score[labelled], y[labelled]), 4)  # of the score the rule thresholds
    # Two other operating points, tuned on validation: the paper's (keep 80% of acceptable tokens), and
    # the best simulated throughput under this machine's cost model (tau > 1: never stop early).
    p_val = predictor.p_reject_batch(val["features"])
    tau80 = float(np.quantile(p_val[val["labels"] == ACCEPTED], 0.80))
    candidates = [*np.unique(np.quantile(p_val, np.linspace(0.0, 1.0, 101))), 1.01]
    tau_fast = max(candidates, key=lambda t: simulate(val, p_val >= t, **cost)["tokens_per_s"])
    for rule, t in (("predictor_at_recall_0.80", tau80), ("predictor_at_best_sim_throughput", tau_fast)):
        results[rule] = {"tau": round(float(t), 4), **stop_metrics(p_held >= t, held["labels"]),
                         **simulate(held, p_held >= t, **cost)}
    return results


def run_drafter(name: str, model, train_texts: list[str], held_texts: list[str], a) -> dict:
    pair = LocalPair.load(name, a.target, model=model, n_threads=1)
    o = {key: getattr(a, key) if getattr(a, key) is not None else value for key, value in DEFAULTS[name].items()}
    k, kw = o["k"], dict(k=o["k"], answer_tokens=o["answer_tokens"], max_prompt=a.max_prompt)
    data = load_or_collect(a.data_dir / f"{name}_train_k{k}.npz", a.reuse_data, lambda: collect(
        pair, train_texts, minutes=o["minutes"], desc=f"{name} train", **kw), a.command)
    held = load_or_collect(a.data_dir / f"{name}_heldout_k{k}.npz", a.reuse_data, lambda: collect(
        pair, held_texts, minutes=o["heldout_minutes"], desc=f"{name} held-out", **kw), a.command)
    log(f"{name}: train data {sizes(data)} in {float(data['minutes']):.1f} min; "
        f"held-out {sizes(held)} in {float(held['minutes']):.1f} min")

    tr_mask, val_mask = split_by_prompt(data, a.val_share, a.seed)
    tr, val = subset(data, tr_mask), subset(data, val_mask)
    lab_tr, lab_val = tr["labels"] >= 0, val["labels"] >= 0
    t0 = time.time()
    layers, mean, scale, info = train_mlp(tr["features"][lab_tr], tr["labels"][lab_tr], val["features"][lab_val],
                                          val["labels"][lab_val], hidden=HIDDEN, seed=a.seed)
    train_s = time.time() - t0
    predictor = RejectionPredictor(layers, mean, scale, 0.5, name, file_sha256(resolve_drafter_path(name)))
    predictor.tau = choose_tau(predictor.p_reject_batch(val["features"]), val["labels"])
    log(f"{name}: trained in {train_s:.1f} s ({info}); tau = {predictor.tau:.4f} (Youden's J on validation)")

    later = np.r_[False, np.diff(data["round_prompt"]) == 0]  # a prompt's first round also prefills the drafter
    cost = {"draft_ms": float(data["round_draft_ms"][later].sum() / data["round_drafted"][later].sum()),
            "round_ms": float(data["round_verify_ms"].mean()) + a.rtt_ms}
    results = evaluate(predictor, val, held, cost, k)
    rows = logits_rows(pair, held_texts[0])
    latency = {"predictor": latency_us(PredictorPolicy(predictor, k), rows),
               "confidence": latency_us(ConfidencePolicy(), rows), "entropy": latency_us(EntropyPolicy(), rows)}

    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"{name}.npz"
    predictor.meta = {"k": k, "tau_rule": "youden_j_on_validation", "trained": time.strftime("%Y-%m-%d %H:%M:%S")}
    predictor.save(path)
    assert RejectionPredictor.load(path).drafter_sha256 == predictor.drafter_sha256
    report = {
        "drafter": name, "drafter_file": SHIPPED_DRAFTERS[name], "drafter_sha256": predictor.drafter_sha256,
        "weights": path.name, "weights_sha256": file_sha256(path), "tau": round(predictor.tau, 6),
        "tau_rule": "Youden's J on validation", "features": list(FEATURE_NAMES), "hidden": list(HIDDEN),
        "data": {"train": sizes(tr), "validation": sizes(val), "heldout": sizes(held),
                 "collection_minutes": {"train": round(float(data["minutes"]), 1),
                                        "heldout": round(float(held["minutes"]), 1)},
                 "collected_by": {"train": str(data.get("command", "?")), "heldout": str(held.get("command", "?"))}},
        "training": {**info, "seconds": round(train_s, 1)},
        "cost_model": {**{k: round(v, 2) for k, v in cost.items()},
                       "note": f"drafting and verify time measured while collecting, plus --rtt-ms {a.rtt_ms}"},
        "heldout": results, "latency_us_per_call": latency}
    print_report(report)
    return report


def print_report(r: dict) -> None:
    print(f"\n== {r['drafter']}: tau {r['tau']:.4f}, held-out {r['data']['heldout']}")
    print(f"{'rule':<46}{'miss@1st-rej':>13}{'recall-ok':>10}{'drafted/rd':>11}{'commit/rd':>10}"
          f"{'waste/rd':>9}{'tok/s(sim)':>11}")
    for rule, m in r["heldout"].items():
        label = f"{rule} (tau {m['tau']:.3f})" if "tau" in m else rule
        print(f"{label:<46}{m['miss_rate_first_rejection']:>13.3f}{m['recall_acceptable']:>10.3f}"
              + "".join(f"{m[k]:>{w}.2f}" if k in m else " " * w for k, w in
                        (("drafted_per_round", 11), ("committed_per_round", 10), ("wasted_per_round", 9),
                         ("tokens_per_s", 11))))
    aucs = {rule: m["auc"] for rule, m in r["heldout"].items() if "auc" in m}
    print(f"paper: miss 0.425, recall 0.80; held-out AUC {aucs}; "
          f"latency per call (us): {r['latency_us_per_call']}; cost model {r['cost_model']}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--drafter", choices=["q4", "student", "all"], default="all")
    p.add_argument("--prompts", type=int, default=0, help="cap on training prompts (0: until --minutes)")
    p.add_argument("--heldout", type=int, default=200, help="held-out prompts to evaluate on (at most 200)")
    p.add_argument("--minutes", type=float, help="training-data collection budget per drafter (default: DEFAULTS)")
    p.add_argument("--heldout-minutes", type=float, help="held-out collection budget per drafter")
    p.add_argument("--k", type=int, help="fixed draft length while collecting (default: q4 10, student 8)")
    p.add_argument("--answer-tokens", type=int, help="answer length per prompt (default: q4 128, student 64)")
    p.add_argument("--max-prompt", type=int, default=320, help="skip prompts longer than this (tokens)")
    p.add_argument("--skip-prompts", type=int, default=1000,
                   help="leading training prompts (the student's distillation prompts) to leave out")
    p.add_argument("--val-share", type=float, default=0.2)
    p.add_argument("--rtt-ms", type=float, default=20.0, help="network RTT added to verify time in the cost model")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the target")
    p.add_argument("--target", type=Path, default=DEFAULT_TARGET)
    p.add_argument("--out", type=Path, default=ROOT / "models" / "predictor")
    p.add_argument("--data-dir", type=Path, default=ROOT / "models" / "cache" / "predictor")
    p.add_argument("--reuse-data", action="store_true",
                   help="use the cached rounds in --data-dir where present (delete a file to collect it again)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    a.command = "python tools/train_predictor.py " + shlex.join(sys.argv[1:])
    model = load_model(a.target)
    train_texts = training_prompts(a.skip_prompts, a.seed)
    train_texts = train_texts[: a.prompts] if a.prompts else train_texts
    held_texts = [p.prompt for p in pr.read_jsonl(HELDOUT)][: a.heldout]
    names = ["q4", "student"] if a.drafter == "all" else [a.drafter]
    manifest_path = a.out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"drafters": {}}
    for name in names:
        report = run_drafter(name, model, train_texts, held_texts, a)
        report["command"] = a.command
        manifest["drafters"][name] = report
        manifest["heldout_prompts"] = "models/student/heldout_prompts.jsonl (evaluation only, never trained on)"
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"wrote {', '.join(f'{a.out}/{n}.npz' for n in names)} and {manifest_path}")


if __name__ == "__main__":
    main()
