"""From settings to a ready server: load the model, the tokenizer and the estimator profile, size the KV
pool, build the service and the app, and log a one-screen summary for the operator.

The profile is loaded from `--profile` or from next to the checkpoint; when there is none, a quick
one is measured (~10 s on a CPU) and saved, so the first start works and later starts are instant.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from wisp_cloud.estimator import FORMAT, Margin, TimeEstimator
from wisp_cloud.model.loader import load_model
from wisp_cloud.model.transformer import Transformer
from wisp_cloud.profiler import DTYPES, default_profile_path, holdout_report, load_profile, run_profile, save_profile
from wisp_cloud.service import VerifierService
from wisp_cloud.settings import ServeSettings
from wisp_cloud.tokenizer import chat_template_of, load_tokenizer, target_token_pieces
from wisp_edge.wire.openai import TextModel
from wisp_edge.wire.vocab import fingerprint

log = logging.getLogger("wisp.runtime")

CPU_KV_DEFAULT_BYTES = 1 << 30


@dataclass
class Runtime:
    settings: ServeSettings
    model: Transformer
    service: VerifierService
    text_model: TextModel
    tokenizer: object  # tokenizers.Tokenizer
    profile_path: Path
    profile_note: str

    def app(self):
        from wisp_cloud.access import AccessPolicy
        from wisp_cloud.server import create_app

        return create_app(self.service, self.text_model, self.tokenizer,
                          access=AccessPolicy.from_settings(self.settings))


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    return name


def resolve_dtype(name: str, device: str) -> str:
    if name == "auto":
        return "bfloat16" if device == "cuda" else "float32"
    return name


def model_id_for(model_dir: Path) -> str:
    """A readable id: the build stamp's source for the shipped target, else the directory name."""
    stamp = model_dir / ".wisp-build.json"
    if stamp.exists() and model_dir.name == "target":
        return "SmolLM2-135M-Instruct"
    return model_dir.resolve().name


def kv_budget_bytes(settings: ServeSettings, device: str) -> int:
    if settings.kv_budget_mb:
        return int(settings.kv_budget_mb * (1 << 20))
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(free * 0.5)
    return CPU_KV_DEFAULT_BYTES


def load_estimator(settings: ServeSettings, model: Transformer, device: str, dtype: str,
                   model_id: str) -> tuple[TimeEstimator, Path, str]:
    # CPU times depend on the thread count: one profile per count.
    threads = torch.get_num_threads() if device == "cpu" else None
    path = settings.profile or default_profile_path(settings.model, device, dtype, threads)
    estimator = load_profile(path, device=device, dtype=dtype) if path.exists() else None
    if estimator is not None and (settings.profile or estimator.read_format == FORMAT):
        note = "loaded"
    else:  # none yet, or one of an older estimator format at the default path: measure a new one
        if estimator is not None:
            log.info("the estimator profile %s has an older format (%s): re-measuring", path, estimator.read_format)
        else:
            log.info("no estimator profile for this device and dtype: measuring a quick one (about 10 s)")
        result = run_profile(model, quick=True, progress=False, model_name=model_id)
        estimator = result.estimator
        try:
            save_profile(result, path)
            note = "measured now (quick grid), saved"
        except OSError as exc:  # a read-only model directory: keep it in memory
            note = f"measured now (quick grid), not saved: {exc}"
    estimator.margin = Margin(scale=settings.estimator_margin)
    return estimator, path, note


