#!/usr/bin/env bash
# Set up rwdeploy in ./.venv on a fresh Debian/Ubuntu machine with Python >= 3.10.
#   scripts/setup.sh          runtime dependencies (for the demo)
#   scripts/setup.sh test     + test dependencies and the system packages the tests use
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
want=${1:-}

log() { printf '[setup] %s\n' "$*" >&2; }

have_root_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }
apt_updated=0
apt_install() {  # apt_install PKG... (only the missing ones)
    local missing=()
    for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    if ! have_root_apt; then
        log "missing system packages: ${missing[*]} (install them with apt-get as root)"; return 1
    fi
    if [ $apt_updated = 0 ]; then log "apt-get update"; apt-get update -qq >/dev/null; apt_updated=1; fi
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

if ! command -v "$PY" >/dev/null 2>&1; then
    log "no $PY found: install Python 3.10 or newer (apt-get install python3 python3-venv)"; exit 1
fi
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { log "$PY is older than 3.10"; exit 1; }
if ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    apt_install python3-venv
fi

if [ ! -x .venv/bin/python ]; then
    log "creating .venv with $("$PY" --version)"
    "$PY" -m venv .venv
fi

spec="."
if [ "$want" = test ]; then
    spec=".[test]"
    # Cross compiler and user-mode qemu for the arm target's build and emulated-device tests.
    apt_install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user
fi
log "pip install -e '$spec' (torch is pinned to the 2.13.0 CPU build)"
.venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec"
if [ "$want" = test ]; then
    # The emulated aarch64 device the arm tests run on: aarch64 TVM runtime, arm64 Python,
    # qemu instruction-count plugin, C++ runner (~40 s the first time, cached in
    # ${RWDEPLOY_A64_HOME:-~/.cache/rwdeploy/a64}).
    log "provisioning the emulated aarch64 device"
    .venv/bin/rwdeploy device arm-emulator provision || { log "arm emulator provisioning failed"; exit 1; }
fi
log "ready: $(.venv/bin/rwdeploy --version)"
