"""Benchmark of the cloud verifier on this machine, every number measured side by side in one run.

    python tools/bench_server.py [--quick] [--threads 2] [--device cpu|cuda] [--json-out bench_server.json]

Sections (run in this order; `--skip` takes a comma-separated list of their names):
  verify     one ragged forward over S sessions vs one forward per session, S = 1, 4, 8, 16, 32, blocks of
             4 and 8 new tokens (the last committed token + 3 or 7 drafts), each session continuing its own
             KV cache of 100-400 prefilled tokens, logits for every block row, as `Verifier.run` computes them;
             beside it the same forward with per-session attention calls (the reference), the attention
             calls per layer, and the roofline bound from this machine's GEMM throughput and bandwidth
  kv         prefill of a 300-token prompt, first vs second session (prefix cache); KV bytes per token
  profile    the estimator profile (`wisp-cloud profile`): held-out R^2 / MAE / MAPE; saved to a temporary
             file that the next two sections use (or `--profile PATH` loads a saved one instead)
  scheduler  `form_batch` decision time with ~1,000 queued jobs, WISP and FCFS, p50/p99
  http       a real `wisp-cloud serve` on loopback, verify rounds of one session through raw httpx and the
             edge's `HttpVerifier`; overhead = client round trip - (queue_ms + verify_ms) the server reports
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from wisp_cloud.estimator import FEATURE_NAMES, Margin, TimeEstimator  # noqa: E402
from wisp_cloud.model.kv_cache import KVCache  # noqa: E402
from wisp_cloud.model.loader import load_model  # noqa: E402
from wisp_cloud.model.paged_attention import paged_attention, reference_attention  # noqa: E402
from wisp_cloud.model.transformer import RaggedBatch, Transformer, commit  # noqa: E402
from tools.bench_kv import (attention_calls_per_layer, forward_cost, gemm_gflops, kernel_comparison,  # noqa: E402
                            kv_bytes_section, prefix_section, read_bandwidth_gb_s, roofline_ms)
from wisp_cloud.profiler import DTYPES, holdout_report, load_profile, run_profile, save_profile  # noqa: E402
from wisp_cloud.scheduler import Batch, FcfsScheduler, VerifyJob  # noqa: E402
from wisp_cloud.wisp_scheduler import WispScheduler  # noqa: E402
from wisp_cloud.settings import DEFAULT_TARGET  # noqa: E402

SECTIONS = ("verify", "kv", "profile", "scheduler", "http")
SESSIONS = (1, 4, 8, 16, 32)
BLOCKS = (4, 8)  # new tokens per session: the last committed token + k - 1 drafts
PREFIX = (100, 400)  # cached tokens per session, drawn per session
KV_BLOCK_TOKENS = 16  # the server's default KV block
SCHED_MEMORY_BYTES = 256 << 20  # free KV memory offered to each decision
SCHED_MAX_TOKENS = 2048  # the server's default --max-batch-tokens


def say(message: str) -> None:
    """Progress, on stderr so that stdout holds only the tables."""
    print(message, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def cpu_ticks() -> tuple[int, int] | None:
    """(steal, total) CPU ticks so far from /proc/stat (Linux), None elsewhere: a VM's noisy neighbours show as steal."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


# --- verify: batched vs sequential -------------------------------------------------------------------

def prefilled_caches(model: Transformer, lengths: list[int], seed: int) -> list[KVCache]:
    """One cache per session holding a real prefix of random tokens (the caches a warm server holds)."""
    generator = torch.Generator().manual_seed(seed)
    say(f"  prefilling {len(lengths)} sessions ({sum(lengths)} tokens)")
    caches = []
    for length in lengths:
        cache = model.new_cache(capacity=length + max(BLOCKS))  # room for every block: no growth while timed
        tokens = torch.randint(model.args.vocab_size, (length,), generator=generator)
        batch = RaggedBatch(tokens, [length], [cache])
        model(batch, logit_rows=torch.tensor([length - 1]))
        commit(batch, [length])
        caches.append(cache)
    return caches


