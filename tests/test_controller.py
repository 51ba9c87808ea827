"""The speculation controller: features by hand, the numpy MLP against torch, where each policy stops,
weights refused for another drafter, the stop rule overlapped with the drafter's next evaluation, and end
to end a stop rule that changes draft lengths only."""

import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from wisp_cloud.generate import generate
from wisp_edge.controller import (FEATURE_NAMES, BlockFeatures, ConfidencePolicy, EntropyPolicy, PredictorPolicy,
                                  RejectionPredictor, distribution_stats, load_predictor_for, policy_for)
from wisp_edge.controller.predictor import PREDICTOR_DIR, file_sha256
from wisp_edge.drafters import resolve_drafter_path
from wisp_edge.wire.sampling import SamplingParams

F = len(FEATURE_NAMES)
NO_Q = np.zeros(1)


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_stats_by_hand():
    logits = np.array([1.0, 3.0, 0.5, 2.0, -1.0], dtype=np.float32)  # [vocab]
    p = softmax(logits.astype(np.float64))
    top1, entropy, margin, gap, std = distribution_stats(logits)
    assert top1 == pytest.approx(p[1], rel=1e-6)
    assert entropy == pytest.approx(-(p * np.log(p)).sum(), rel=1e-5)
    assert margin == pytest.approx(p[1] - p[3], rel=1e-5)
    assert gap == pytest.approx(1.0, rel=1e-6)  # 3.0 - 2.0
    assert std == pytest.approx(np.std(logits), rel=1e-5)
    assert logits[1] == 3.0 and logits[0] == 1.0, "the caller's row is not modified"


def test_stats_of_extremes():
    uniform = np.zeros(8, dtype=np.float32)
    top1, entropy, margin, gap, std = distribution_stats(uniform)
    assert (top1, margin, gap, std) == pytest.approx((1 / 8, 0.0, 0.0, 0.0), abs=1e-6)
    assert entropy == pytest.approx(math.log(8), rel=1e-6)
    certain = np.array([0.0, 200.0, 0.0], dtype=np.float32)
    top1, entropy, margin, gap, _ = distribution_stats(certain)
    assert top1 == pytest.approx(1.0) and entropy == pytest.approx(0.0, abs=1e-6) and margin == pytest.approx(1.0)
    assert gap == 50.0  # capped


def test_block_features_run_within_a_block():
    a = np.array([2.0, 0.0, 0.0], dtype=np.float32)
    b = np.array([0.0, 1.0, 0.0], dtype=np.float32)
    feats = BlockFeatures()
    f0, f1 = feats(0, a), feats(1, b)
    assert f0.shape == (F,) and f0.dtype == np.float32
    assert f1[FEATURE_NAMES.index("position")] == 1
    running = FEATURE_NAMES.index("block_log_top1")
    assert f0[running] == pytest.approx(math.log(softmax(a).max()), rel=1e-5)
    assert f1[running] == pytest.approx(math.log(softmax(a).max() * softmax(b).max()), rel=1e-5)
    assert feats(0, b)[running] == pytest.approx(math.log(softmax(b).max()), rel=1e-5), "index 0 starts a new block"


def random_predictor(seed=0, tau=0.5, sha="0" * 64, drafter="test") -> RejectionPredictor:
    rng = np.random.default_rng(seed)
    sizes = [F, 16, 8, 1]
    layers = [(rng.standard_normal((i, o)).astype(np.float32), rng.standard_normal(o).astype(np.float32))
              for i, o in zip(sizes, sizes[1:])]
    return RejectionPredictor(layers, rng.standard_normal(F).astype(np.float32),
                              rng.uniform(0.5, 2, F).astype(np.float32), tau, drafter, sha)


