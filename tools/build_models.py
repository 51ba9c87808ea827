"""Build the shipped model pair (idempotent): the Q4_1 GGUF drafter, the float32 target checkpoint, and
the distilled student's checkpoint, GGUF and ONNX files, in the models folder: --models-dir, else
$WISP_MODELS_DIR, else the checkout's models/ (wisp_edge/wire/paths.py).

    python tools/build_models.py            # everything missing or stale
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.build.convert.shipped_pair import MODELS_DIR, build_student, build_target  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR, help="default: %(default)s")
    args = parser.parse_args()
    t0 = time.perf_counter()
    build_target(args.models_dir)
    build_student(args.models_dir)
    print(f"models ready in {args.models_dir} ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
