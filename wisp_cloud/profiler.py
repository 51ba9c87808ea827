"""`wisp-cloud profile`: time batched verify forwards of the target and fit the verification time estimator.

Coefficients depend on the model, the device, the dtype and the kernels, so the server profiles once per
(model, device, dtype) and saves the fit next to the checkpoint. Each configuration is one ragged batch run
exactly as the server runs it: one `model(RaggedBatch, logit_rows=...)` over all requests, a prefill
computing only its last row's logits, a verify block all of its k+1 rows. Part of the configurations is
held out and the fit's R^2 / MAE / MAPE on them is stored with the profile (the paper's accuracy report).

    wisp-cloud profile --quick           # ~10 s on two CPU cores for the shipped 135M target
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Sequence, get_args

import numpy as np
import torch

from wisp_cloud.estimator import FEATURE_NAMES, FitReport, Sample, TimeEstimator, VerifyCost, make_metadata
from wisp_cloud.model.kv_cache import KVCache
from wisp_cloud.model.transformer import RaggedBatch, Transformer
from wisp_cloud.settings import Dtype, ProfileOptions

DTYPES = {name: getattr(torch, name) for name in get_args(Dtype)}


@dataclass(frozen=True)
class ProfileRequest:
    """One request of a profiled batch: a prefill reads one logit row, a verify block all of its rows."""

    new_tokens: int
    cached_tokens: int
    kind: Literal["prefill", "verify"]

    def __post_init__(self) -> None:
        if self.kind not in ("prefill", "verify") or self.new_tokens < 1 or self.cached_tokens < 0:
            raise ValueError(f"bad profile request {self}")

    @property
    def cost(self) -> VerifyCost:
        return VerifyCost(self.new_tokens, self.cached_tokens, self.logit_rows)

    @property
    def logit_rows(self) -> int:
        return self.new_tokens if self.kind == "verify" else 1


@dataclass
class ProfileResult:
    """A fitted profile with what it was fitted on and how well it predicts configurations it never saw."""

    estimator: TimeEstimator  # fitted on the training part; metadata holds both reports
    train: FitReport
    holdout: FitReport
    samples: list[Sample]  # every configuration, (costs, median ms)
    runs: list[list[float]]  # [config][pass] ms: every timed run, for looking at the noise
    elapsed_s: float


# --- the grid --------------------------------------------------------------------------------------

# Per grid: warm verify batch sizes and draws per size, the longest cached prefix, prompt lengths timed
# alone, groups of 2..group_size prompts up to group_max tokens, and mixed batches of one prompt in
# mixed_prompt plus 1..mixed_verifies warm blocks, and decode steps (one new token per session: centralized
# serving, and the floor every small verify batch sits on; without them the fit's intercept is extrapolated).
# Quick is sized for ~10 s on two CPU cores (135M target).
_GRID_SIZES = {
    True: dict(decode_batch_sizes=(1, 8), verify_batch_sizes=(1, 2, 4, 8, 16, 32), verify_draws=1, max_cached=512,
               prefills=(16, 64, 128, 256), groups=1, group_size=3, group_max=128,
               mixed=3, mixed_prompt=(16, 128), mixed_verifies=8),
    False: dict(decode_batch_sizes=(1, 1, 2, 4, 8, 16), verify_batch_sizes=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
                verify_draws=3, max_cached=1024,
                prefills=(16, 32, 64, 96, 128, 192, 256, 384, 512), groups=5, group_size=4, group_max=256,
                mixed=10, mixed_prompt=(16, 512), mixed_verifies=16),
}


def _log_uniform(rng: np.random.Generator, lo: int, hi: int) -> int:
    """Lengths spread evenly in log space: short and long contexts are both common."""
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def profile_grid(quick: bool, max_seq_len: int, seed: int = 0) -> list[list[ProfileRequest]]:
    """The batch configurations to time: decode steps, warm verify batches, cold prefills (alone and grouped),
    mixed batches.

    Warm verifies draw 2..9 new tokens (a k = 1..8 draft plus the last committed token) and a cached
    prefix of 16..max_cached tokens per request, mixed within a batch as live traffic is. Every request
    fits `max_seq_len` (the model refuses longer ones). Deterministic for a given seed.
    """
    sizes = _GRID_SIZES[bool(quick)]
    rng = np.random.default_rng(seed)
    max_cached = min(sizes["max_cached"], max_seq_len - 9)
    if max_cached < 16:
        raise ValueError(f"max_seq_len {max_seq_len} is too short to profile (need at least 25)")

    def verify() -> ProfileRequest:
        return ProfileRequest(int(rng.integers(2, 10)), _log_uniform(rng, 16, max_cached), "verify")

    def prefill(lo: int, hi: int) -> ProfileRequest:
        return ProfileRequest(min(_log_uniform(rng, lo, hi), max_seq_len), 0, "prefill")

    grid: list[list[ProfileRequest]] = []
    for size in sizes["verify_batch_sizes"]:
        grid += [[verify() for _ in range(size)] for _ in range(sizes["verify_draws"])]
    grid += [[ProfileRequest(min(n, max_seq_len), 0, "prefill")] for n in sizes["prefills"]]
    for _ in range(sizes["groups"]):
        grid.append([prefill(16, sizes["group_max"]) for _ in range(int(rng.integers(2, sizes["group_size"] + 1)))])
    for _ in range(sizes["mixed"]):
        verifies = int(rng.integers(1, sizes["mixed_verifies"] + 1))
        grid.append([prefill(*sizes["mixed_prompt"])] + [verify() for _ in range(verifies)])
    for size in sizes["decode_batch_sizes"]:
        grid.append([ProfileRequest(1, _log_uniform(rng, 16, max_cached), "verify") for _ in range(size)])
    return grid


# --- measuring -------------------------------------------------------------------------------------

def _prepare_caches(model: Transformer, requests: Sequence[ProfileRequest], caches: list[KVCache]) -> None:
    """Give each request a cache holding its cached prefix, reusing (and extending) `caches`.

    The cached keys/values are whatever the buffers hold (zeros or earlier tokens' keys): attention costs
    the same whatever the values, and prefilling every prefix with real tokens would cost more than the
    profile itself.
    """
    while len(caches) < len(requests):
        caches.append(model.new_cache(capacity=64))
    for req, cache in zip(requests, caches):
        cache.truncate(0)  # nothing worth copying when the buffer grows
        cache.reserve(req.cached_tokens + req.new_tokens)
        cache.truncate(req.cached_tokens)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_batch(model: Transformer, requests: Sequence[ProfileRequest], reps: int = 3, *,
                  warmup: bool = True, caches: list[KVCache] | None = None, seed: int = 0) -> float:
    """Median milliseconds of one ragged forward over `requests` (after one untimed warm-up run).

    Runs what the server runs per batch: build the RaggedBatch and the logit rows, one forward, logits
    back on the CPU. Nothing is committed, so every cache keeps its `cached_tokens` and each rep repeats
    the same work. `caches` (optional) is a pool reused across calls to avoid reallocating KV buffers.
    """
    assert requests and reps >= 1, "need at least one request and one rep"
    caches = [] if caches is None else caches
    _prepare_caches(model, requests, caches)
    used = caches[: len(requests)]
    generator = torch.Generator().manual_seed(seed)
    seq_lens = [r.new_tokens for r in requests]
    tokens = torch.randint(model.args.vocab_size, (sum(seq_lens),), generator=generator)  # [num_tokens]

    def forward() -> None:
        batch = RaggedBatch(tokens, seq_lens, used)
        rows: list[int] = []
        for i, req in enumerate(requests):  # the last row of a prefill, every row of a verify block
            rows.extend(range(batch.offsets[i + 1] - req.logit_rows, batch.offsets[i + 1]))
        model(batch, logit_rows=torch.tensor(rows, dtype=torch.long)).cpu()

    times = []
    with torch.inference_mode():
        if warmup:  # allocator, kernel selection, caches
            forward()
        for _ in range(reps):
            _sync(model.device)
            t0 = time.perf_counter()
            forward()
            _sync(model.device)
            times.append((time.perf_counter() - t0) * 1000.0)
    assert all(c.length == r.cached_tokens for c, r in zip(used, requests)), "measurement must not commit"
    return statistics.median(times)


def _progress(items: list, enabled: bool) -> Iterable:
    """A tqdm bar when asked for and installed (it is a dev dependency, not a cloud one)."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc="profile", unit="batch", file=sys.stderr)


def run_profile(model: Transformer, *, quick: bool, holdout_fraction: float = 0.25, seed: int = 0,
                progress: bool = True, passes: int | None = None, model_name: str | None = None,
                grid: list[list[ProfileRequest]] | None = None) -> ProfileResult:
    """Time every grid configuration, fit the estimator on part of them and report the held-out rest.

    The grid is timed in `passes` interleaved sweeps (one run per configuration per sweep) and each
    configuration keeps its median: on a shared machine a burst of foreign load lasts seconds and would
    spoil every rep of the configurations timed back to back during it, but only one sweep of each here.
    """
    device = model.device.type
    dtype = str(model.dtype).removeprefix("torch.")
    grid = profile_grid(quick, model.args.max_seq_len, seed) if grid is None else grid
    passes = passes if passes is not None else (3 if quick else 5)
    assert passes >= 1 and len(grid) >= 2, "need at least one pass and two configurations"
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"the profile reports held-out accuracy: holdout_fraction must be in (0, 1), "
                         f"got {holdout_fraction}")
    t0 = time.perf_counter()
    caches: list[KVCache] = []
    measure_batch(model, max(grid, key=len), reps=1, caches=caches, seed=seed)  # warm up the allocator and pool
    times: list[list[float]] = [[] for _ in grid]  # [config][pass]
    for sweep in _progress(range(passes * len(grid)), progress):
        i = sweep % len(grid)
        times[i].append(measure_batch(model, grid[i], reps=1, warmup=False, caches=caches, seed=seed + i))
    del caches
    elapsed = time.perf_counter() - t0
    samples: list[Sample] = [([r.cost for r in requests], statistics.median(ts)) for requests, ts in zip(grid, times)]
    # how far a single run strays from its configuration's median: the timing noise the fit has to live with
    spread = [abs(t - ms) / ms for ts, (_, ms) in zip(times, samples) for t in ts]
    estimator = TimeEstimator(metadata=make_metadata(
        model=model_name or model.args.model_type, device=device, dtype=dtype,
        torch_threads=torch.get_num_threads(), torch_version=torch.__version__, grid="quick" if quick else "full",
        configurations=len(samples), passes=passes, seed=seed, profile_seconds=round(elapsed, 2),
        run_noise_pct=round(float(np.median(spread)) * 100, 2)))
    holdout = estimator.fit_holdout(samples, holdout_fraction, seed)  # records "fit" and "holdout" in metadata
    train = FitReport(**estimator.metadata["fit"])
    return ProfileResult(estimator, train, holdout, samples, times, elapsed)


