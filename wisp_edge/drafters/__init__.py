"""On-device draft models behind one interface (`Drafter`), loaded by shipped name or file path."""

from __future__ import annotations

from pathlib import Path

from wisp_edge.drafters.base import Drafter
from wisp_edge.wire import paths
from wisp_edge.wire.paths import SHIPPED_DRAFTERS, resolve_drafter_path

MODELS_DIR = paths.models_dir()  # the rule in wisp_edge/wire/paths.py, applied once at import


def load_drafter(spec: str | Path, *, models_dir: Path = MODELS_DIR, n_threads: int | None = None,
                 n_ctx: int = 4096, state_cache: int = 0) -> Drafter:
    """`state_cache`: other conversations whose cache a llama.cpp drafter keeps (drafters/saved_states.py)."""
    path = resolve_drafter_path(spec, models_dir)
    if path.suffix == ".onnx":
        from wisp_edge.drafters.onnx import OnnxDrafter

        return OnnxDrafter(path, n_threads=n_threads)
    from wisp_edge.drafters.llama_cpp import LlamaCppDrafter

    return LlamaCppDrafter(path, n_threads=n_threads, n_ctx=n_ctx, name=str(spec), state_cache=state_cache)


__all__ = ["Drafter", "MODELS_DIR", "SHIPPED_DRAFTERS", "load_drafter", "resolve_drafter_path"]