def test_numpy_mlp_equals_torch(tmp_path):
    predictor = random_predictor()
    net = torch.nn.Sequential(torch.nn.Linear(F, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8), torch.nn.ReLU(),
                              torch.nn.Linear(8, 1))
    with torch.no_grad():
        for linear, (w, b) in zip([m for m in net if isinstance(m, torch.nn.Linear)], predictor.layers):
            linear.weight.copy_(torch.from_numpy(w.T))
            linear.bias.copy_(torch.from_numpy(b))
    x = np.random.default_rng(1).standard_normal((32, F)).astype(np.float32) * 3  # [n, F]
    with torch.no_grad():
        expected = torch.sigmoid(net(torch.from_numpy((x - predictor.mean) / predictor.scale)))[:, 0].numpy()
    np.testing.assert_allclose(predictor.p_reject_batch(x), expected, rtol=1e-5, atol=1e-6)
    assert predictor.p_reject(x[3]) == pytest.approx(float(expected[3]), rel=1e-5, abs=1e-6)
    predictor.save(tmp_path / "p.npz")
    loaded = RejectionPredictor.load(tmp_path / "p.npz")
    np.testing.assert_array_equal(loaded.p_reject_batch(x), predictor.p_reject_batch(x))
    assert (loaded.tau, loaded.drafter, loaded.drafter_sha256) == (0.5, "test", "0" * 64)


def confidence_predictor(tau=0.5) -> RejectionPredictor:
    """An MLP whose score is 10 - 20 * top1_prob: P(reject) >= 0.5 exactly when top-1 <= 0.5."""
    w1 = np.zeros((F, 2), np.float32)
    w1[0] = [-20.0, 20.0]
    layers = [(w1, np.array([10.0, -10.0], np.float32)), (np.eye(2, dtype=np.float32), np.zeros(2, np.float32)),
              (np.array([[1.0], [-1.0]], np.float32), np.zeros(1, np.float32))]
    return RejectionPredictor(layers, np.zeros(F, np.float32), np.ones(F, np.float32), tau, "test", "0" * 64)


def peaked(top1: float, vocab: int = 16) -> np.ndarray:
    """Logits whose softmax puts `top1` on token 0 and spreads the rest evenly.  -> [vocab]"""
    rest = (1 - top1) / (vocab - 1)
    return np.log(np.array([top1] + [rest] * (vocab - 1))).astype(np.float32)


def test_policies_stop_where_they_should():
    confident, unsure = peaked(0.9), peaked(0.3)
    for policy in (ConfidencePolicy(0.5, k_max=6), PredictorPolicy(confidence_predictor(), k_max=6)):
        assert policy.max_draft() == 6
        assert not policy.stop_after(0, confident, NO_Q)
        assert policy.stop_after(1, unsure, NO_Q)
    assert not ConfidencePolicy(0.2).stop_after(0, unsure, NO_Q)
    assert PredictorPolicy(confidence_predictor(), tau=0.99).stop_after(0, peaked(0.45), NO_Q) is False
    # AdaEDL: stop when 1 - sqrt(gamma * H) < lam.  H(uniform over 16) = 2.77 nats -> bound 0.26.
    flat = np.zeros(16, np.float32)
    assert EntropyPolicy(lam=0.5).stop_after(0, flat, NO_Q)
    assert not EntropyPolicy(lam=0.2).stop_after(0, flat, NO_Q)
    assert not EntropyPolicy(lam=0.5).stop_after(0, peaked(0.99), NO_Q)
    # The controller relaxes each rule when a round trip costs much more than one drafted token.
    assert not ConfidencePolicy(0.5, min_worthwhile=0.2).stop_after(0, unsure, NO_Q)
    assert not PredictorPolicy(confidence_predictor(), min_worthwhile=0.01).stop_after(0, unsure, NO_Q)
    assert not EntropyPolicy(lam=0.5, min_worthwhile=0.2).stop_after(0, flat, NO_Q)
    # ... but only while the block is likely to be committed through the token: a doubtful token after
    # doubtful ones has a small chance (the product of the block's acceptance estimates) and ends it.
    for policy in (ConfidencePolicy(0.5, min_worthwhile=0.2), EntropyPolicy(lam=0.5, min_worthwhile=0.1)):
        row = unsure if isinstance(policy, ConfidencePolicy) else flat  # acceptance estimate ~0.3 / 0.26
        assert [policy.stop_after(i, row, NO_Q) for i in range(3)] == [False, True, True]
        assert not policy.stop_after(0, row, NO_Q), "a new block starts from certainty again"
    predictor = PredictorPolicy(confidence_predictor(), min_worthwhile=0.2)  # top-1 0.45: P(reject) 0.73
    assert [predictor.stop_after(i, peaked(0.45), NO_Q) for i in range(3)] == [False, True, True]
    assert [predictor.stop_after(i, peaked(0.6), NO_Q) for i in range(4)] == [False] * 4  # not doubtful: go on


