#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: a virtual environment in .venv with torch installed first
# and pinned (so no package can pull in a different build), then nextserve with its test extras.
# GPU nodes: TORCH_SPEC='torch==2.13.0' is the CPU build on PyPI-less CPU boxes; override it,
# e.g. TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-test}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=.venv/.nextserve-setup
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $TORCH_SPEC $EXTRAS"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0  # already set up for this pyproject.toml
fi
# shellcheck disable=SC2086
python -m pip install -q $TORCH_SPEC
python -m pip install -q -e ".[$EXTRAS]"
echo "$want" > "$stamp"
