#!/usr/bin/env bash
# `make fuzz`: every cargo-fuzz target of fuzz/Cargo.toml, one after the other, each for
# FUZZ_SECONDS (default 60) in one libFuzzer process on one core. Needs the nightly
# toolchain (rustup); installs cargo-fuzz into $CACHE/cargo on first use.
#
#   FUZZ_SECONDS=600 make fuzz              # longer
#   FUZZ_TARGETS="chat_request" make fuzz   # some targets only
#
# The corpus each target grows is kept in $FUZZ_DIR/corpus/<target> (default
# ~/.cache/floodgate/fuzz) and reused by the next run; the committed seeds in
# fuzz/seeds/<target> are read, never written. Crashing inputs land in
# $FUZZ_DIR/artifacts/<target>/; keep one as a regression case in fuzz/regressions/<target>/
# once fixed (the smoke test in `make test` replays that folder). Logs: $FUZZ_DIR/logs.
# Prints executions per target and exits non-zero if any target failed.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
CACHE=${CACHE:-$HOME/.cache/floodgate}
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
FUZZ_TOOLCHAIN=${FUZZ_TOOLCHAIN:-nightly}
FUZZ_DIR=${FUZZ_DIR:-$CACHE/fuzz}
CARGO_FUZZ_VERSION=0.13.2
target_dir=${CARGO_TARGET_DIR:-$CACHE/target}
export PATH="$CACHE/cargo/bin:$PATH"

if ! rustup run "$FUZZ_TOOLCHAIN" rustc --version >/dev/null 2>&1; then
    echo "make fuzz needs the $FUZZ_TOOLCHAIN toolchain: rustup toolchain install $FUZZ_TOOLCHAIN" >&2
    exit 1
fi
if ! cargo-fuzz --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
    # Its own temporary build folder, not the workspace's target directory.
    env -u CARGO_TARGET_DIR cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION" \
        --root "$CACHE/cargo"
fi

# The workspace's lock file, so that the fuzzed code is built with the dependency versions
# the gateway ships with; cargo adds libfuzzer-sys to it.
cp Cargo.lock fuzz/Cargo.lock

targets=${FUZZ_TARGETS:-$(sed -n 's/^path = "fuzz_targets\/\(.*\)\.rs"$/\1/p' fuzz/Cargo.toml)}

# No sanitizer: the proxy forbids unsafe code, so AddressSanitizer would find nothing the
# Rust checks do not, at half the speed. Debug assertions on: integer overflow panics.
fuzz_flags=(--fuzz-dir fuzz --sanitizer none --debug-assertions --target-dir "$target_dir")
cargo "+$FUZZ_TOOLCHAIN" fuzz build "${fuzz_flags[@]}"

mkdir -p "$FUZZ_DIR/logs"
summary=()
failed=0
total=0
for target in $targets; do
    corpus=$FUZZ_DIR/corpus/$target
    artifacts=$FUZZ_DIR/artifacts/$target
    log=$FUZZ_DIR/logs/$target.log
    mkdir -p "$corpus" "$artifacts"
    echo "fuzz: $target for ${FUZZ_SECONDS}s (log: $log)"
    status=ok
    # One process, one core (libFuzzer's default; -jobs would only add a supervisor).
    # An input that takes over 10 s, or 2 GiB, counts as a failure.
    if ! cargo "+$FUZZ_TOOLCHAIN" fuzz run "${fuzz_flags[@]}" "$target" "$corpus" "fuzz/seeds/$target" -- \
        -max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="$artifacts/" >"$log" 2>&1; then
        status=FAILED
        failed=1
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    runs=${runs:-0}
    total=$((total + runs))
    summary+=("$(printf '%-20s %12s runs  %6s corpus files  %s' "$target" "$runs" \
        "$(find "$corpus" -type f | wc -l)" "$status")")
done

echo
printf '%s\n' "${summary[@]}"
printf '%-20s %12s runs\n' total "$total"
if [ "$failed" -ne 0 ]; then
    echo "fuzz: a target failed; see its log and the input in $FUZZ_DIR/artifacts" >&2
    exit 1
fi
