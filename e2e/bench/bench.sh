#!/usr/bin/env bash
# `make bench`: what the proxy costs on its hot path, against the mock upstream, on this
# machine. Release builds; everything on 127.0.0.1 ephemeral ports; everything it started is
# stopped at the end (or on error, or on Ctrl-C).
#
#   BENCH_SECONDS     length of each measured run (default 10)
#   BENCH_RATE        the fixed rate of the latency runs, req/s (default 1000)
#   BENCH_TRIALS      rounds of open-loop latency runs (default 5)
#   BENCH_MAX_TRIALS  rounds of closed-loop runs (default: BENCH_TRIALS, at most 3)
#   FLOODGATE_REDIS_SERVER  the redis-server to run (default: the one `make redis` unpacks)
#   BENCH_PROXY_BIN   the proxy binary to measure (default: the release build of this tree),
#                     e.g. an earlier commit's build, for before/after figures on one machine
#   BENCH_OUT         where results go (default $CACHE/bench)
#
# Four targets, all answered by one mock upstream (non-streaming OpenAI chat unless said):
#   direct   the mock itself;
#   pass     the proxy, model `passthrough`: an openai-compatible provider with no keys and no
#            rpm (no budget to keep);
#   pool     the same proxy, model `gpt-4o-mini`: an OpenAI provider with 4 keys of rpm 1000000
#            (key choice and exact accounting on every request, never a wait);
#   redis    a second proxy with the same pool and `--redis`: every request is one admission
#            script on a local redis-server, so its req/s is admissions/s.
# Runs:
#   1. open loop at BENCH_RATE on 16 connections, direct / pass / pool in rotating order,
#      BENCH_TRIALS rounds: p50/p99 and what the proxy adds to the direct run of the same round;
#   2. closed loop on 32 connections (as fast as it goes), direct / pass / pool / redis in
#      rotating order, BENCH_MAX_TRIALS rounds: req/s, CPU ms per request, RSS;
#   3. streamed (SSE) at BENCH_RATE: direct, pass, pool.
# The load generator, the mock and the proxies share the machine's cores; each run says how
# busy the machine was and how much the host stole. Results: $CACHE/bench/latest.txt, the raw
# loadgen lines in $CACHE/bench/latest.jsonl.
set -euo pipefail
cd "$(dirname "$0")/../.."
BENCH_NAME=bench
# shellcheck source=e2e/bench/lib.sh
source e2e/bench/lib.sh

CACHE=${CACHE:-$HOME/.cache/floodgate}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CACHE/target}
CARGO=${CARGO:-cargo}
SECONDS_PER_RUN=${BENCH_SECONDS:-10}
RATE=${BENCH_RATE:-1000}
TRIALS=${BENCH_TRIALS:-5}
MAX_TRIALS=${BENCH_MAX_TRIALS:-$((TRIALS < 3 ? TRIALS : 3))}
REDIS_SERVER=${FLOODGATE_REDIS_SERVER:-$CACHE/redis/bin/redis-server}
OUT=${BENCH_OUT:-$CACHE/bench}
BIN=$CARGO_TARGET_DIR/release
PROXY_BIN=${BENCH_PROXY_BIN:-$BIN/floodgate-proxy}
# A run that has not ended this long after its duration is killed (loadgen's own per-request
# timeout is 10 s): the bench never hangs. (`timeout --foreground` keeps loadgen in our process
# group, so that Ctrl-C reaches it at once.)
RUN_GRACE_S=30

if ! "$REDIS_SERVER" --version >/dev/null 2>&1; then
  echo "bench: no runnable redis-server at $REDIS_SERVER: run \`make redis\` or set FLOODGATE_REDIS_SERVER" >&2
  exit 1
fi

echo "bench: building release binaries"
"$CARGO" build -q --release -p floodgate-proxy --bin floodgate-proxy \
  -p floodgate-e2e --bin mock-providers --bin loadgen

mkdir -p "$OUT"
work=$(mktemp -d "$OUT/run.XXXXXX")
# Sends one command to the redis-server and prints the reply's lines (bounded: QUIT makes the
# server close the connection after answering, and `timeout` covers a server that does not).
redis_command() {
  timeout 5 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" && printf "%s\r\nQUIT\r\n" "$2" >&3 && tr -d "\r" <&3' \
    _ "$redis_port" "$1"
}

# Calls per command since the server started, as a JSON object: {"evalsha": N, ...}.
redis_calls() {
  redis_command 'INFO commandstats' |
    sed -nE 's/^cmdstat_([a-z|_-]+):calls=([0-9]+).*/"\1": \2/p' | paste -sd, - | sed 's/^/{/; s/$/}/'
}

start_redis() {
  local _
  for _ in 1 2 3 4 5; do
    redis_port=$(free_port)
    # The wrapper execs the server, so $! is the server's pid.
    "$REDIS_SERVER" --bind 127.0.0.1 --port "$redis_port" --save '' --appendonly no \
      --daemonize no --protected-mode yes >"$work/redis.log" 2>&1 &
    redis_pid=$!
    pids+=("$redis_pid")
    for _ in $(seq 100); do
      [[ $(redis_command PING 2>/dev/null | head -1) == +PONG ]] && return
      kill -0 "$redis_pid" 2>/dev/null || break
      sleep 0.1
    done
    kill "$redis_pid" 2>/dev/null || true
    wait "$redis_pid" 2>/dev/null || true
  done
  cat "$work/redis.log" >&2
  echo "bench: redis-server did not start" >&2
  exit 1
}

