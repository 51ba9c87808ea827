#!/usr/bin/env bash
# The system packages WISP needs beyond Python, checked on every set-up (tools/setup_env.sh, .ci/run):
#   build  Python's venv module (.venv), a C++ compiler and cmake: pip compiles llama-cpp-python from
#          source (no wheel on PyPI)
#   app    Mesa's GL/EGL (the chat app's window, offscreen in the tests) and Xvfb (a virtual display)
# Missing ones are installed with apt-get when running as root or with passwordless sudo (unless
# WISP_NO_APT=1); otherwise this names them and the command that installs them. Exit status 1 only
# when build tools are missing and could not be installed (the app's packages only matter to its UI test).
#   bash tools/system_deps.sh [build] [app]     # default: both
set -uo pipefail

groups=("$@")
[ ${#groups[@]} -eq 0 ] && groups=(build app)

have_cmd() { command -v "$1" >/dev/null 2>&1; }
have_lib() { { ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null; } | grep -q "$1"; }
have_venv() { "${PYTHON:-python3}" -c "import ensurepip, venv" 2>/dev/null; }
have_dri() {  # Mesa's software renderer, e.g. /usr/lib/x86_64-linux-gnu/dri/swrast_dri.so
  compgen -G "/usr/lib*/*/dri/swrast_dri.so" >/dev/null || compgen -G "/usr/lib*/dri/swrast_dri.so" >/dev/null
}

missing=() build_missing=0
check() {  # check GROUP DEBIAN_PACKAGE TEST...
  local group=$1 package=$2; shift 2
  if ! "$@"; then
    missing+=("$package")
    [ "$group" = build ] && build_missing=1
  fi
}
for group in "${groups[@]}"; do
  case "$group" in
    build)
      check build python3-venv have_venv
      check build g++ have_cmd c++
      check build cmake have_cmd cmake ;;
    app)
      check app libgl1 have_lib libGL.so.1
      check app libegl1 have_lib libEGL.so.1
      check app libgl1-mesa-dri have_dri
      check app xvfb have_cmd Xvfb ;;
    *) echo "system_deps.sh: unknown group '$group' (build, app)" >&2; exit 2 ;;
  esac
done
[ ${#missing[@]} -eq 0 ] && exit 0

LOG="${TMPDIR:-/tmp}/wisp-system-deps.log"
rm -f "$LOG"
apt_install="DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ${missing[*]}"
install="apt-get update -qq && $apt_install"
if [ "${WISP_NO_APT:-0}" != 1 ] && have_cmd apt-get; then
  echo "== installing system packages: ${missing[*]}"
  if { [ "$(id -u)" -eq 0 ] && sh -c "$install" >"$LOG" 2>&1; } \
      || { have_cmd sudo && sudo -n sh -c "$install" >"$LOG" 2>&1; }; then
    exit 0
  fi
fi
echo "WISP needs these system packages (Debian/Ubuntu names): ${missing[*]}" >&2
echo "  install them with: sudo apt-get install -y ${missing[*]}" >&2
[ -s "$LOG" ] && echo "  (apt-get's output: $LOG)" >&2
if [ "$build_missing" -eq 1 ]; then
  echo "  .venv needs Python's venv module; llama-cpp-python's build needs a C++ compiler and cmake" >&2
  exit 1
fi
echo "  without them the chat app's UI test may fail; everything else works" >&2
exit 0