# --- saving and loading --------------------------------------------------------------------------------

def default_profile_path(model_dir: str | Path, device: str, dtype: str, threads: int | None = None) -> Path:
    """Where the server looks for a profile: next to the checkpoint, one file per (device, dtype).

    CPU times scale with the thread count, so a CPU profile also names its count (`threads`):
    `.wisp-profile-cpu-float32-t2.json`, the name the server's start-up looks for.
    """
    suffix = f"-t{threads}" if threads else ""
    return Path(model_dir) / f".wisp-profile-{device}-{dtype}{suffix}.json"


def save_profile(result: ProfileResult, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    result.estimator.save(path)
    return path


def load_profile(path: str | Path, *, device: str | None = None, dtype: str | None = None) -> TimeEstimator:
    """The saved estimator; with `device`/`dtype`, refuse a profile measured for another one."""
    est = TimeEstimator.load(path)
    for key, want in (("device", device), ("dtype", dtype)):
        got = est.metadata.get(key)
        if want is not None and got != want:
            raise ValueError(f"profile {path} was measured for {key}={got!r}, not {want!r}; "
                             "re-run `wisp-cloud profile`")
    return est


def holdout_report(estimator: TimeEstimator) -> FitReport | None:
    """The held-out accuracy stored with a profile (None for an estimator fitted without a hold-out)."""
    stored = estimator.metadata.get("holdout")
    return FitReport(**stored) if stored else None


# --- what `wisp-cloud profile` runs ----------------------------------------------------------------------

def profile_and_save(options: ProfileOptions) -> str:
    """Profile the checkpoint as `options` say, save the fit where the server looks for it; the report."""
    from wisp_cloud.model.loader import load_model

    if options.threads:
        torch.set_num_threads(options.threads)
    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device")
    dtype = options.dtype or ("bfloat16" if device == "cuda" else "float32")
    model = load_model(options.model, device=device, dtype=DTYPES[dtype])
    result = run_profile(model, quick=options.quick, holdout_fraction=options.holdout, seed=options.seed,
                         progress=options.progress, passes=options.passes,
                         model_name=Path(options.model).resolve().name)
    threads = torch.get_num_threads() if device == "cpu" else None
    path = save_profile(result, options.out or default_profile_path(options.model, device, dtype, threads))
    return format_result(result, path)


def format_result(result: ProfileResult, path: Path | None = None) -> str:
    meta = result.estimator.metadata
    lines = [f"profile of {meta['model']} on {meta['device']} / {meta['dtype']} "
             f"({meta['torch_threads']} threads, {meta['grid']} grid)"]
    lines += [f"  {name:>24} = {value:.6g}" for name, value in zip(FEATURE_NAMES, result.estimator.coefficients)]
    lines.append(f"  {'':>10} {'n':>5} {'R^2':>8} {'MAE ms':>9} {'MAPE %':>8}")
    for label, r in (("fit", result.train), ("held out", result.holdout)):
        lines.append(f"  {label:>10} {r.n:>5} {r.r2:>8.4f} {r.mae_ms:>9.3f} {r.mape_pct:>8.2f}")
    lines.append(f"  {len(result.samples)} configurations x {meta['passes']} passes in {result.elapsed_s:.1f} s "
                 f"(a single run strays {meta['run_noise_pct']:.1f}% from its median)")
    if path is not None:
        lines.append(f"  saved {path}")
    return "\n".join(lines)
