"""Everything `wisp-cloud serve` can be told, from flags or `WISP_*` environment variables.

pydantic-settings reads the environment (`WISP_API_KEY`, `WISP_PORT`, ...) and validates the
values; command-line flags override it. One object, passed to the service and the app, so a test
or an embedding program builds the server without going through the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from wisp_edge.drafters import MODELS_DIR


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WISP_", extra="forbid", protected_namespaces=())

    model: Path = Field(MODELS_DIR / "target", description="Hugging Face checkpoint directory of the target")
    served_model_name: str | None = Field(None, description="model id in the API (default: from the checkpoint)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    device: Literal["cpu", "cuda", "auto"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch CPU threads")
    policy: Literal["wisp", "fcfs"] = "wisp"
    api_key: str | None = Field(None, description="clients must send 'Authorization: Bearer <key>'; several keys "
                                                  "separated by commas")
    api_keys_file: Path | None = Field(None, description="more keys, one per line ('#' starts a comment)")
    rate_limit_rps: float = Field(100.0, ge=0, description="requests per second per API key (0: no limit)")
    rate_limit_burst: float = Field(200.0, ge=1, description="requests a key may send at once")
    max_body_mb: float = Field(16.0, gt=0, description="largest request body (MiB); larger ones get 413")
    body_timeout_s: float = Field(30.0, gt=0, description="time a client has to send its body; slower gets 408")
    protect_docs: bool = Field(False, description="also require the key for /openapi.json and /docs")
    ssl_certfile: Path | None = Field(None, description="serve HTTPS with this certificate (PEM)")
    ssl_keyfile: Path | None = Field(None, description="the certificate's private key (PEM)")
    kv_budget_mb: float | None = Field(None, gt=0, description="KV pool size (default: 1 GiB CPU, half the free GPU)")
    kv_block_tokens: int = Field(64, ge=1)
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
    online_refit: bool = True
    log_format: Literal["text", "json"] = "text"
    log_level: str = "info"

    @model_validator(mode="after")
    def _tls_pair(self) -> "ServeSettings":
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("TLS needs both ssl_certfile and ssl_keyfile")
        for path in (self.ssl_certfile, self.ssl_keyfile, self.api_keys_file):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"file not found: {path}")
        return self
