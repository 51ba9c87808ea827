#!/usr/bin/env bash
# The README's desktop command for the chat app: set up (if needed), start a verifier on
# 127.0.0.1:8000 unless one already answers there, then open the app pointed at it (the URL is saved
# in the app's settings). The verifier started here stops when the app closes.
#   WISP_APP_SERVER=URL   use the verifier at URL instead (started by you; nothing is started here)
#   extra arguments go to the app: python -m mobile_app --help
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/tools/setup_env.sh"
cd "$ROOT"
if ! python -c "import kivy" 2>/dev/null; then
  echo "== installing the app's dependencies (kivy)"
  python -m pip install --quiet -e ".[app]"
fi

URL="${WISP_APP_SERVER:-http://127.0.0.1:8000}"
healthy() { python -c "import sys, httpx; sys.exit(httpx.get(sys.argv[1] + '/health', timeout=2).status_code != 200)" \
  "$URL" 2>/dev/null; }

if healthy; then
  echo "== a verifier already answers at $URL"
elif [ -n "${WISP_APP_SERVER:-}" ]; then
  echo "== no verifier answers at $URL yet: the app will say so and connect when it does"
else
  LOG="${TMPDIR:-/tmp}/wisp-app-verifier.log"
  THREADS=$(( $(nproc 2>/dev/null || echo 2) > 1 ? $(nproc 2>/dev/null || echo 2) - 1 : 1 ))  # a core for the drafter
  echo "== starting a verifier at $URL (torch threads $THREADS; log: $LOG)"
  python -m wisp_cloud.cli serve --port 8000 --threads "$THREADS" --log-level warning >"$LOG" 2>&1 &
  SERVER_PID=$!
  trap 'kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true' EXIT
  for _ in $(seq 1 600); do
    healthy && break
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      echo "the verifier exited; its log:" >&2; tail -n 30 "$LOG" >&2; exit 1
    fi
    sleep 0.5
  done
  healthy || { echo "the verifier was not ready after 300 s; see $LOG" >&2; exit 1; }
fi

echo "== opening the app (settings and history: the app's user data dir)"
python -m mobile_app --server "$URL" "$@"
