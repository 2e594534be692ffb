#!/usr/bin/env bash
# Provides a redis-server for the tests without a global install: the Debian packages
# redis-tools (whose redis-check-rdb binary is redis-server under another name), libjemalloc2
# and liblzf1 are downloaded with `apt-get download` into $CACHE/debs and unpacked with
# `dpkg -x` into $CACHE/redis; $CACHE/redis/bin/redis-server is a wrapper that sets
# LD_LIBRARY_PATH and execs it. Needs no root when the apt package lists are present. If the
# unpacked binary cannot run (a missing system library) and we are root, falls back to
# `apt-get install -y redis-server` and links that binary instead.
#
# Idempotent: does nothing when the wrapper already runs. Prints the wrapper's path.
#   FLOODGATE_CACHE   cache root (default $HOME/.cache/floodgate)
set -euo pipefail

CACHE=${FLOODGATE_CACHE:-$HOME/.cache/floodgate}
DEBS=$CACHE/debs
ROOT=$CACHE/redis
WRAPPER=$ROOT/bin/redis-server
PACKAGES=(redis-tools libjemalloc2 liblzf1)

log() { printf '[redis] %s\n' "$*" >&2; }
works() { "$WRAPPER" --version >/dev/null 2>&1; }

if [[ -x $WRAPPER ]] && works; then
	echo "$WRAPPER"
	exit 0
fi

T0=$(date +%s)
mkdir -p "$DEBS" "$ROOT/bin"
write_wrapper() { # write_wrapper BINARY [LIBDIR]
	cat >"$WRAPPER.tmp" <<WRAP
#!/bin/sh
${2:+export LD_LIBRARY_PATH="$2\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"}
exec "$1" "\$@"
WRAP
	chmod +x "$WRAPPER.tmp"
	mv "$WRAPPER.tmp" "$WRAPPER"
}

if command -v apt-get >/dev/null; then
	if ! (cd "$DEBS" && apt-get download "${PACKAGES[@]}" >/dev/null 2>&1); then
		# No package lists yet (a fresh container): refresh them if we may.
		if [[ $(id -u) == 0 ]]; then
			log "apt-get update"
			apt-get update -qq >/dev/null
			(cd "$DEBS" && apt-get download "${PACKAGES[@]}" >/dev/null 2>&1)
		else
			log "apt-get download ${PACKAGES[*]} failed and we are not root to run apt-get update"
		fi
	fi
	for deb in "$DEBS"/*.deb; do
		[[ -e $deb ]] && dpkg -x "$deb" "$ROOT/x"
	done
	if [[ -x $ROOT/x/usr/bin/redis-check-rdb ]]; then
		# Redis chooses what to be from argv[0]: a link named redis-server runs the server.
		ln -sf redis-check-rdb "$ROOT/x/usr/bin/redis-server"
		write_wrapper "$ROOT/x/usr/bin/redis-server" "$ROOT/x/usr/lib/x86_64-linux-gnu:$ROOT/x/usr/lib"
	fi
fi

if ! works; then
	if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
		log "the unpacked redis-server does not run here; installing the redis-server package"
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null
		write_wrapper "$(command -v redis-server)"
	elif command -v redis-server >/dev/null; then
		write_wrapper "$(command -v redis-server)"
	fi
fi

if ! works; then
	log "no runnable redis-server: install one (apt-get install redis-server) or set FLOODGATE_REDIS_SERVER"
	exit 1
fi
log "$("$WRAPPER" --version | cut -d' ' -f1-3) ready in $(($(date +%s) - T0)) s"
echo "$WRAPPER"