def build_runtime(settings: ServeSettings) -> Runtime:
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    model_dir = Path(settings.model)
    model_id = settings.served_model_name or model_id_for(model_dir)
    # Every torch call runs on the one thread that will run the forwards: a second thread with its
    # own CPU thread pool made the server's forwards 1.4-1.9x slower than the same work in one
    # thread, and a profile measured elsewhere would under-predict them.
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wisp-forward")

    def torch_work():
        if settings.threads:
            torch.set_num_threads(settings.threads)
        model = load_model(model_dir, device=device, dtype=DTYPES[dtype])
        return model, *load_estimator(settings, model, device, dtype, model_id)

    model, estimator, profile_path, note = executor.submit(torch_work).result()
    pieces = target_token_pieces(model_dir, model.args.vocab_size)
    tokenizer = load_tokenizer(model_dir)
    budget = kv_budget_bytes(settings, device)
    service = VerifierService(model, settings, estimator, model_id=model_id, vocab_fingerprint=fingerprint(pieces),
                              kv_budget_bytes=budget, executor=executor)

    try:
        chat_template = chat_template_of(model_dir)
    except ValueError:
        chat_template = None  # a base model: /v1/completions only
    text_model = TextModel(model_id, model.args.max_seq_len, model.args.vocab_size,
                           frozenset(model.args.eos_token_ids), chat_template)
    return Runtime(settings, model, service, text_model, tokenizer, profile_path, note)


def summary(rt: Runtime) -> str:
    """The start-up screen: what is served, where, with what memory and how well time is predicted."""
    s, m, svc = rt.settings, rt.model, rt.service
    est = svc.estimator
    report = holdout_report(est)
    accuracy = (f"held-out R^2 {report.r2:.3f}, MAE {report.mae_ms:.2f} ms, MAPE {report.mape_pct:.1f}%"
                if report else "no held-out report")
    pool = svc.pool
    params = sum(p.numel() for p in m.parameters())
    lines = [
        f"WISP verifier  model {svc.model_id} ({params / 1e6:.0f}M parameters, {m.args.n_layers} layers, "
        f"vocab {m.args.vocab_size}, context {m.args.max_seq_len})",
        f"  checkpoint   {Path(s.model).resolve()}",
        f"  device       {m.device.type} {str(m.dtype).removeprefix('torch.')}, torch threads "
        f"{torch.get_num_threads()}",
        f"  KV pool      {pool.budget_bytes / (1 << 20):.0f} MiB = {pool.capacity_tokens} tokens "
        f"({pool.bytes_per_token} B/token, {pool.blocks.num_blocks} paged blocks of {pool.block_tokens}, "
        f"prefix caching on)",
        f"  scheduler    {s.policy}; max batch tokens {s.max_batch_tokens}, max draft {s.max_draft}"
        + (f", fcfs batch {s.fcfs_max_batch} / wait {s.fcfs_max_wait_ms} ms" if s.policy == "fcfs" else ""),
        f"  estimator    {rt.profile_path} ({rt.profile_note}); {accuracy}",
        "               T = " + " + ".join(f"{c:.4g}" for c in est.coefficients)
        + f" ms (fixed, per new token, per new x length, per cached); margin x{est.margin.scale:g}",
        f"  admission    429 above {s.max_queue} queued jobs or {s.max_backlog_ms:.0f} ms predicted backlog; "
        f"sessions idle {s.session_ttl_s:.0f} s are forgotten",
        f"  access       {_access_line(s)}",
        f"  listening    {'https' if s.ssl_certfile else 'http'}://{s.host}:{s.port}  (docs /docs, schema "
        f"/openapi.json, /health, /metrics)",
    ]
    return "\n".join(lines)


def _access_line(s: ServeSettings) -> str:
    from wisp_cloud.access import read_keys

    limits = f"bodies up to {s.max_body_mb:g} MiB sent within {s.body_timeout_s:g} s"
    keys = read_keys(s.api_key, s.api_keys_file)
    if not keys:
        return f"no API key (loopback or trusted networks only); {limits}"
    rate = f"{s.rate_limit_rps:g} requests/s per key (bursts of {s.rate_limit_burst:g})" if s.rate_limit_rps else \
        "no rate limit"
    return f"{len(keys)} API key(s) required (sessions bound to their key); {rate}; {limits}"


def settings_from_env_and_args(overrides: dict) -> ServeSettings:
    """Environment (WISP_*) first, then the flags that were given."""
    return ServeSettings(**{k: v for k, v in overrides.items() if v is not None})


def dump_settings(settings: ServeSettings) -> str:
    data = settings.model_dump(mode="json")
    if data.get("api_key"):
        data["api_key"] = "***"
    return json.dumps(data)

