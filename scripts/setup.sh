#!/usr/bin/env bash
# Create .venv and install the project with the node and test extras. Re-runs are instant until
# pyproject.toml changes. Sourced by run.sh and test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "Setting up .venv (first run: a few minutes) ..." >&2
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
  # torch first and pinned: a range would let pip pick the registry's CUDA build (gigabytes).
  # Where a CPU-only wheel index is configured (PIP_EXTRA_INDEX_URL), 2.13.0 comes from there.
  .venv/bin/pip install --quiet "torch==2.13.0"
  .venv/bin/pip install --quiet -e ".[node,test]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
