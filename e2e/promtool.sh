#!/usr/bin/env bash
# Provides promtool for `promtool test rules` without a global install: Debian's `prometheus`
# package is downloaded with `apt-get download` into $CACHE/debs and unpacked with `dpkg -x`
# into $CACHE/promtool (promtool is a static Go binary: no libraries needed).
# Idempotent: does nothing when it already runs. Prints its path.
#   FLOODGATE_CACHE   cache root (default $HOME/.cache/floodgate)
set -euo pipefail

CACHE=${FLOODGATE_CACHE:-$HOME/.cache/floodgate}
DEBS=$CACHE/debs
ROOT=$CACHE/promtool
BIN=$ROOT/usr/bin/promtool

if [[ -x $BIN ]] && "$BIN" --version >/dev/null 2>&1; then
	echo "$BIN"
	exit 0
fi
# Tests run in parallel and may all ask at once on a cold cache: one unpacks, the others wait
# for it and then find it ready.
mkdir -p "$CACHE"
exec 9>"$ROOT.lock"
flock 9
if [[ -x $BIN ]] && "$BIN" --version >/dev/null 2>&1; then
	echo "$BIN"
	exit 0
fi
T0=$(date +%s)
mkdir -p "$DEBS" "$ROOT"
(cd "$DEBS" && apt-get download prometheus >&2)
deb=$(ls -t "$DEBS"/prometheus_*.deb | head -1)
dpkg -x "$deb" "$ROOT.tmp"
rm -rf "$ROOT" && mv "$ROOT.tmp" "$ROOT"
"$BIN" --version >&2
printf '[promtool] ready in %ss: %s\n' "$(( $(date +%s) - T0 ))" "$BIN" >&2
echo "$BIN"
