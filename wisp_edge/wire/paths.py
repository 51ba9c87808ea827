"""Where the shipped models live and their short names: one rule for the edge, the verifier and the tools.

A path given explicitly (a flag) wins, then `$WISP_MODELS_DIR`. Running from a source tree (a checkout,
or the app's staged bundle), the models are the `models/` folder beside the packages; an installed copy
(pip records a `wisp-*.dist-info` beside the packages) cannot keep them there, so it uses the per-user
data folder (platformdirs: ~/.local/share/wisp/models on Linux).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "WISP_MODELS_DIR"
PACKAGES_ROOT = Path(__file__).resolve().parents[2]  # the folder holding wisp_edge/ and wisp_cloud/

DEFAULT_DRAFTER = "q4"
# Short names of the shipped drafters, relative to the models folder (built by `python tools/build_models.py`).
SHIPPED_DRAFTERS = {
    "q4": "SmolLM2-135M-Instruct.Q4_1.gguf",  # the target's own 4-bit copy
    "student": "student/student-q8_0.gguf",  # the distilled student
    "student-f32": "student/student-f32.gguf",
    "student-onnx": "student/student.onnx",
}
TARGET = "target"  # the target's Hugging Face checkpoint folder


def source_tree_models(root: Path = PACKAGES_ROOT) -> Path | None:
    """`root/models` when the packages run from a source tree rather than from a pip install."""
    models = root / "models"
    installed = any(root.glob("wisp-*.dist-info"))
    return models if models.is_dir() and not installed else None


def user_models_dir() -> Path:
    from platformdirs import user_data_path  # imported here: a source tree (the Android bundle) goes without

    return user_data_path("wisp", appauthor=False) / "models"


def models_dir(explicit: str | Path | None = None) -> Path:
    """The models folder by the rule above."""
    if explicit:
        return Path(explicit)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    return source_tree_models() or user_models_dir()


def resolve_drafter_path(spec: str | Path, models: Path | None = None) -> Path:
    """A shipped short name (inside `models`, default `models_dir()`) or a path to a .gguf / .onnx file."""
    if str(spec) in SHIPPED_DRAFTERS:
        return (models or models_dir()) / SHIPPED_DRAFTERS[str(spec)]
    return Path(spec)
