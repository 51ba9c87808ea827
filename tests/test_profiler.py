"""The profiler on a tiny random model: the grid, one measurement, a whole profile and its file (seconds)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tests.tiny_models import tiny_target
from wisp_cloud.cli import main
from wisp_cloud.estimator import VerifyCost
from wisp_cloud.profiler import (
    ProfileRequest,
    default_profile_path,
    holdout_report,
    load_profile,
    measure_batch,
    profile_grid,
    run_profile,
    save_profile,
)


def kinds(batch: list[ProfileRequest]) -> set[str]:
    return {r.kind for r in batch}


@pytest.mark.parametrize("quick", [True, False])
def test_grid_is_deterministic_and_covers_the_server_mix(quick):
    grid = profile_grid(quick, max_seq_len=8192)
    assert grid == profile_grid(quick, max_seq_len=8192)
    assert grid != profile_grid(quick, max_seq_len=8192, seed=1)
    warm = [b for b in grid if kinds(b) == {"verify"}]
    cold = [b for b in grid if kinds(b) == {"prefill"}]
    mixed = [b for b in grid if kinds(b) == {"prefill", "verify"}]
    assert len(warm) + len(cold) + len(mixed) == len(grid) and warm and cold and mixed
    assert {len(b) for b in warm} >= {1, 32}
    assert any(len(b) > 1 for b in cold)  # prompts arriving together
    assert all(sum(r.kind == "prefill" for r in b) == 1 for b in mixed)
    blocks = [r for b in warm for r in b]
    assert {r.new_tokens for r in blocks} == set(range(1, 10))  # decode steps; k = 1..8 drafts plus the last token
    assert any(len(b) > 1 and all(r.new_tokens == 1 for r in b) for b in warm)  # decode steps batched
    assert min(r.cached_tokens for r in blocks) < 64 and max(r.cached_tokens for r in blocks) > 400
    assert any(len({r.cached_tokens for r in b}) > 1 for b in warm)  # cache lengths mixed within a batch
    assert all(r.cached_tokens == 0 for b in cold for r in b)
    assert max(r.new_tokens for b in cold for r in b) >= 256


def test_full_grid_is_bigger_and_reaches_long_contexts():
    quick, full = profile_grid(True, 8192), profile_grid(False, 8192)
    assert len(full) > 2 * len(quick)
    assert max(r.cached_tokens for b in full for r in b) > 700
    assert max(r.new_tokens for b in full for r in b) == 512


def test_grid_respects_max_seq_len():
    for quick in (True, False):
        grid = profile_grid(quick, max_seq_len=64)
        assert all(r.new_tokens + r.cached_tokens <= 64 for b in grid for r in b)
    with pytest.raises(ValueError):
        profile_grid(True, max_seq_len=20)


def test_request_rows_and_validation():
    assert ProfileRequest(7, 0, "prefill").logit_rows == 1
    assert ProfileRequest(7, 30, "verify").logit_rows == 7
    assert ProfileRequest(7, 30, "verify").cost == VerifyCost(7, 30)
    with pytest.raises(ValueError):
        ProfileRequest(3, 0, "decode")
    with pytest.raises(ValueError):
        ProfileRequest(0, 5, "verify")


def test_measure_batch_times_without_committing():
    model = tiny_target(vocab=11)
    requests = [ProfileRequest(40, 0, "prefill"), ProfileRequest(5, 100, "verify"), ProfileRequest(3, 17, "verify")]
    caches: list = []
    ms = measure_batch(model, requests, reps=2, caches=caches)
    assert ms > 0 and math.isfinite(ms)
    assert [c.length for c in caches] == [0, 100, 17]
    assert all(c.capacity >= r.new_tokens + r.cached_tokens for c, r in zip(caches, requests))
    # the pool is reused: a smaller batch takes the first caches and resets their lengths
    measure_batch(model, requests[1:], reps=1, caches=caches)
    assert len(caches) == 3 and [c.length for c in caches[:2]] == [100, 17]


def test_more_work_takes_longer():
    model = tiny_target(vocab=11)
    small = measure_batch(model, [ProfileRequest(2, 16, "verify")], reps=5)
    large = measure_batch(model, [ProfileRequest(200, 0, "prefill")] * 4, reps=5)
    assert large > small


@pytest.fixture(scope="module")
def tiny_profile():
    torch.set_num_threads(1)
    model = tiny_target(vocab=11)
    return run_profile(model, quick=True, holdout_fraction=0.25, progress=False, passes=2, model_name="tiny")


def test_run_profile_fits_and_reports(tiny_profile):
    result = tiny_profile
    est = result.estimator
    assert len(result.samples) == len(profile_grid(True, 256))
    assert all(ms > 0 for _, ms in result.samples)
    # two interleaved passes per configuration; the sample keeps their median
    for runs, (_, ms) in zip(result.runs, result.samples):
        assert len(runs) == 2 and ms == pytest.approx(sum(runs) / 2)
    assert all(c >= 0 and math.isfinite(c) for c in est.coefficients)
    assert est.c0 > 0  # a forward of a 2-layer model still costs something
    assert result.holdout.n == round(0.25 * len(result.samples))
    assert result.train.n + result.holdout.n == len(result.samples)
    for report in (result.train, result.holdout):
        assert all(math.isfinite(x) for x in (report.r2, report.mae_ms, report.mape_pct))
        assert report.mae_ms >= 0 and report.mape_pct >= 0
    assert result.elapsed_s > 0
    meta = est.metadata
    assert (meta["model"], meta["device"], meta["dtype"], meta["grid"]) == ("tiny", "cpu", "float32", "quick")
    assert meta["configurations"] == len(result.samples) and meta["torch_threads"] == 1 and meta["passes"] == 2
    assert meta["run_noise_pct"] >= 0
    assert holdout_report(est) == result.holdout


def test_save_load_round_trip(tiny_profile, tmp_path):
    path = save_profile(tiny_profile, default_profile_path(tmp_path / "model", "cpu", "float32"))
    assert path == tmp_path / "model" / ".wisp-profile-cpu-float32.json"
    assert default_profile_path("m", "cpu", "float32", threads=2) == Path("m/.wisp-profile-cpu-float32-t2.json")
    assert default_profile_path("m", "cuda", "bfloat16").name == ".wisp-profile-cuda-bfloat16.json"
    loaded = load_profile(path, device="cpu", dtype="float32")
    assert loaded.coefficients == tiny_profile.estimator.coefficients
    for batch, _ in tiny_profile.samples:
        assert loaded.predict(batch) == tiny_profile.estimator.predict(batch)
    assert holdout_report(loaded) == tiny_profile.holdout
    assert loaded.metadata == tiny_profile.estimator.metadata
    assert len(loaded.profile) == tiny_profile.train.n  # the online refit keeps the fitted samples as anchors
    with pytest.raises(ValueError, match="dtype"):
        load_profile(path, dtype="bfloat16")


def test_run_profile_needs_a_holdout():
    with pytest.raises(ValueError, match="holdout"):
        run_profile(tiny_target(), quick=True, holdout_fraction=0.0, progress=False, passes=1)


def test_cli_writes_the_default_profile(tmp_path, monkeypatch, capsys):
    from safetensors.torch import save_file

    model = tiny_target(vocab=11)
    model_dir = tmp_path / "tiny"
    model_dir.mkdir()
    a = model.args
    (model_dir / "config.json").write_text(
        '{"model_type": "llama", "vocab_size": %d, "hidden_size": %d, "intermediate_size": %d, '
        '"num_hidden_layers": %d, "num_attention_heads": %d, "num_key_value_heads": %d, '
        '"max_position_embeddings": %d, "rms_norm_eps": 1e-5, "tie_word_embeddings": false}'
        % (a.vocab_size, a.dim, a.ffn_dim, a.n_layers, a.n_heads, a.n_kv_heads, a.max_seq_len))
    save_file({f"model.{k}" if k != "lm_head.weight" else k: v.contiguous() for k, v in model.state_dict().items()},
              str(model_dir / "model.safetensors"))
    assert main(["profile", "--model", str(model_dir), "--device", "cpu", "--quick", "--passes", "1",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "held out" in out and "per_cached_token_ms" in out
    # a CPU profile names its thread count (the test runs one thread), as the server's start-up expects
    assert holdout_report(load_profile(model_dir / ".wisp-profile-cpu-float32-t1.json")) is not None
