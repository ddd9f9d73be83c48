#!/usr/bin/env bash
# Download the wheels the GPU machine lacks into .whl/ (git-ignored), to be carried to it by the
# device tool (carry: [".whl"]). That machine has torch 2.11, triton 3.6, einops and the rest of
# what model/ imports; it gets what pyproject's `gpu` extra adds (fla-core: Python + Triton) and
# the transformers our tests compare against (the `test` extra's pin; its own is older), for
# bench/gpu_check.py's transformers rows. Both are pure-Python wheels (about 15 MB together).
# On the GPU machine, before running anything:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
pin() { sed -n "s/.*\"$1==\([^\"]*\)\".*/\1/p" pyproject.toml | head -1; }
rm -rf .whl && mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    -d .whl "fla-core==$(pin fla-core)" "transformers==$(pin transformers)"
ls -l .whl