def time_verify(model: Transformer, caches: list[KVCache], k: int, reps: int,
                seed: int) -> tuple[float, float, float]:
    """Median ms of one ragged forward over every session's block (one attention call per layer), of the
    same forward with the per-session attention reference, and of one forward per session.

    Batched and sequential reps alternate so a burst of foreign load spoils both alike. Nothing is
    committed: each cache keeps its length and every rep repeats the same work.
    """
    n = len(caches)
    tokens = torch.randint(model.args.vocab_size, (n * k,), generator=torch.Generator().manual_seed(seed))  # [n*k]
    rows = torch.arange(n * k)  # every row of every block, as a verify round reads them
    lengths = [c.length for c in caches]

    def batched() -> None:
        model(RaggedBatch(tokens, [k] * n, caches), logit_rows=rows).cpu()

    def sequential() -> None:
        for i, cache in enumerate(caches):
            model(RaggedBatch(tokens[i * k: (i + 1) * k], [k], [cache]), logit_rows=rows[:k]).cpu()

    def reference() -> None:
        model.attend = reference_attention
        try:
            batched()
        finally:
            model.attend = paged_attention

    def timed(fn) -> float:
        sync(model.device)
        t0 = time.perf_counter()
        fn()
        sync(model.device)
        return (time.perf_counter() - t0) * 1000.0

    batched(), sequential(), reference()  # warm-up
    times_b, times_s, times_r = [], [], []
    for _ in range(reps):
        times_b.append(timed(batched))
        times_s.append(timed(sequential))
        times_r.append(timed(reference))
    assert [c.length for c in caches] == lengths, "timing must not commit"
    return statistics.median(times_b), statistics.median(times_r), statistics.median(times_s)


def lengths_of(seed: int) -> list[int]:
    """Each session's cached tokens, drawn from PREFIX."""
    rng = np.random.default_rng(seed)
    return [int(x) for x in rng.integers(PREFIX[0], PREFIX[1] + 1, max(SESSIONS))]


def verify_section(model: Transformer, reps: int, seed: int) -> tuple[list[dict], list[dict]]:
    lengths = lengths_of(seed)
    caches = prefilled_caches(model, lengths, seed)
    say("  measuring this machine's memory read bandwidth")
    bandwidth = read_bandwidth_gb_s()
    rows = []
    for k in BLOCKS:
        for n in SESSIONS:
            say(f"  timing {n} sessions x {k} tokens ({reps} reps)")
            gflops = gemm_gflops(model, n * k)  # measured between the timings it is compared with
            b, r, s = time_verify(model, caches[:n], k, reps, seed)
            flops, weight_bytes = forward_cost(model, [k] * n, lengths[:n], n * k)
            bound = roofline_ms(flops, weight_bytes, gflops, bandwidth)
            rows.append({"sessions": n, "block_tokens": k, "cached_tokens": sum(lengths[:n]),
                         "batched_ms": round(b, 2), "reference_ms": round(r, 2), "sequential_ms": round(s, 2),
                         "speedup": round(s / b, 2), "reference_speedup": round(s / r, 2),
                         "attention_calls_per_layer": attention_calls_per_layer(model, caches[:n], k),
                         "gflop": round(flops / 1e9, 2), "gemm_gflops": round(gflops, 1),
                         "bandwidth_gb_s": round(bandwidth, 1), "roofline_ms": round(bound, 2),
                         "roofline_fraction": round(bound / b, 3),
                         "batched_tokens_per_s": round(n * k / b * 1000, 1),
                         "sequential_tokens_per_s": round(n * k / s * 1000, 1)})
    return rows, [kernel_comparison(model, caches[:n], k, reps, seed) for n, k in ((16, 8), (32, 4), (16, 1))]


