#!/usr/bin/env bash
# `make run`: the proxy on examples/standalone, with the mock providers standing in for every
# provider that has no real key in the environment.
#
#   FLOODGATE_SECRET_PROVIDER_KEYS_{OPENAI,ANTHROPIC,GEMINI}  a real key: use the real service
#   FLOODGATE_OLLAMA_URL                                       a real Ollama (else the mock)
#   FLOODGATE_LISTEN                                           where the proxy listens (127.0.0.1:8080)
#   FLOODGATE_ADMIN_LISTEN                                     where /metrics is served (127.0.0.1:9090)
#
# The examples are copied to $CACHE/run/config with `baseUrl` pointing mocked providers at the
# mock; the proxy watches that copy (edit it there to see live reload). The proxy runs in the
# foreground; the mock is stopped when it exits (Ctrl-C included).
set -euo pipefail
cd "$(dirname "$0")/../.."

CACHE=${CACHE:-$HOME/.cache/floodgate}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CACHE/target}
CARGO=${CARGO:-cargo}
LISTEN=${FLOODGATE_LISTEN:-127.0.0.1:8080}
ADMIN_LISTEN=${FLOODGATE_ADMIN_LISTEN:-127.0.0.1:9090}
RUN_DIR=$CACHE/run
CONFIG_DIR=$RUN_DIR/config

# provider type in gateway.yaml -> the environment variable holding its real key
declare -A KEY_VAR=(
  [openai]=FLOODGATE_SECRET_PROVIDER_KEYS_OPENAI
  [anthropic]=FLOODGATE_SECRET_PROVIDER_KEYS_ANTHROPIC
  [gemini]=FLOODGATE_SECRET_PROVIDER_KEYS_GEMINI
)
mocked=()
for type in openai anthropic gemini; do
  [[ -n ${!KEY_VAR[$type]:-} ]] || mocked+=("$type")
done
[[ -n ${FLOODGATE_OLLAMA_URL:-} ]] || mocked+=(ollama)

build=(-p floodgate-proxy --bin floodgate-proxy)
((${#mocked[@]} == 0)) || build+=(-p floodgate-e2e --bin mock-providers)
"$CARGO" build -q "${build[@]}"

mkdir -p "$RUN_DIR"
rm -rf "$CONFIG_DIR"
cp -r examples/standalone "$CONFIG_DIR"

mock_pid=
cleanup() {
  if [[ -n $mock_pid ]]; then
    kill "$mock_pid" 2>/dev/null || true
    wait "$mock_pid" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mock_url=
if ((${#mocked[@]} > 0)); then
  # Port 0: the kernel picks a free port, which the mock's start-up line reports.
  log=$RUN_DIR/mock.log
  RUST_LOG=warn,mock_providers=info NO_COLOR=1 \
    "$CARGO_TARGET_DIR/debug/mock-providers" --listen 127.0.0.1:0 --quiet >"$log" 2>&1 &
  mock_pid=$!
  for _ in $(seq 100); do
    mock_url=$(grep -m1 -oE 'http://127\.0\.0\.1:[0-9]+' "$log" || true)
    [[ -z $mock_url ]] || break
    kill -0 "$mock_pid" 2>/dev/null || { cat "$log" >&2; echo "run: the mock providers did not start" >&2; exit 1; }
    sleep 0.1
  done
  [[ -n $mock_url ]] || { echo "run: the mock providers did not report their address" >&2; exit 1; }
fi

# Sets `baseUrl` of every provider of type $1 to $2 (replacing one the example already has).
set_base_url() {
  local type=$1 url=$2 file=$CONFIG_DIR/gateway.yaml
  sed -i -E "/^    type: $type\$/{n;/^    baseUrl: /d}" "$file"
  sed -i -E "s|^    type: $type\$|&\n    baseUrl: $url|" "$file"
  grep -qF "baseUrl: $url" "$file" || { echo "run: no provider of type $type in $file" >&2; exit 1; }
}

echo "floodgate run: config $CONFIG_DIR (a copy of examples/standalone), listening on $LISTEN"
# Points every LocalModelDeployment's endpoint annotation (routing.yaml) at $1.
set_local_endpoint() {
  sed -i -E "s|(floodgate.dev/endpoint: )\"[^\"]*\"|\1\"$1\"|" "$CONFIG_DIR/routing.yaml"
}

for type in "${mocked[@]}"; do
  set_base_url "$type" "$mock_url"
  [[ $type != ollama ]] || set_local_endpoint "$mock_url"
  if [[ $type == ollama ]]; then
    why="no FLOODGATE_OLLAMA_URL set"
  else
    why="no ${KEY_VAR[$type]} set"
  fi
  echo "  $type: $why, using the mock provider at $mock_url"
done
for type in openai anthropic gemini; do
  [[ -z ${!KEY_VAR[$type]:-} ]] || echo "  $type: using the real service with the key from ${KEY_VAR[$type]}"
done
if [[ -n ${FLOODGATE_OLLAMA_URL:-} ]]; then
  set_base_url ollama "$FLOODGATE_OLLAMA_URL"
  set_local_endpoint "$FLOODGATE_OLLAMA_URL"
  echo "  ollama: using $FLOODGATE_OLLAMA_URL (FLOODGATE_OLLAMA_URL)"
fi
# The demo tenants' client keys (tenants.yaml, keys in secrets.yaml): one per tier.
echo "  client keys (tenants.yaml; send one as 'Authorization: Bearer <key>' or 'x-api-key: <key>'):"
{ grep -E '^  (enterprise|pro|basic|free): sk-demo-' "$CONFIG_DIR/secrets.yaml" || true; } |
  while read -r tier key; do echo "    tenant demo-${tier%:} (tier ${tier%:}): $key"; done
echo "  routing (routing.yaml): see x-floodgate-class and x-floodgate-route with"
echo "       curl -si $LISTEN/v1/chat/completions -H 'authorization: Bearer sk-demo-basic' \\"
echo "         -H 'content-type: application/json' \\"
echo "         -d '{\"model\":\"smart\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}' | grep -i x-floodgate"
echo "  try: curl -s $LISTEN/v1/chat/completions -H 'authorization: Bearer sk-demo-pro' \\"
echo "         -H 'content-type: application/json' \\"
echo "         -d '{\"model\":\"smart\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}'"
echo "       curl -s $LISTEN/v1/embeddings -H 'authorization: Bearer sk-demo-pro' \\"
echo "         -H 'content-type: application/json' \\"
echo "         -d '{\"model\":\"text-embedding-3-small\",\"input\":[\"hi\"]}'"

# Not exec: the trap must outlive the proxy to stop the mock.
"$CARGO_TARGET_DIR/debug/floodgate-proxy" --config "$CONFIG_DIR" --listen "$LISTEN" \
  --admin-listen "$ADMIN_LISTEN" &
proxy_pid=$!
trap 'kill -TERM "$proxy_pid" 2>/dev/null || true; wait "$proxy_pid" || true; exit 130' INT TERM
wait "$proxy_pid"
