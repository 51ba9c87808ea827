"""Build the shipped model pair under models/ (idempotent): the Q4_1 GGUF drafter, the float32
target checkpoint, and the distilled student's checkpoint, GGUF and ONNX files.

    python tools/build_models.py            # everything missing or stale
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wisp_cloud.convert.shipped_pair import MODELS_DIR, build_student, build_target  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    args = parser.parse_args()
    t0 = time.perf_counter()
    build_target(args.models_dir)
    build_student(args.models_dir)
    print(f"models ready in {args.models_dir} ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
