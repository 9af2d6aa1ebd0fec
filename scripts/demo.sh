#!/usr/bin/env bash
# One command from a fresh machine to the main job on the built-in default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/rwdeploy demo "$@"