def print_verify(rows: list[dict], kernels: list[dict]) -> None:
    print(f"\nBatched vs sequential verification: blocks of k new tokens (last committed token + k-1 drafts), "
          f"logits for all rows,\neach session on its own KV cache of {PREFIX[0]}-{PREFIX[1]} tokens; median ms")
    print(f"  {'sessions':>8} {'k':>3} {'cached':>7} {'batched':>9} {'per-session attn':>17} {'sequential':>11} "
          f"{'speed-up':>9} {'attn calls/layer':>17} {'GFLOP':>6} {'GEMM GFLOP/s':>13} {'roofline':>9} {'fraction':>9}")
    for r in rows:
        print(f"  {r['sessions']:>8} {r['block_tokens']:>3} {r['cached_tokens']:>7} {r['batched_ms']:>9.1f} "
              f"{r['reference_ms']:>17.1f} {r['sequential_ms']:>11.1f} {r['speedup']:>8.2f}x "
              f"{r['attention_calls_per_layer']:>17g} {r['gflop']:>6.1f} {r['gemm_gflops']:>13.0f} "
              f"{r['roofline_ms']:>9.1f} {r['roofline_fraction']:>9.2f}")
    print(f"  memory read bandwidth {rows[0]['bandwidth_gb_s']:.1f} GB/s; roofline = max(weight bytes / bandwidth, "
          "FLOPs / GEMM throughput at the batch's rows); fraction = roofline / batched")
    print("  attention kernels, one batched forward, median ms: " + "; ".join(
        f"{r['sessions']} x {r['block_tokens']}: " + ", ".join(f"{key[:-3]} {value:.1f}" for key, value in r.items()
                                                          if key.endswith("_ms")) for r in kernels))
    print("  (for comparison, transformers: 177 ms batched vs 946 ms sequential at 8 x 4; the bar is >= 4x at 16 x 8)")


def print_kv(report: dict) -> None:
    p, b = report["prefix"], report["bytes"]
    print(f"\nPrefix cache: prefill of a {p['prompt_tokens']}-token prompt, first session {p['first_ms']:.1f} ms, "
          f"a second with the same prompt {p['second_ms']:.1f} ms ({p['hit_tokens']} tokens from cached blocks): "
          f"{p['speedup']:.1f}x faster (median of {p['reps']})")
    print(f"KV bytes per token: theoretical {b['theoretical_bytes_per_token']}, "
          f"pool {b['pool_bytes_per_slot']:.0f} per slot ({b['slot_over_theoretical_pct']:+.2f}%), "
          f"{b['held_bytes_per_cached_token']:.0f} held per cached token in blocks of {b['block_tokens']} "
          f"({b['held_over_theoretical_pct']:+.2f}%)")


# --- profile: estimator accuracy ---------------------------------------------------------------------

def profile_section(model: Transformer, args, path: Path) -> tuple[TimeEstimator, dict]:
    """Measure a profile (or load `--profile`) and report its held-out accuracy; the profile lands at `path`."""
    if args.profile:
        dtype = str(model.dtype).removeprefix("torch.")
        estimator = load_profile(args.profile, device=model.device.type, dtype=dtype)
        holdout, meta = holdout_report(estimator), estimator.metadata
        report = {"source": f"loaded {args.profile}", "configurations": meta.get("configurations"),
                  "grid": meta.get("grid"), "holdout": asdict(holdout) if holdout else None,
                  "train": meta.get("fit"), "seconds": meta.get("profile_seconds")}
        estimator.save(path)
    else:
        say(f"  profiling the {'quick' if args.quick else 'full'} grid")
        result = run_profile(model, quick=args.quick, progress=True, model_name=Path(args.model).resolve().name)
        save_profile(result, path)
        estimator, meta = result.estimator, result.estimator.metadata
        report = {"source": "measured now", "configurations": len(result.samples), "grid": meta["grid"],
                  "passes": meta["passes"], "holdout": asdict(result.holdout), "train": asdict(result.train),
                  "holdout_splits": holdout_splits(result.samples),
                  "seconds": round(result.elapsed_s, 1), "run_noise_pct": meta["run_noise_pct"]}
    report["coefficients"] = dict(zip(FEATURE_NAMES, estimator.coefficients))
    return estimator, report


