"""On-device draft models behind one interface (`Drafter`), and how to find the shipped ones."""

from __future__ import annotations

import os
from pathlib import Path

from wisp_edge.drafters.base import Drafter

MODELS_DIR = Path(os.environ.get("WISP_MODELS_DIR", Path(__file__).resolve().parents[2] / "models"))

# Short names for the shipped drafters (files built by `python tools/build_models.py`).
SHIPPED_DRAFTERS = {
    "q4": "SmolLM2-135M-Instruct.Q4_1.gguf",  # the target's own 4-bit copy
    "student": "student/student-q8_0.gguf",  # the distilled student
    "student-f32": "student/student-f32.gguf",
    "student-onnx": "student/student.onnx",
}


def resolve_drafter_path(spec: str | Path, models_dir: Path = MODELS_DIR) -> Path:
    """A shipped short name or a path to a .gguf / .onnx file."""
    if str(spec) in SHIPPED_DRAFTERS:
        return models_dir / SHIPPED_DRAFTERS[str(spec)]
    return Path(spec)


def load_drafter(spec: str | Path, *, models_dir: Path = MODELS_DIR, n_threads: int | None = None,
                 n_ctx: int = 4096) -> Drafter:
    path = resolve_drafter_path(spec, models_dir)
    if path.suffix == ".onnx":
        from wisp_edge.drafters.onnx import OnnxDrafter

        return OnnxDrafter(path, n_threads=n_threads)
    from wisp_edge.drafters.llama_cpp import LlamaCppDrafter

    return LlamaCppDrafter(path, n_threads=n_threads, n_ctx=n_ctx, name=str(spec))


__all__ = ["Drafter", "MODELS_DIR", "SHIPPED_DRAFTERS", "load_drafter", "resolve_drafter_path"]
