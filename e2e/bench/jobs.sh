#!/usr/bin/env bash
# `make bench` (jobs part) or `make bench-jobs`: the async jobs figures of issue 11, from the
# ignored test `bench_job_acceptance_and_drain` in e2e/tests/jobs_api.rs, against a release
# build of the proxy: POST /v1/jobs acceptance latency (2,000 sequential requests, memory
# store and Redis store; p50/p99/max) and how many queued jobs per second one replica with 16
# workers drains from Redis (mock provider answering at once). Prints the machine's load
# average before and after: the figures mean little on a loaded machine.
#
#   BENCH_PROXY_BIN      the proxy binary (default: the release build of this tree)
#   BENCH_JOBS_PROFILE   the profile of the test harness (the client and the mock provider):
#                        `release` (default) or `dev` (quicker to build; the client then adds
#                        its own debug-build overhead to each measured request)
set -euo pipefail
cd "$(dirname "$0")/../.."

CACHE=${CACHE:-$HOME/.cache/floodgate}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CACHE/target}
CARGO=${CARGO:-cargo}
export FLOODGATE_REDIS_SERVER=${FLOODGATE_REDIS_SERVER:-$CACHE/redis/bin/redis-server}
PROFILE=${BENCH_JOBS_PROFILE:-release}

if [[ -z ${BENCH_PROXY_BIN:-} ]]; then
  echo "bench-jobs: building the release proxy"
  "$CARGO" build -q --release -p floodgate-proxy --bin floodgate-proxy
  BENCH_PROXY_BIN=$CARGO_TARGET_DIR/release/floodgate-proxy
fi
export FLOODGATE_PROXY_BIN=$BENCH_PROXY_BIN

echo "bench-jobs: proxy $FLOODGATE_PROXY_BIN, harness profile $PROFILE, $(nproc) CPUs"
echo "bench-jobs: load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
"$CARGO" test -q --profile "$PROFILE" -p floodgate-e2e --test jobs_api \
  -- --ignored --exact bench_job_acceptance_and_drain --nocapture 2>&1 |
  grep -E '^(POST /v1/jobs|drained)|test result|panicked|FAILED'
echo "bench-jobs: load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
