#!/usr/bin/env bash
# The README's test command: set up (if needed) and run the whole test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/tools/setup_env.sh"
cd "$ROOT"
exec python -m pytest "$@"
