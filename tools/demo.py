"""The README's main job: the verifier and an edge agent on loopback, with the shipped pair.

Starts `wisp-cloud serve` on a free port (it prints its one-screen summary), runs
`wisp-edge generate` against it (the Q4_1 drafter on one core, verification over HTTP), then asks the
same server to answer alone (`/v1/chat/completions`, centralized mode) and checks that the
speculative answer is identical under greedy decoding. Extra arguments go to `wisp-edge generate`;
`--results FILE` (the demo's own) writes both runs' figures to FILE as JSON.

    python tools/demo.py [--drafter student -k 3] [--temperature 0.8 --seed 1] [--results FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from wisp_edge.health import ServerExited, wait_healthy  # after the path: runs as a script from a checkout

QUESTION = "Explain in three sentences how a rainbow forms."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 300.0) -> None:
    try:
        ready = wait_healthy(url, timeout_s, proc=proc)
    except ServerExited as e:
        raise SystemExit(f"the verifier exited with code {e.returncode}") from None
    if not ready:
        raise SystemExit(f"the verifier was not ready after {timeout_s:.0f} s")


def write_results(path: Path | None, edge: dict, alone: dict | None) -> None:
    if path is None:
        return
    stats = edge["stats"]
    figures = {"question": QUESTION, "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
               "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "wisp": {k: stats.get(k) for k in ("new_tokens", "tokens_per_s", "rounds", "drafted", "accepted",
                                                  "cloud_rounds", "ahead_ready_rounds")},
               "alone": alone}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=1) + "\n")
    print(f"{'results written to':>26}: {path}")


def main(argv: list[str]) -> int:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--results", type=Path, default=None)
    options, argv = own.parse_known_args(argv)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    threads = max(1, (os.cpu_count() or 2) - 1)  # one core stays with the edge's drafter
    print(f"== starting the verifier on {url} (torch threads {threads})", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "wisp_cloud.cli", "serve", "--port", str(port),
                               "--threads", str(threads), "--log-level", "warning"], cwd=ROOT)
    try:
        wait_ready(url, server)
        print(f"\n== the edge agent: wisp-edge generate --server {url} --chat {QUESTION!r} {' '.join(argv)}\n",
              flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            result_path = Path(tmp) / "edge.json"
            edge = subprocess.run([sys.executable, "-m", "wisp_edge.cli", "generate", "--server", url,
                                   "--chat", QUESTION, "--json-out", str(result_path), *argv], cwd=ROOT)
            if edge.returncode:
                return edge.returncode
            edge_result = json.loads(result_path.read_text())
        speculative = edge_result["text"]
        if not any(a.startswith("--temperature") for a in argv):  # greedy: the answers must be identical
            t0 = time.perf_counter()
            reply = httpx.post(f"{url}/v1/chat/completions", timeout=300, json={
                "model": "default", "messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
                "max_tokens": max(1, edge_result["stats"]["new_tokens"])})
            elapsed = time.perf_counter() - t0
            if reply.status_code != 200:
                print(f"the verifier refused centralized decoding ({reply.status_code}): {reply.text}", file=sys.stderr)
                return 1
            alone = reply.json()
            text = alone["choices"][0]["message"]["content"]
            tokens = alone["usage"]["completion_tokens"]
            print("== the same server decoding alone (centralized mode, /v1/chat/completions):")
            print(f"{text}\n{'target alone tokens/s':>26}: {tokens / elapsed:.2f}")
            print(f"{'identical to target alone':>26}: {text == speculative}")
            write_results(options.results, edge_result, {"tokens": tokens, "tokens_per_s": round(tokens / elapsed, 2),
                                                         "identical": text == speculative})
            return 0 if text == speculative else 1
        write_results(options.results, edge_result, None)
        return 0
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