def holdout_splits(samples, splits: int = 20, fraction: float = 0.25) -> dict:
    """Held-out MAPE over `splits` random splits of the same profile: one split of 60 configurations holds
    out 15, and which 15 moves the figure by a few points."""
    mapes = [TimeEstimator().fit_holdout(samples, fraction, seed).mape_pct for seed in range(splits)]
    return {"splits": splits, "fraction": fraction, "median_mape_pct": round(statistics.median(mapes), 2),
            "mean_mape_pct": round(statistics.fmean(mapes), 2), "max_mape_pct": round(max(mapes), 2)}


def print_profile(report: dict) -> None:
    print(f"\nEstimator accuracy ({report['source']}, {report['grid']} grid, {report['configurations']} configurations"
          + (f" x {report['passes']} passes in {report['seconds']} s" if "passes" in report else "") + ")")
    print("  " + ", ".join(f"{name} = {value:.4g}" for name, value in report["coefficients"].items()))
    print(f"  {'':>9} {'n':>4} {'R^2':>8} {'MAE ms':>8} {'MAPE %':>7}")
    for label in ("train", "holdout"):
        r = report.get(label)
        if r:
            print(f"  {label:>9} {r['n']:>4} {r['r2']:>8.4f} {r['mae_ms']:>8.2f} {r['mape_pct']:>7.2f}")
    if "holdout_splits" in report:
        h = report["holdout_splits"]
        print(f"  held-out MAPE over {h['splits']} random splits: median {h['median_mape_pct']:.2f}%, "
              f"mean {h['mean_mape_pct']:.2f}%, worst {h['max_mape_pct']:.2f}%")
    if "run_noise_pct" in report:
        print(f"  a single timed run strays {report['run_noise_pct']:.1f}% from its configuration's median")
    print("  (paper: R^2 0.992, MAPE 4.93%; aim R^2 >= 0.99, MAPE <= 5%)")


# --- scheduler: decision time ------------------------------------------------------------------------

