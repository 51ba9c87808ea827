"""Everything `wisp-cloud` can be told: each field is a flag (wisp_edge/wire/flags.py makes them).

`ServeSettings` (`wisp-cloud serve`): pydantic-settings reads the environment (`WISP_API_KEY`,
`WISP_PORT`, ...) and validates the values; command-line flags override it. One object, passed to the
service and the app, so a test or an embedding program builds the server without the command line.
`ProfileOptions` and `PairOptions` are the flags of `wisp-cloud profile` and `wisp-cloud generate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from wisp_cloud.admission import ACTIVE_WINDOW_S
from wisp_edge.wire.options import DraftOptions
from wisp_edge.wire.paths import TARGET, models_dir

DEFAULT_TARGET = models_dir() / TARGET
Dtype = Literal["float32", "float16", "bfloat16"]


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WISP_", extra="forbid", protected_namespaces=())

    model: Path = Field(DEFAULT_TARGET, description="Hugging Face checkpoint directory of the target")
    served_model_name: str | None = Field(None, description="model id in the API (default: from the checkpoint)")
    host: str = Field("127.0.0.1", description="listen address")
    port: int = Field(8000, ge=0, le=65535, description="0: any free port")
    device: Literal["cpu", "cuda", "auto"] = Field("auto", description="auto: cuda when torch sees one")
    dtype: Literal["auto", Dtype] = Field("auto", description="auto: float32 on cpu, bfloat16 on cuda")
    threads: int | None = Field(None, ge=1, description="torch CPU threads")
    policy: Literal["wisp", "fcfs"] = Field("wisp", description="batch scheduler")
    api_key: str | None = Field(None, description="clients must send 'Authorization: Bearer <key>'; several keys "
                                                  "separated by commas, or the flag repeated",
                                json_schema_extra={"cli_join": ","})
    api_keys_file: Path | None = Field(None, description="more keys, one per line ('#' starts a comment)")
    rate_limit_rps: float = Field(100.0, ge=0, description="requests per second per API key (0: no limit)")
    rate_limit_burst: float = Field(200.0, ge=1, description="requests a key may send at once")
    max_body_mb: float = Field(16.0, gt=0, description="largest request body (MiB); larger ones get 413")
    body_timeout_s: float = Field(30.0, gt=0, description="time a client has to send its body; slower gets 408")
    protect_docs: bool = Field(False, description="also require the key for /openapi.json and /docs")
    ssl_certfile: Path | None = Field(None, description="serve HTTPS with this certificate (PEM)")
    ssl_keyfile: Path | None = Field(None, description="the certificate's private key (PEM)")
    kv_budget_mb: float | None = Field(None, gt=0, description="KV pool size (default: 1 GiB CPU, half the free GPU)")
    kv_keep_active_s: float = Field(ACTIVE_WINDOW_S, ge=0,
                                    description="a session used this recently keeps its KV against newcomers (its "
                                                "edge is drafting between rounds); 0: any idle session may be "
                                                "evicted for one")
    ttft_slo_s: float | None = Field(None, gt=0,
                                     description="time to first token promised to sessions; the WISP policy lets a "
                                                 "prefill or resume wait a fifth of it, then serves it first; "
                                                 "default: none, only the token rate is promised and prefills "
                                                 "are best effort")
    prefill_wait_s: float | None = Field(None, gt=0,
                                         description="WISP policy: a prefill or resume queued this long goes first "
                                                     "(overrides the fifth of ttft_slo_s)")
    kv_block_tokens: int = Field(16, ge=1, description="KV block size (tokens): the unit of allocation and of "
                                 "prefix caching")
    max_batch_tokens: int = Field(2048, ge=1, description="new tokens per batched forward")
    max_draft: int = Field(32, ge=1, description="longest draft block accepted")
    max_sessions: int = Field(4096, ge=1, description="open sessions (idle ones are evicted beyond it)")
    max_queue: int = Field(1024, ge=1, description="queued jobs above which new sessions get 429")
    max_backlog_ms: float = Field(2000.0, gt=0, description="predicted queue time above which new sessions get 429")
    session_ttl_s: float = Field(900.0, gt=0, description="idle time after which a session is forgotten")
    default_slo: float | None = Field(None, gt=0, description="tokens/s for sessions that name none")
    fcfs_max_batch: int = Field(16, ge=1, description="fcfs: jobs per batch")
    fcfs_max_wait_ms: float = Field(10.0, ge=0, description="fcfs: longest wait before a partial batch runs")
    profile: Path | None = Field(None, description="estimator profile (default: next to the model, made if missing)")
    estimator_margin: float = Field(1.1, ge=1.0, description="safety factor on predicted verification time")
    online_refit: bool = Field(True, description="refit the estimator from live batches (else keep the "
                                                 "profile's coefficients)")
    replicas: int = Field(1, ge=1, description="verifier replicas, each with its own model, KV pool and scheduler; "
                                               "2 or more serve through Ray Serve (the 'cluster' extra)")
    ray_address: str | None = Field(None, description="join this running Ray cluster (e.g. 10.0.0.1:6379 or 'auto') "
                                                      "instead of starting a local one; implies Ray Serve")
    min_replicas: int | None = Field(None, ge=1, description="autoscaling: fewest replicas (with max_replicas)")
    max_replicas: int | None = Field(None, ge=1, description="autoscaling: most replicas (unset: a fixed --replicas)")
    target_ongoing_requests: float = Field(8.0, gt=0, description="autoscaling: requests in flight per replica "
                                                                  "that Ray Serve aims for")
    upscale_delay_s: float = Field(30.0, ge=0, description="autoscaling: how long the load must stay above target "
                                                           "before a replica is added")
    downscale_delay_s: float = Field(600.0, ge=0, description="autoscaling: how long the load must stay below target "
                                                              "before a replica is drained and removed")
    autoscale_look_back_s: float = Field(30.0, gt=0, description="autoscaling: window the requests in flight are "
                                                                 "averaged over")
    log_format: Literal["text", "json"] = Field("text", description="server log lines as text or JSON")
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field("info", description="log threshold")

    @property
    def clustered(self) -> bool:
        """Served through Ray Serve (several replicas, autoscaling or a Ray cluster) rather than in this process."""
        return self.replicas > 1 or self.ray_address is not None or self.max_replicas is not None

    @model_validator(mode="after")
    def _tls_pair(self) -> "ServeSettings":
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("TLS needs both ssl_certfile and ssl_keyfile")
        if self.max_replicas is not None and self.max_replicas < (self.min_replicas or 1):
            raise ValueError("max_replicas must be at least min_replicas")
        for path in (self.ssl_certfile, self.ssl_keyfile, self.api_keys_file):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"file not found: {path}")
        return self


class ProfileOptions(BaseModel):
    """`wisp-cloud profile`: where and how to time the verify forwards."""

    model: Path = Field(DEFAULT_TARGET, description="target checkpoint directory")
    device: Literal["cpu", "cuda"] | None = Field(None, description="default: cuda when torch sees one, else cpu")
    dtype: Dtype | None = Field(None, description="default: float32 on cpu, bfloat16 on cuda")
    quick: bool = Field(False, description="a small grid (~10 s on two CPU cores for the 135M target)")
    holdout: float = Field(0.25, description="fraction of configurations held out of the fit")
    passes: int | None = Field(None, ge=1, description="timed sweeps over the grid; each configuration keeps its "
                                                       "median (default: 3 quick, 5 full)")
    seed: int = Field(0, description="the grid's random draws")
    out: Path | None = Field(None, description="profile JSON (default: <model>/.wisp-profile-<device>-<dtype>"
                                               "[-t<threads> on cpu].json)")
    threads: int | None = Field(None, ge=1, description="torch threads (default: torch's choice)")
    progress: bool = Field(True, description="a progress bar (when tqdm is installed)")


class PairOptions(DraftOptions):
    """`wisp-cloud generate`: a drafter and the target in this process."""

    model: Path = Field(DEFAULT_TARGET, description="target checkpoint directory")
    threads: int | None = Field(None, ge=1, description="torch threads for the target (default: all cores)")
    drafter_threads: int = Field(1, ge=1, description="drafter threads; one keeps llama.cpp's spinning pool off "
                                                      "the target's cores")
