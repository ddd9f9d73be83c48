#!/usr/bin/env bash
# Download the wheels the GPU machine lacks into .whl/ (git-ignored), to be carried to it by the
# device tool (carry: [".whl"]). That machine has torch 2.11, triton 3.6, einops and transformers
# already; it needs only what pyproject's `gpu` extra adds: fla-core (pure Python + Triton).
# On the GPU machine, before running anything:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
FLA_CORE_VERSION="$(sed -n 's/.*"fla-core==\([^"]*\)".*/\1/p' pyproject.toml)"
rm -rf .whl && mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    -d .whl "fla-core==${FLA_CORE_VERSION}"
ls -l .whl
