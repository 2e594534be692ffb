# Sourced by the bench scripts (bench.sh, tiers.sh, seed.sh): the processes a script starts
# (`pids+=("$pid")`) are stopped and its work directory (`work`, once set) removed when it
# exits, however it exits; start-up addresses are read from a process's log; a free port.
# Set BENCH_NAME (the prefix of messages) before sourcing.

pids=()
work=
# Stops every process in `pids` (SIGTERM, then SIGKILL for one still there after 5 s) and
# removes `work`.
bench_cleanup() {
  local pid alive _
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for _ in $(seq 50); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ -n $work ]]; then rm -rf "$work"; fi
}
trap bench_cleanup EXIT
trap 'exit 130' INT TERM

# Waits (10 s at most) for a process's start-up line in its log and prints the first match of
# a pattern; fails, showing the log, if the process exits or never reports it.
address_from_log() {
  local pid=$1 log=$2 pattern=$3 found _
  for _ in $(seq 100); do
    found=$(grep -m1 -oE "$pattern" "$log" || true)
    if [[ -n $found ]]; then echo "$found"; return; fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  cat "$log" >&2
  echo "${BENCH_NAME:-bench}: $log: the process did not report its address" >&2
  exit 1
}

# A free port on 127.0.0.1, for redis-server, which cannot report a port it chose itself. The
# port may be taken before it is bound: callers try a few.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
