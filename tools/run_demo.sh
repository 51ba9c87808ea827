#!/usr/bin/env bash
# The README's main-job command: set up (if needed), then start the verifier (`wisp-cloud serve`) on
# a loopback port and run an edge agent (`wisp-edge generate`, the 4-bit drafter) against it: the
# chat answer streams as it is committed, then the round statistics, then the same server's answer
# decoding alone, checked identical. Extra arguments go to `wisp-edge generate`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/tools/setup_env.sh"
cd "$ROOT"
exec python tools/demo.py "$@"
