#!/usr/bin/env bash
# The README's main-job command: set up (if needed), then answer a chat message with speculative
# decoding on the shipped pair (the 4-bit drafter + the float32 target), print the text, the round
# statistics, and the speed against the target alone. Extra arguments go to `wisp-cloud generate`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/tools/setup_env.sh"
cd "$ROOT"
exec wisp-cloud generate --chat "What is the capital of France? Answer in two sentences." --compare "$@"