class FileDrafter:
    """Just what weight matching reads from a drafter."""

    def __init__(self, model_path):
        self.model_path = model_path


def test_weights_refused_for_another_drafter(tmp_path):
    mine, other = tmp_path / "mine.gguf", tmp_path / "other.gguf"
    mine.write_bytes(b"drafter weights A")
    other.write_bytes(b"drafter weights B")
    random_predictor(sha=file_sha256(mine), drafter="mine").save(tmp_path / "mine.npz")
    assert load_predictor_for(FileDrafter(mine), tmp_path).drafter == "mine"
    assert load_predictor_for(FileDrafter(other), tmp_path) is None
    assert load_predictor_for(object(), tmp_path) is None, "a drafter without a file gets no weights"
    assert isinstance(policy_for(FileDrafter(other), k_max=5, directory=tmp_path), ConfidencePolicy)
    assert isinstance(policy_for(FileDrafter(mine), directory=tmp_path), PredictorPolicy)


def test_weights_for_other_features_are_refused(tmp_path):
    predictor = random_predictor()
    predictor.feature_names = tuple(reversed(FEATURE_NAMES))
    predictor.save(tmp_path / "old.npz")
    with pytest.raises(ValueError, match="retrain"):
        RejectionPredictor.load(tmp_path / "old.npz")


def shipped(name: str) -> Path:
    path = PREDICTOR_DIR / f"{name}.npz"
    assert path.exists(), f"{path} is missing: python tools/train_predictor.py --drafter {name}"
    return path


def test_shipped_weights_match_only_their_drafter(tmp_path):
    student = RejectionPredictor.load(shipped("student"))
    assert student.drafter == "student" and student.drafter_sha256 == file_sha256(resolve_drafter_path("student"))
    (tmp_path / "student.npz").write_bytes(shipped("student").read_bytes())
    assert load_predictor_for(FileDrafter(resolve_drafter_path("q4")), tmp_path) is None
    assert load_predictor_for(FileDrafter(resolve_drafter_path("student")), tmp_path).drafter == "student"


def test_the_predictor_policy_is_the_stop_rule_alone_on_sleds_footing():
    """`predictor` is the stop rule without the adaptive bound or its draft-on override, k_max 8 like
    `sled`, so the edge bench compares the two rules and nothing else; `wisp` wraps it in the bound."""
    from wisp_edge.controller.policy import Controller, make_policy

    drafter = FileDrafter(resolve_drafter_path("student"))
    alone = make_policy("predictor", drafter)
    assert isinstance(alone, PredictorPolicy) and alone.max_draft() == 8 and alone.min_worthwhile == 1.0
    assert make_policy("sled", drafter).max_draft() == 8
    wrapped = make_policy("wisp", drafter)
    assert isinstance(wrapped, Controller) and isinstance(wrapped.stop_rule, PredictorPolicy)


PROMPTS = ["Explain what a hash table is in two sentences.", "Write a haiku about the sea."]
MAX_NEW = 32


@pytest.mark.parametrize("make_policy", [
    lambda pair: PredictorPolicy(load_predictor_for(pair.drafter), k_max=8),
    lambda pair: ConfidencePolicy(0.5, k_max=8),
], ids=["predictor", "confidence"])
def test_stop_rules_are_lossless(student_pair, make_policy):
    """A stop rule may change how long blocks are, never which tokens come out."""
    shipped("student")
    policy = make_policy(student_pair)
    engine = student_pair.engine(policy)
    early = 0
    for text in PROMPTS:
        ids = student_pair.chat_prompt_ids(text)
        got = [t.id for t in engine.generate(ids, max_new_tokens=MAX_NEW)]
        assert got == generate(student_pair.model, ids, max_new_tokens=MAX_NEW, eos_ids=student_pair.eos_ids), text
        early += sum(1 for r in engine.stats.rounds[:-1] if r.drafted < policy.max_draft())
    assert early > 0, "the rule did stop some blocks before k_max"


