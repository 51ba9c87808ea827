"""The reliability suite as a measurement: runs the fault, fuzz, overload and soak tests and keeps what they
measured in docs/results/reliability/ (one JSON file per test module, written by `tests/results.record`).

    python tools/reliability.py [--out docs/results/reliability] [--soak-s 60]

The README's reliability table quotes these files. The same tests run in CI without writing anything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_faults.py", "tests/test_fuzz_api.py", "tests/test_overload.py", "tests/test_soak.py",
         "tests/test_access.py"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results/reliability")
    parser.add_argument("--soak-s", type=float, default=60.0, help="length of the soak test (WISP_SOAK_S)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.json"):
        old.unlink()
    env = dict(os.environ, WISP_RESULTS_DIR=str(args.out.resolve()), WISP_SOAK_S=str(args.soak_s))
    started = time.monotonic()
    code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *TESTS],
                           cwd=ROOT, env=env)
    summary = {"command": "python tools/reliability.py", "tests": TESTS, "pytest_exit_code": code,
               "seconds": round(time.monotonic() - started, 1)}
    (args.out / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"results in {args.out}: {sorted(p.name for p in args.out.glob('*.json'))}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
