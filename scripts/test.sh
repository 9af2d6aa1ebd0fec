#!/usr/bin/env bash
# One command from a fresh machine to a passing test suite. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test || exit 1
.venv/bin/python -m pytest "$@"
rc=$?
# pytest exits 5 when it collected no tests: that is a failure, not a pass.
[ $rc -eq 5 ] && { echo "[test] no tests were collected" >&2; exit 1; }
exit $rc
