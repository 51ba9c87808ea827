#!/usr/bin/env bash
# Create or reuse .venv and install WISP with everything the demo and the tests need (system packages
# first: tools/system_deps.sh), then build the shipped models. Sourced by tools/run_demo.sh and
# tools/run_tests.sh; safe to run again.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHON="${PYTHON:-python3}"
STAMP=.venv/.wisp-installed
if [ ! -x .venv/bin/python ] || [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  bash tools/system_deps.sh build app  # venv, the compiler llama-cpp-python needs, the app's GL
  if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    "$PYTHON" -m venv .venv
  fi
  . .venv/bin/activate
  echo "== installing WISP and its dependencies (llama-cpp-python compiles once, ~5 min on 2 cores)"
  python -m pip install --quiet --upgrade pip wheel setuptools
  # The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
  python -m pip install --quiet "torch==2.13.0" || python -m pip install --quiet torch
  CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" python -m pip install --quiet -e ".[dev]"
  touch "$STAMP"
else
  bash tools/system_deps.sh app  # cheap when present; the app's UI test needs GL
  . .venv/bin/activate
fi
echo "== building the shipped models (skipped when up to date)"
python tools/build_models.py
