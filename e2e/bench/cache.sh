#!/usr/bin/env bash
# `make bench-cache`: the semantic cache's quality on the fow-cache pairs (PyPI package
# fow-cache 0.1.0, its data CC BY 4.0 by Mabon ap Gwyn; fetched with `pip download` into
# $CACHE/bench-data, never committed), then cache latency through the gateway (release build),
# the index's lookup at 100k entries, and memory per entry. The report goes to stderr and to
# $CACHE/bench/cache.txt, with the load average (figures on a shared machine vary with it).
set -euo pipefail
cd "$(dirname "$0")/../.."
CACHE=${CACHE:-$HOME/.cache/floodgate}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CACHE/target}
CARGO=${CARGO:-cargo}
data=$CACHE/bench-data/fow-cache-0.1.0
if [[ ! -s $data/fow_cache/data/pairs.jsonl ]]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "bench-cache: fetching fow-cache 0.1.0 (the pairs, CC BY 4.0) into $data" >&2
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    fow-cache==0.1.0 -d "$tmp"
  mkdir -p "$data"
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
    "$(ls "$tmp"/fow_cache-*.whl)" "$data"
fi
export FLOODGATE_FOW_DATA=$data/fow_cache/data
export FLOODGATE_EMBEDDING_MODEL_DIR=${FLOODGATE_EMBEDDING_MODEL_DIR:-$CACHE/models/all-MiniLM-L6-v2}
mkdir -p "$CACHE/bench"
out=$CACHE/bench/cache.txt
echo "bench-cache: $(date -u +%FT%TZ), $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$out" >&2
"$CARGO" test -q --release -p floodgate-e2e --test cache_bench -- --ignored --nocapture --test-threads 1 2>&1 \
  | grep -v '^running\|^test \|^$\|test result' | tee -a "$out" >&2