def test_controller_imports_without_torch():
    """The predictor runs on the edge, which has no torch."""
    import subprocess
    import sys

    code = "import sys, wisp_edge.controller; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "False"


class WatchedDrafter:
    """A bigram drafter whose evaluations can be watched: `started(n)` waits for one of the first n tokens."""

    def __init__(self, vocab: int = 9, seed: int = 2) -> None:
        from tiny_models import TableDrafter

        self.inner, self.changed, self.evaluating = TableDrafter(vocab, seed), threading.Condition(), 0
        self.name, self.vocab_size = "watched", vocab

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def started(self, n: int) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.evaluating == n, timeout=0.05)

    def logits(self):
        with self.changed:
            self.evaluating = len(self.inner.tokens)
            self.changed.notify_all()
        time.sleep(0.005)  # a drafter's evaluation takes a while; the rule may run meanwhile
        return self.inner.logits()


class WatchingRule(ConfidencePolicy):
    """SLED's rule that also records whether the drafter was evaluating the next token as it decided."""

    def __init__(self, drafter: WatchedDrafter) -> None:
        super().__init__(threshold=0.4, k_max=6)
        self.drafter, self.overlapped = drafter, []

    def stop_after(self, index, logits, q):
        self.overlapped.append(self.drafter.started(len(self.drafter.tokens)))  # the token just drawn
        return super().stop_after(index, logits, q)


def test_overlap_runs_the_rule_during_the_next_evaluation_and_drafts_the_same():
    """With `overlap` the stop rule decides while the drafter evaluates the token just drawn; the tokens,
    their q and the stop decisions are those of the plain order, and a rollback waits for the evaluation."""
    from wisp_edge.drafting import Drafting
    from wisp_edge.wire.sampling import SamplingParams

    results = {}
    for mode in (False, True):
        drafter = WatchedDrafter()
        drafter.reset([1, 2])
        rule = WatchingRule(drafter)
        drafting = Drafting(drafter, rule, {8}, SamplingParams(temperature=0.9, seed=4), overlap=mode)
        out = []
        for step in range(12):
            token, q, _, stop = drafting.next(step % 4)
            out.append((token, q, stop))
            if stop and step % 2:
                drafting.rollback(len(drafter.tokens) - 1, 3)  # drop the last draft: waits for the evaluation
                assert drafter.tokens[-1] == 3
        drafting.close()
        results[mode] = out, rule.overlapped
    assert results[False][0] == results[True][0]
    assert all(results[True][1]) and not any(results[False][1])


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.8, seed=3)], ids=["greedy", "t0.8"])
def test_engine_with_overlap_keeps_the_answer_and_the_rounds(params):
    """The engine overlaps a stop rule with the drafter's next evaluation: the answer (greedy: the target's) and
    every round's draft length are those of the plain order."""
    from tiny_models import TorchDrafter, tiny_target
    from wisp_cloud.inprocess import InProcessVerifier
    from wisp_cloud.verifier import Verifier
    from wisp_edge.engine import SpeculativeEngine

    model = tiny_target(vocab=11, seed=6)

    def run(overlap: bool):
        eng = SpeculativeEngine(TorchDrafter(tiny_target(vocab=11, seed=7)), InProcessVerifier(Verifier(model)),
                                ConfidencePolicy(0.6, k_max=5), decode_while_prefilling=False, draft_ahead=False,
                                overlap_stop_rule=overlap)
        got = [t.id for t in eng.generate([4, 1, 2], max_new_tokens=24, params=params)]
        return got, [r.drafted for r in eng.stats.rounds]

    plain, overlapped = run(False), run(True)
    assert overlapped == plain
    assert min(plain[1]) < 5, "the rule did stop some blocks early"
    if params.greedy:
        assert plain[0] == generate(model, [4, 1, 2], max_new_tokens=24)
