"""The edge agent's settings: flags, then `WISP_EDGE_*` environment variables, then a TOML config file.

The config file is `--config PATH`, or `$WISP_EDGE_CONFIG`, or `~/.config/wisp/edge.toml` when it
exists; keys are the field names below (`server = "http://10.0.0.2:8000"`, `drafter = "student"`).
The API key also reads `WISP_API_KEY`, the variable the verifier uses. Defaults reach a verifier
on loopback with the shipped 4-bit drafter.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from wisp_edge.controller.policy import POLICIES
from wisp_edge.wire.options import DraftOptions

DEFAULT_CONFIG = Path.home() / ".config" / "wisp" / "edge.toml"


def config_path() -> Path | None:
    path = Path(os.environ.get("WISP_EDGE_CONFIG", DEFAULT_CONFIG))
    return path if path.exists() else None


class EdgeSettings(BaseSettings, DraftOptions):
    """The agent's settings (`drafter` and `draft_length` from `DraftOptions`); each is a `wisp-edge` flag."""

    model_config = SettingsConfigDict(env_prefix="WISP_EDGE_", extra="forbid")

    server: str = Field("http://127.0.0.1:8000", description="the verifier's URL")
    api_key: str | None = Field(None, validation_alias=AliasChoices("api_key", "WISP_EDGE_API_KEY", "WISP_API_KEY"),
                                description="the verifier's API key (or WISP_API_KEY)")
    threads: int = Field(1, ge=1, description="drafter threads")
    n_ctx: int = Field(4096, ge=64, description="drafter context (tokens)")
    policy: Literal[POLICIES] = Field(
        "wisp", description="speculation controller; wisp: rejection predictor (or its fallback) + adaptive bound; "
                            "sled: confidence 0.5, k_max 8; predictor: the rejection predictor alone, k_max 8; "
                            "fixed: always draft_length")
    k_max: int = Field(16, ge=1, description="the longest draft the controller may choose")
    slo_tokens_per_s: float | None = Field(None, gt=0, description="the rate to ask the verifier for",
                                           json_schema_extra={"cli_flags": ("--slo",)})
    decode_while_prefilling: bool = Field(True, description="let the verifier decode (empty drafts) while the "
                                                            "drafter prefills a long prompt, instead of waiting")
    draft_ahead: bool = Field(True, description="keep drafting while a block is being verified, guessing that it "
                                                "is accepted whole; the next block is then ready at once")
    allow_local: bool = Field(False, description="when the verifier is unreachable, continue with drafter-only "
                                                 "tokens, marked unverified")
    max_wait_s: float = Field(60.0, gt=0, description="how long to retry an unreachable or busy verifier")
    timeout_s: float = Field(30.0, gt=0, description="per HTTP request")
    host: str = Field("127.0.0.1", description="wisp-edge serve: listen address")
    port: int = Field(8080, ge=0, le=65535, description="wisp-edge serve: port")
    max_waiting: int = Field(16, ge=0, description="wisp-edge serve: requests waiting for the drafter before 429")
    state_cache: int = Field(4, ge=0, description="wisp-edge serve: other conversations whose drafter cache is "
                                                  "kept, so interleaved clients prefill only their new message "
                                                  "(0: only the last conversation's)")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML source reads `toml_file` from the class's config; `load_settings` sets it.
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)


def load_settings(flags: dict, config: str | None = None) -> EdgeSettings:
    """Flags that were given (not None) win over the environment, which wins over the config file."""
    if config is not None and not Path(config).exists():
        raise FileNotFoundError(f"config file not found: {config}")
    path = Path(config) if config else config_path()

    class FromFile(EdgeSettings):
        model_config = SettingsConfigDict(**{**EdgeSettings.model_config, "toml_file": path})

    values = FromFile(**{k: v for k, v in flags.items() if v is not None and k in EdgeSettings.model_fields})
    return EdgeSettings.model_construct(**values.model_dump())