# The mock: unlimited rate, no request logging, requests without a key answered (the
# pass-through sends none, like a client of a self-hosted server); port 0, reported in its
# start-up line.
RUST_LOG=warn,mock_providers=info NO_COLOR=1 \
  "$BIN/mock-providers" --listen 127.0.0.1:0 --quiet --allow-missing-key >"$work/mock.log" 2>&1 &
mock_pid=$!
pids+=("$mock_pid")
mock_url=$(address_from_log "$mock_pid" "$work/mock.log" 'http://127\.0\.0\.1:[0-9]+')

start_redis

# One configuration for both proxies: a keyless pass-through and a pool of four keys with
# budget to spare, both on the mock; no cache policy (every request goes upstream).
mkdir -p "$work/config"
{
  printf 'apiVersion: v1\nkind: Secret\nmetadata: {name: bench-keys}\nstringData:\n'
  for i in 1 2 3 4; do printf '  k%s: bench-key-%s\n' "$i" "$i"; done
  printf -- '---\napiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {name: bench}\n'
  printf 'spec:\n  providers:\n'
  printf '  - name: passthrough\n    type: openai-compatible\n    baseUrl: "%s"\n' "$mock_url"
  printf '    models: [{name: passthrough}]\n'
  printf '  - name: openai\n    type: openai\n    baseUrl: "%s"\n' "$mock_url"
  printf '    models: [{name: gpt-4o-mini}]\n    keys:\n'
  for i in 1 2 3 4; do
    printf '    - {secretRef: {name: bench-keys, key: k%s}, rpm: 1000000}\n' "$i"
  done
} >"$work/config/gateway.yaml"

# Starts a proxy on the configuration (no config polling); sets $started_pid and $started_url.
start_proxy() {
  local name=$1 addr
  shift
  env -u RUST_LOG "$PROXY_BIN" --config "$work/config" --listen 127.0.0.1:0 \
    --watch-interval-ms 0 "$@" >"$work/$name.log" 2>&1 &
  started_pid=$!
  pids+=("$started_pid")
  addr=$(address_from_log "$started_pid" "$work/$name.log" 'listen=127\.0\.0\.1:[0-9]+')
  started_url=http://${addr#listen=}
  curl -sf --max-time 2 --retry 20 --retry-connrefused --retry-delay 0 "$started_url/readyz" >/dev/null
}
start_proxy proxy
proxy_pid=$started_pid proxy_url=$started_url
start_proxy proxy-redis --redis "redis://127.0.0.1:$redis_port"
redis_proxy_pid=$started_pid redis_proxy_url=$started_url

results=$OUT/latest.jsonl
: >"$results"

# loadgen against one target (direct, pass, pool, redis), with the CPU and memory of the
# processes that serve it; "proxy" is always the proxy in the path (for direct runs, the idle
# first proxy, which the report leaves out).
loadgen() {
  local side=$1 url=$proxy_url model=gpt-4o-mini pids_=(--pid "proxy=$proxy_pid")
  shift
  case $side in
    direct) url=$mock_url ;;
    pass) model=passthrough ;;
    pool) ;;
    redis) url=$redis_proxy_url pids_=(--pid "proxy=$redis_proxy_pid" --pid "redis=$redis_pid") ;;
  esac
  timeout --foreground -k 5 $((${SECONDS_PER_RUN%.*} + RUN_GRACE_S)) "$BIN/loadgen" "${pids_[@]}" \
    --pid "mock=$mock_pid" --header 'authorization: Bearer bench-direct' --model "$model" \
    --url "$url/v1/chat/completions" "$@"
}
# Runs one measured run and appends its JSON line (labelled "SIDE KIND[ #TRIAL]").
measure() {
  local side=$1 label="$1 $2"
  shift 2
  echo "bench: $label"
  loadgen "$side" --json --label "$label" --duration "$SECONDS_PER_RUN" "$@" >>"$results"
}
# The words after the first, rotated left by the first: each side runs first in turn.
rotate() {
  local n=$1
  shift
  local sides=("$@")
  n=$((n % ${#sides[@]}))
  echo "${sides[@]:n}" "${sides[@]:0:n}"
}

echo "bench: mock at $mock_url, proxy at $proxy_url, proxy with Redis at $redis_proxy_url" \
  "(redis-server on port $redis_port); $SECONDS_PER_RUN s per run;" \
  "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
# Warm-up (not recorded): connections, allocator, the proxies' upstream and Redis pools.
for side in direct pass pool redis; do
  loadgen "$side" --duration 1 --connections 8 >/dev/null
done

# Latency at a fixed rate, each round direct, pass and pool in rotating order: one round is at
# the mercy of whatever else the host runs (steal), so the report takes the median of the
# rounds that ran without steal, and shows every round.
for trial in $(seq "$TRIALS"); do
  for side in $(rotate $((trial - 1)) direct pass pool); do
    measure "$side" "rate #$trial" --rate "$RATE" --connections 16
  done
done
# Throughput, closed loop. The Redis admissions counted by the server are recorded beside each
# redis run, so the report can check that every request was one admission on Redis.
for trial in $(seq "$MAX_TRIALS"); do
  for side in $(rotate $((trial - 1)) direct pass pool redis); do
    [[ $side == redis ]] && before=$(redis_calls)
    measure "$side" "max #$trial" --connections 32
    if [[ $side == redis ]]; then
      printf '{"kind": "redis-calls", "label": "redis max #%s", "redis_calls_before": %s, "redis_calls_after": %s}\n' \
        "$trial" "$before" "$(redis_calls)" >>"$results"
    fi
  done
done
for side in direct pass pool; do
  measure "$side" stream --stream --rate "$RATE" --connections 16
done

python3 e2e/bench/report.py "$results" "$RATE" | tee "$OUT/latest.txt"
echo "bench: written to $OUT/latest.txt"
