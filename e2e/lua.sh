#!/usr/bin/env bash
# Provides a Lua interpreter for the Argo CD health check tests without a global install:
# Debian's lua5.4 and liblua5.4-0 are downloaded with `apt-get download` into $CACHE/debs and
# unpacked with `dpkg -x` into $CACHE/lua; $CACHE/lua/bin/lua is a wrapper that sets
# LD_LIBRARY_PATH. Idempotent; prints the wrapper's path.
#   FLOODGATE_CACHE   cache root (default $HOME/.cache/floodgate)
set -euo pipefail

CACHE=${FLOODGATE_CACHE:-$HOME/.cache/floodgate}
DEBS=$CACHE/debs
ROOT=$CACHE/lua
WRAPPER=$ROOT/bin/lua

if [[ -x $WRAPPER ]] && "$WRAPPER" -v >/dev/null 2>&1; then
	echo "$WRAPPER"
	exit 0
fi
# Tests run in parallel and may all ask at once on a cold cache: one unpacks, the others wait
# for it and then find it ready.
mkdir -p "$CACHE"
exec 9>"$ROOT.lock"
flock 9
if [[ -x $WRAPPER ]] && "$WRAPPER" -v >/dev/null 2>&1; then
	echo "$WRAPPER"
	exit 0
fi
T0=$(date +%s)
mkdir -p "$DEBS"
(cd "$DEBS" && apt-get download lua5.4 liblua5.4-0 >&2)
rm -rf "$ROOT.tmp" && mkdir -p "$ROOT.tmp/bin"
for p in lua5.4 liblua5.4-0; do
	dpkg -x "$(ls -t "$DEBS"/${p}_*.deb | head -1)" "$ROOT.tmp"
done
lib=$(dirname "$(find "$ROOT.tmp" -name 'liblua5.4.so.0*' | head -1)")
cat >"$ROOT.tmp/bin/lua" <<WRAP
#!/bin/sh
export LD_LIBRARY_PATH="${lib/#$ROOT.tmp/$ROOT}\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$ROOT/usr/bin/lua5.4" "\$@"
WRAP
chmod +x "$ROOT.tmp/bin/lua"
rm -rf "$ROOT" && mv "$ROOT.tmp" "$ROOT"
"$WRAPPER" -v >&2
printf '[lua] ready in %ss: %s\n' "$(( $(date +%s) - T0 ))" "$WRAPPER" >&2
echo "$WRAPPER"
