#!/usr/bin/env bash
# Set up (on first run) and run the model speed benchmark: official qwen-tts against our
# streaming path on random weights of the real 0.6B and 1.7B shapes. Arguments go to
# bench/speed.py (--help). Takes 15-30 minutes on 2 cores; results in bench/results/.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh
.venv/bin/python -c "import matplotlib" 2>/dev/null || .venv/bin/pip install --quiet -e ".[bench]"
# `./bench.sh tunnel ...`: the relay and tunnel benchmark (bench/tunnel.py) instead;
# `./bench.sh kernels ...`: the products alone, every kernel tier (bench/kernels.py);
# `./bench.sh live ...`: how soon speech starts while the text is written (bench/live.py).
if [ "${1:-}" = "tunnel" ] || [ "${1:-}" = "kernels" ] || [ "${1:-}" = "live" ]; then
    bench=$1
    shift
    exec .venv/bin/python -m "bench.$bench" "$@"
fi
exec .venv/bin/python -m bench.speed "$@"
