"""Peak resident memory of `wisp-edge generate` per drafter, against a real verifier on loopback.

    python tools/edge_memory.py [--drafters q4,student,student-onnx] [--tokens 64] [--baseline-src DIR]

Each drafter's generation runs as a child process; its peak RSS is the kernel's ru_maxrss for that child
(what `/usr/bin/time -v` prints as "Maximum resident set size"). Writes docs/results/edge_memory.json:
under "current" (this tree) per drafter the file's size, the peak and the peak above the file (the budget
the issue sets: the file + 150 MB). `--baseline-src DIR` also measures, under "baseline", the agent of
another source tree, e.g. the last commit's (`git archive HEAD wisp_edge | tar -x -C DIR`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.live_server import LiveServer  # noqa: E402
from wisp_edge.wire.paths import resolve_drafter_path  # noqa: E402

OUT = ROOT / "docs" / "results" / "edge_memory.json"
MIB = 1024 * 1024


def peak_rss_mib(cmd: list[str], src: Path = ROOT) -> tuple[float, int, str]:
    """Run `cmd` in the source tree `src`; its peak RSS in MiB (ru_maxrss is in KiB on Linux), exit status, stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WISP_")}
    env["WISP_EDGE_CONFIG"] = os.devnull + ".absent"  # no user config file
    env["WISP_MODELS_DIR"] = str(ROOT / "models")
    proc = subprocess.Popen(cmd, cwd=src, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 1024, proc.returncode, err


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drafters", default="q4,student,student-onnx")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--chat", default="Explain what a CPU does in simple words.")
    parser.add_argument("--baseline-src", type=Path, help="another source tree to measure the same way")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    trees = {"current": ROOT} | ({"baseline": args.baseline_src.resolve()} if args.baseline_src else {})
    report = {"command": "python tools/edge_memory.py " + " ".join(sys.argv[1:]), "tokens": args.tokens,
              "chat": args.chat, **{key: {} for key in trees}}
    with LiveServer("--threads", "1", "--log-level", "warning", log_path=Path("/tmp/wisp-edge-memory-server.log")) as s:
        for (key, src), name in ((t, n) for t in trees.items() for n in args.drafters.split(",")):
            cmd = [sys.executable, "-m", "wisp_edge.cli", "generate", "--server", s.url, "--drafter", name,
                   "--chat", args.chat, "--max-tokens", str(args.tokens), "--json"]
            peak, rc, err = peak_rss_mib(cmd, src)
            if rc:
                raise SystemExit(f"wisp-edge generate with {name} in {src} failed ({rc}):\n{err}")
            size = resolve_drafter_path(name, ROOT / "models").stat().st_size / MIB
            report[key][name] = {"file_mib": round(size, 1), "peak_rss_mib": round(peak, 1),
                                 "above_file_mib": round(peak - size, 1)}
            print(key, name, report[key][name], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
