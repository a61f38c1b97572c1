#!/usr/bin/env bash
# Set up (on first run), lint and type-check, then run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh
.venv/bin/ruff check --quiet .
.venv/bin/ruff format --check --quiet .   # `ruff format .` fixes what this reports
.venv/bin/mypy          # the tunnel package and the relay (pyproject.toml: [tool.mypy])
exec .venv/bin/python -m pytest "$@"