class JobMaker:
    """Queued requests as a busy server sees them: mostly warm verify rounds under SLOs, some prompts, some best effort."""

    def __init__(self, kv_bytes_per_token: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.block_bytes = KV_BLOCK_TOKENS * kv_bytes_per_token
        self.next_id = 0

    def __call__(self, now: float) -> VerifyJob:
        rng = self.rng
        rate = rng.choice((5.0, 10.0, 20.0, 30.0)) if rng.random() < 0.8 else None  # tokens/s; None: best effort
        if rng.random() < 0.1:  # a new session's prompt, due one token-time after it arrives
            new, cached, k, alpha, committed, t0 = rng.randint(16, 512), 0, 0, 0.0, 0, now
            blocks = -(-new // KV_BLOCK_TOKENS)
        else:  # a warm round: [last committed token, *k drafts]; between 0.5 s behind and 1 s ahead of its SLO
            k = rng.randint(1, 8)
            new, cached, alpha, t0 = k + 1, rng.randint(100, 2000), rng.uniform(0.3, 0.9), now - rng.uniform(1, 60)
            committed = max(0, int((rate or 10.0) * (now - t0 + rng.uniform(-0.5, 1.0))))
            blocks = int(cached % KV_BLOCK_TOKENS + new > KV_BLOCK_TOKENS)  # a new KV block only when crossing one
        self.next_id += 1
        return VerifyJob(self.next_id, f"s{self.next_id}", new, cached, k, now, rate, committed, t0, alpha,
                         downlink_s=0.02, kv_bytes=blocks * self.block_bytes)


def time_decisions(scheduler, make: JobMaker, queued: int, decisions: int) -> dict:
    """p50/p99 of form_batch with `queued` jobs waiting; each batch taken is replaced by as many new jobs."""
    now = 1000.0
    for _ in range(queued):
        scheduler.submit(make(now))
    times, sizes = [], []
    for i in range(decisions + decisions // 10):  # the first tenth warms up and is not counted
        t0 = time.perf_counter()
        batch: Batch = scheduler.form_batch(now, SCHED_MEMORY_BYTES, SCHED_MAX_TOKENS)
        elapsed = (time.perf_counter() - t0) * 1000.0
        if i >= decisions // 10:
            times.append(elapsed)
            sizes.append(len(batch))
        # the clock moves to the batch's predicted end (or past an FCFS wait), as a busy server's would
        now = batch.predicted_finish if batch.jobs and batch.predicted_ms else now + max(batch.wait_s, 0.001)
        for _ in range(len(batch)):
            scheduler.submit(make(now))
    stats = scheduler.stats(now)
    return {"p50_ms": round(pct(times, 50), 4), "p99_ms": round(pct(times, 99), 4), "max_ms": round(max(times), 4),
            "mean_batch_jobs": round(statistics.mean(sizes), 1), "queued": stats.depth,
            "best_effort_queued": stats.best_effort, "demoted": stats.demoted_total}


def scheduler_section(estimator: TimeEstimator, kv_bytes_per_token: int, decisions: int, seed: int) -> dict:
    report = {}
    estimator = TimeEstimator(estimator.coefficients, margin=Margin(scale=1.1))  # the server's default margin
    policies = {"wisp": lambda: WispScheduler(estimator),
                "fcfs": lambda: FcfsScheduler(max_batch_jobs=16, max_wait_s=0.010, estimator=estimator)}
    for name, build in policies.items():
        say(f"  {name}: {decisions} decisions with 1,000 queued")
        report[name] = time_decisions(build(), JobMaker(kv_bytes_per_token, seed), 1000, decisions)
    return report


def print_scheduler(report: dict) -> None:
    print(f"\nScheduler decision time (form_batch with ~1,000 queued; new jobs: 72% warm SLO rounds, 8% SLO prompts, "
          f"20% best effort;\n{SCHED_MAX_TOKENS} tokens and {SCHED_MEMORY_BYTES >> 20} MiB of KV per batch; the clock "
          f"moves on by each batch's predicted time, the estimator's margin is 1.1)")
    print(f"  {'policy':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'jobs/batch':>11} {'best effort at end':>19}")
    for name, r in report.items():
        print(f"  {name:>6} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} {r['max_ms']:>8.3f} {r['mean_batch_jobs']:>11.1f} "
              f"{r['best_effort_queued']:>19}")
    print("  (aim: under 1 ms; best effort counts demoted SLO jobs)")


# --- http: loopback overhead -------------------------------------------------------------------------

def drive_httpx(url: str, prompt: list[int], drafts: list[int], rounds: int,
                warmup: int) -> list[tuple[float, float, float]]:
    """(round trip, server queue, server verify) ms per verify round of one greedy session, over raw httpx."""
    import httpx

    samples = []
    with httpx.Client(base_url=url, timeout=60.0) as client:
        opened = client.post("/v1/sessions", json={"prompt_ids": prompt})
        opened.raise_for_status()
        session, position = opened.json()["session_id"], opened.json()["position"]
        for round_id in range(warmup + rounds):
            body = {"position": position, "round_id": round_id, "draft_ids": drafts}
            t0 = time.perf_counter()
            reply = client.post(f"/v1/sessions/{session}/verify", json=body)
            rtt = (time.perf_counter() - t0) * 1000.0
            reply.raise_for_status()
            r = reply.json()
            position = r["position"]
            if round_id >= warmup:
                samples.append((rtt, r["queue_ms"], r["verify_ms"]))
        client.delete(f"/v1/sessions/{session}")
    return samples


def drive_edge_client(url: str, prompt: list[int], drafts: list[int], rounds: int,
                      warmup: int) -> list[tuple[float, float, float]]:
    """The same rounds through the edge's HttpVerifier (what a device runs)."""
    from wisp_edge.client import HttpVerifier
    from wisp_edge.wire.protocol import SessionStart, VerifyBlock, VerifyRequest

    samples = []
    with HttpVerifier(url) as verifier:
        started = verifier.start_session(SessionStart(prompt))
        position = len(prompt) + 1  # the prompt and the target's first token
        for round_id in range(warmup + rounds):
            block = VerifyBlock(position, drafts, round_id=round_id)
            t0 = time.perf_counter()
            result = verifier.verify(VerifyRequest(started.session_id, block))
            rtt = (time.perf_counter() - t0) * 1000.0
            position += result.accepted + 1
            if round_id >= warmup:
                samples.append((rtt, result.queue_ms, result.verify_ms))
        verifier.close_session(started.session_id)
    return samples


def summarize_rounds(samples: list[tuple[float, float, float]]) -> dict:
    rtt, queue, verify = ([s[i] for s in samples] for i in range(3))
    overhead = [a - b - c for a, b, c in samples]
    return {"rounds": len(samples), "rtt_p50_ms": round(pct(rtt, 50), 2), "rtt_p99_ms": round(pct(rtt, 99), 2),
            "queue_p50_ms": round(pct(queue, 50), 2), "verify_p50_ms": round(pct(verify, 50), 2),
            "overhead_p50_ms": round(pct(overhead, 50), 2), "overhead_p99_ms": round(pct(overhead, 99), 2)}


def http_section(args, model: Transformer, profile_path: Path, seed: int) -> dict:
    from tests.live_server import LiveServer

    rng = random.Random(seed)
    vocab = model.args.vocab_size
    prompt = [rng.randrange(vocab) for _ in range(args.http_prompt)]
    drafts = [rng.randrange(vocab) for _ in range(args.http_draft)]  # any valid ids: a rejection costs the same
    dtype = str(model.dtype).removeprefix("torch.")
    warmup = 10
    with tempfile.TemporaryDirectory() as tmp:
        server = LiveServer("--model", str(args.model), "--device", model.device.type, "--dtype", dtype,
                            "--threads", str(args.threads), "--profile", str(profile_path), "--log-level", "warning",
                            log_path=Path(tmp) / "server.log")
        say(f"  starting the server on {server.url}")
        with server:
            say(f"  {args.rounds} rounds over httpx")
            raw = summarize_rounds(drive_httpx(server.url, prompt, drafts, args.rounds, warmup))
            say(f"  {args.rounds} rounds over HttpVerifier")
            edge = summarize_rounds(drive_edge_client(server.url, prompt, drafts, args.rounds, warmup))
    return {"prompt_tokens": len(prompt), "draft_tokens": len(drafts), "server_threads": args.threads,
            "httpx": raw, "HttpVerifier": edge}


def print_http(report: dict) -> None:
    print(f"\nLoopback HTTP per verify round (one greedy session, {report['prompt_tokens']}-token prompt, "
          f"{report['draft_tokens']} drafts, server on {report['server_threads']} threads);\n"
          f"overhead = client round trip - (queue_ms + verify_ms) reported by the server")
    print(f"  {'client':>12} {'rounds':>6} {'RTT p50':>8} {'RTT p99':>8} {'queue p50':>10} {'verify p50':>11} "
          f"{'overhead p50':>13} {'overhead p99':>13}")
    for name in ("httpx", "HttpVerifier"):
        r = report[name]
        print(f"  {name:>12} {r['rounds']:>6} {r['rtt_p50_ms']:>8.2f} {r['rtt_p99_ms']:>8.2f} {r['queue_p50_ms']:>10.2f} "
              f"{r['verify_p50_ms']:>11.2f} {r['overhead_p50_ms']:>13.2f} {r['overhead_p99_ms']:>13.2f}")


# --- main --------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_TARGET, help="target checkpoint directory")
    p.add_argument("--threads", type=int, default=2, help="torch threads, here and in the server")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--quick", action="store_true", help="the profiler's quick grid")
    p.add_argument("--profile", type=Path, help="use this saved profile instead of measuring one")
    p.add_argument("--skip", default="", help=f"comma-separated sections to skip: {','.join(SECTIONS)}")
    p.add_argument("--reps", type=int, default=5, help="timed reps per verify configuration (median)")
    p.add_argument("--decisions", type=int, default=1000, help="timed form_batch calls per policy")
    p.add_argument("--rounds", type=int, default=200, help="timed verify rounds per HTTP client")
    p.add_argument("--http-prompt", type=int, default=128, help="prompt tokens of the HTTP session")
    p.add_argument("--http-draft", type=int, default=4, help="draft tokens per HTTP verify round")
    p.add_argument("--prefix-prompt", type=int, default=300, help="prompt tokens of the prefix-cache prefill test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.skip - set(SECTIONS):
        p.error(f"--skip: unknown sections {sorted(args.skip - set(SECTIONS))}; choose from {', '.join(SECTIONS)}")
    needs_profile = {"scheduler", "http"} - args.skip
    if "profile" in args.skip and needs_profile and not args.profile:
        p.error(f"{' and '.join(sorted(needs_profile))} need an estimator: pass --profile PATH or do not skip profile")
    if args.device == "cuda" and not cuda:
        p.error("--device cuda but torch sees no CUDA device")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started, ticks = time.perf_counter(), cpu_ticks()
    model = load_model(args.model, device=args.device, dtype=DTYPES[args.dtype])
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {os.cpu_count()} cores"
    report: dict = {"machine": {"device": device, "dtype": args.dtype, "torch": torch.__version__,
                                "torch_threads": torch.get_num_threads(), "model": Path(args.model).resolve().name,
                                "load_avg_1min": round(os.getloadavg()[0], 2)}}
    m = report["machine"]
    print(f"{m['model']} on {m['device']} / {m['dtype']}, torch {m['torch']}, {m['torch_threads']} threads, "
          f"1-min load average {m['load_avg_1min']} at start")

    seconds = report["seconds"] = {}

    def section(name: str, title: str) -> bool:
        """Announce a section and start its clock; False when it is skipped."""
        if name in args.skip:
            return False
        say(f"[{name}] {title}")
        seconds[name] = time.perf_counter()
        return True

    def done(name: str) -> None:
        seconds[name] = round(time.perf_counter() - seconds[name], 1)

    if section("verify", "batched vs sequential"):
        report["verify"], report["attention_kernels"] = verify_section(model, args.reps, args.seed)
        done("verify")
        print_verify(report["verify"], report["attention_kernels"])
    if section("kv", "paged KV: prefix-cache prefill, bytes per token"):
        report["kv"] = {"prefix": prefix_section(model, args.prefix_prompt, max(3, args.reps), args.seed),
                        "bytes": kv_bytes_section(model, lengths_of(args.seed), args.seed)}
        done("kv")
        print_kv(report["kv"])
    with tempfile.TemporaryDirectory() as tmp:
        profile_path = Path(tmp) / "profile.json"
        estimator = None
        if section("profile", "estimator accuracy"):
            estimator, report["profile"] = profile_section(model, args, profile_path)
            done("profile")
            print_profile(report["profile"])
        elif args.profile:
            estimator = load_profile(args.profile, device=args.device, dtype=args.dtype)
            estimator.save(profile_path)
        if section("scheduler", "decision time"):
            report["scheduler"] = scheduler_section(estimator, model.kv_bytes_per_token, args.decisions, args.seed)
            done("scheduler")
            print_scheduler(report["scheduler"])
        if section("http", "loopback overhead"):
            report["http"] = http_section(args, model, profile_path, args.seed)
            done("http")
            print_http(report["http"])
    report["wall_s"] = round(time.perf_counter() - started, 1)
    m["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    ticks_end = cpu_ticks()
    if ticks and ticks_end and ticks_end[1] > ticks[1]:
        m["cpu_steal_pct"] = round(100.0 * (ticks_end[0] - ticks[0]) / (ticks_end[1] - ticks[1]), 1)
    print(f"\n{report['wall_s']} s in all (" + ", ".join(f"{k} {v} s" for k, v in seconds.items()) + f"); "
          f"1-min load average {m['load_avg_1min_end']} at the end"
          + (f", CPU steal {m['cpu_steal_pct']}% during the run" if "cpu_steal_pct" in m else ""))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
