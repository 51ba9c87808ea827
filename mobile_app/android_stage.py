"""Gather what the Android package holds into one folder, buildozer's `source.dir`.

Buildozer packages one directory that must have `main.py` at its top, while the app imports two
packages of this repository (`mobile_app`, `wisp_edge`) and needs a drafter file. This writes
`build/android/app/` (git-ignored) with a small `main.py`, both packages (sources only; the build
inputs under `mobile_app/android/` stay out), the chosen drafter and the rejection predictor's
weights; `mobile_app/buildozer.spec` points there.

    python -m mobile_app.android_stage [--drafter q4|student|student-onnx|PATH]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "build" / "android" / "app"
PACKAGES = ("mobile_app", "wisp_edge")
SOURCE_SUFFIXES = {".py", ".kv"}
MAIN = ('"""Android entry point (written by mobile_app/android_stage.py)."""\n\n'
        "from mobile_app.main import main\n\nmain()\n")


def stage(drafter: str = "q4", out: Path = STAGE) -> list[Path]:
    """Write the package folder; returns the files written. Raises FileNotFoundError for a missing model."""
    from wisp_edge.drafters import MODELS_DIR, resolve_drafter_path

    model = resolve_drafter_path(drafter)
    if not model.exists():
        raise FileNotFoundError(f"drafter {drafter!r} not found at {model}: build it with python tools/build_models.py")
    models = [model, *sorted((MODELS_DIR / "predictor").glob("*.npz"))]
    if model.suffix == ".onnx":
        models.append(model.with_name("tokenizer.json"))  # the ONNX drafter's tokenizer sits beside it
    shutil.rmtree(out, ignore_errors=True)
    written = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*")):
            inside = path.relative_to(ROOT / package).parts
            if path.suffix in SOURCE_SUFFIXES and "__pycache__" not in inside and inside[0] != "android":
                written.append(_copy(path, out / path.relative_to(ROOT)))
    for path in models:
        # Inside the models folder the app expects (wisp_edge.drafters.MODELS_DIR, next to the package);
        # a drafter from elsewhere goes to its top.
        where = path.relative_to(MODELS_DIR) if path.is_relative_to(MODELS_DIR) else Path(path.name)
        written.append(_copy(path, out / "models" / where))
    (out / "main.py").write_text(MAIN)
    written.append(out / "main.py")
    return written


def _copy(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mobile_app.android_stage", description=__doc__.split("\n")[0])
    parser.add_argument("--drafter", default="q4", help="the drafter to ship: q4 (default), student, or a path")
    parser.add_argument("--out", type=Path, default=STAGE)
    args = parser.parse_args(argv)
    try:
        files = stage(args.drafter, args.out)
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for f in files) / 2**20
    print(f"staged {len(files)} files ({size:.0f} MiB) in {args.out}; now: cd mobile_app && buildozer android debug")
    return 0


if __name__ == "__main__":
    sys.exit(main())
