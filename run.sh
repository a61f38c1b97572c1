#!/usr/bin/env bash
# Set up (on first run) and start a relay and a node on this machine.
#   ./run.sh          serve the models enabled in config-cpu-local.yaml (fetches weights on first run)
#   ./run.sh --tiny   tiny random-weight checkpoints instead: checks the whole pipeline offline;
#                     the audio is noise
# The API is then at http://127.0.0.1:8000/v1 with the key printed below.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh

# Local secrets, made once and kept in .secrets (git-ignored); delete the file for new ones.
if [ ! -f .secrets ]; then
  umask 077
  .venv/bin/python - > .secrets <<'PY'
import secrets
print(f"RELAY_API_KEYS=local:sk-local-{secrets.token_urlsafe(24)}")
print(f"QWEN3_TTS_NODE_TOKEN={secrets.token_urlsafe(32)}")
PY
fi
set -a; source .secrets; set +a
export RELAY_NODE_TOKENS="home:${QWEN3_TTS_NODE_TOKEN}"
PORT=8000  # config-cpu-local.yaml and config-tiny.yaml dial this port

config=${QWEN3_TTS_CONFIG:-config-cpu-local.yaml}
if [ "${1:-}" = "--tiny" ]; then
  config=config-tiny.yaml
  [ -f .cache/tiny/custom_voice/config.json ] || .venv/bin/python -m local_node tiny-model .cache/tiny/custom_voice --type custom_voice >/dev/null
  [ -f .cache/tiny/base/config.json ] || .venv/bin/python -m local_node tiny-model .cache/tiny/base --type base >/dev/null
  echo "Pipeline check with tiny random-weight checkpoints: requests work end to end, the audio is noise." >&2
fi

.venv/bin/python -m relay --host 127.0.0.1 --port "$PORT" &
relay=$!
trap 'kill $relay 2>/dev/null; wait $relay 2>/dev/null || true' EXIT
echo "Relay on http://127.0.0.1:$PORT/v1 - API key: ${RELAY_API_KEYS#*:}" >&2
status=0
.venv/bin/python -m local_node --config "$config" || status=$?
if [ "$status" = 1 ]; then
  echo "The node could not load its models (see above). Offline? ./run.sh --tiny checks the pipeline without weights." >&2
fi
exit "$status"
