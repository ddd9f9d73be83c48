#!/usr/bin/env bash
# Set up (idempotent), lint, and run the whole test suite. Tests that start Ray must send traffic
# only to loopback, so the suite runs in a network namespace that has nothing but `lo` when this
# user may create one (root, or unprivileged user namespaces); elsewhere it runs as is.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .

run=(.venv/bin/python -m pytest "$@")
if unshare -n true 2>/dev/null; then
    exec unshare -n sh -c 'ip link set lo up && exec "$@"' sh "${run[@]}"
elif unshare -rn true 2>/dev/null; then
    exec unshare -rn sh -c 'ip link set lo up && exec "$@"' sh "${run[@]}"
fi
echo "note: cannot make a loopback-only network namespace here; running tests without one" >&2
exec "${run[@]}"
