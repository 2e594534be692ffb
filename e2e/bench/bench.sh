#!/usr/bin/env bash
# `make bench`: the proxy's added latency and its throughput, against the mock upstream, on
# this machine. Release builds; everything on 127.0.0.1; everything stopped at the end.
#
#   BENCH_SECONDS   length of each measured run (default 10)
#   BENCH_RATE      the fixed rate of the latency runs, req/s (default 1000)
#   BENCH_TRIALS    direct/proxy pairs of latency runs (default 5)
#
# Measures, non-streaming OpenAI chat completions unless said otherwise:
#   1. direct to the mock, then through the proxy, open loop at BENCH_RATE, BENCH_TRIALS times:
#      p50/p99 and the difference (the proxy's added latency), and its median over the pairs
#      that saw no host steal (every pair is shown);
#   2. both again closed loop on 32 connections: maximum req/s, proxy CPU ms/request, RSS;
#   3. streamed (SSE) at BENCH_RATE, direct and through the proxy.
# The load generator, the mock and the proxy share the machine's cores; the table says how
# busy the machine was during each run. Results: $CACHE/bench/latest.txt (and .jsonl).
set -euo pipefail
cd "$(dirname "$0")/../.."

CACHE=${CACHE:-$HOME/.cache/floodgate}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CACHE/target}
CARGO=${CARGO:-cargo}
SECONDS_PER_RUN=${BENCH_SECONDS:-10}
RATE=${BENCH_RATE:-1000}
TRIALS=${BENCH_TRIALS:-5}
OUT=$CACHE/bench
BIN=$CARGO_TARGET_DIR/release

echo "bench: building release binaries"
"$CARGO" build -q --release -p floodgate-proxy --bin floodgate-proxy \
  -p floodgate-e2e --bin mock-providers --bin loadgen

mkdir -p "$OUT"
work=$(mktemp -d "$OUT/run.XXXXXX")
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Waits for a process's start-up line in its log and prints the first match of a pattern.
address_from_log() {
  local pid=$1 log=$2 pattern=$3 found
  for _ in $(seq 100); do
    found=$(grep -m1 -oE "$pattern" "$log" || true)
    if [[ -n $found ]]; then echo "$found"; return; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  cat "$log" >&2
  echo "bench: $log: the process did not report its address" >&2
  exit 1
}

# The mock: unlimited rate, no request logging; port 0, reported in its start-up line.
RUST_LOG=warn,mock_providers=info NO_COLOR=1 \
  "$BIN/mock-providers" --listen 127.0.0.1:0 --quiet >"$work/mock.log" 2>&1 &
mock_pid=$!
pids+=("$mock_pid")
mock_url=$(address_from_log "$mock_pid" "$work/mock.log" 'http://127\.0\.0\.1:[0-9]+')

# The proxy: one OpenAI provider on the mock, four keys with budget to spare, no cache policy
# (every request goes upstream), no config polling.
mkdir -p "$work/config"
{
  printf 'apiVersion: v1\nkind: Secret\nmetadata: {name: bench-keys}\nstringData:\n'
  for i in 1 2 3 4; do printf '  k%s: bench-key-%s\n' "$i" "$i"; done
  printf -- '---\napiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {name: bench}\n'
  printf 'spec:\n  providers:\n  - name: openai\n    type: openai\n    baseUrl: "%s"\n' "$mock_url"
  printf '    models: [{name: gpt-4o-mini}]\n    keys:\n'
  for i in 1 2 3 4; do
    printf '    - {secretRef: {name: bench-keys, key: k%s}, rpm: 1000000}\n' "$i"
  done
} >"$work/config/gateway.yaml"
env -u RUST_LOG "$BIN/floodgate-proxy" --config "$work/config" --listen 127.0.0.1:0 \
  --watch-interval-ms 0 >"$work/proxy.log" 2>&1 &
proxy_pid=$!
pids+=("$proxy_pid")
proxy_addr=$(address_from_log "$proxy_pid" "$work/proxy.log" 'listen=127\.0\.0\.1:[0-9]+')
proxy_url=http://${proxy_addr#listen=}
curl -sf --retry 20 --retry-connrefused --retry-delay 0 "$proxy_url/readyz" >/dev/null

results=$OUT/latest.jsonl
: >"$results"
loadgen() {
  "$BIN/loadgen" --pid "proxy=$proxy_pid" --pid "mock=$mock_pid" \
    --header 'authorization: Bearer bench-direct' --model gpt-4o-mini "$@"
}
measure() {
  local label=$1
  shift
  echo "bench: $label"
  loadgen --json --label "$label" --duration "$SECONDS_PER_RUN" "$@" >>"$results"
}

echo "bench: mock at $mock_url, proxy at $proxy_url; $SECONDS_PER_RUN s per run; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
# Warm-up (not recorded): connections, allocator, the proxy's upstream pool.
loadgen --duration 2 --connections 8 --url "$mock_url/v1/chat/completions" >/dev/null
loadgen --duration 2 --connections 8 --url "$proxy_url/v1/chat/completions" >/dev/null

# Latency at a fixed rate, direct and through the proxy in alternation: one pair is at the
# mercy of whatever else the host runs (steal), so the report takes the median of the pairs
# that ran without steal, and shows every pair.
# The order alternates too, so that neither side always runs first.
for trial in $(seq "$TRIALS"); do
  sides=(direct proxy)
  if ((trial % 2 == 0)); then sides=(proxy direct); fi
  for side in "${sides[@]}"; do
    if [[ $side == direct ]]; then url=$mock_url; else url=$proxy_url; fi
    measure "$side rate #$trial" --rate "$RATE" --connections 16 --url "$url/v1/chat/completions"
  done
done
measure "direct max" --connections 32 --url "$mock_url/v1/chat/completions"
measure "proxy max" --connections 32 --url "$proxy_url/v1/chat/completions"
measure "direct stream" --stream --rate "$RATE" --connections 16 --url "$mock_url/v1/chat/completions"
measure "proxy stream" --stream --rate "$RATE" --connections 16 --url "$proxy_url/v1/chat/completions"

python3 e2e/bench/report.py "$results" "$RATE" | tee "$OUT/latest.txt"
echo "bench: written to $OUT/latest.txt"
