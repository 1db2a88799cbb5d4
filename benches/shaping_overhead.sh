#!/usr/bin/env bash
# shaping_overhead.sh -- the scheduling cost of traffic shaping, end to end (loopback only).
#
# Usage (from the repo root; build first, `cargo build --release`, or pass another binary):
#   benches/shaping_overhead.sh [rounds] [messages] [binary]     # defaults: 2, 20000, release
# RELAY_BENCH_DIR overrides where relay-bench lives (default ../shared/bench).
#
# Alternates relay-bench runs (-c 20) of tern with config/tern.toml as it is (built-in
# providers only; sink.test unshaped) and with 10,000 [[shaping.domains]] rules, one of them
# for sink.test (a rate and connection cap high enough not to bind: what is measured is the
# bookkeeping, GCRA token and connection slot per message). With redis-server on PATH, a third
# run per round: the 10,000 rules with the cluster store (`shaping.shared`) on a redis-server
# started here on a free loopback port. Prints relay-bench's result lines.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH=${RELAY_BENCH_DIR:-$ROOT/../shared/bench}
ROUNDS=${1:-2}
N=${2:-20000}
BIN=$(realpath "${3:-$ROOT/target/release/tern}")
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 2; }
WORK=$(mktemp -d /tmp/shaping-overhead.XXXXXX)
REDIS_PID=
trap '[ -n "$REDIS_PID" ] && kill "$REDIS_PID"; rm -rf "$WORK"' EXIT

cp "$ROOT/config/tern.toml" "$WORK/plain.toml"
{
  cat "$ROOT/config/tern.toml"
  printf '\n[[shaping.domains]]\ndomain = "sink.test"\nrate = "1000000/min"\nmax_connections = 1000\n'
  for i in $(seq 2 10000); do
    printf '\n[[shaping.domains]]\ndomain = "d%d.test"\nrate = "600/min"\nmax_connections = 4\n' "$i"
  done
} > "$WORK/shaped.toml"

if command -v redis-server >/dev/null 2>&1; then
  RPORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  redis-server --port "$RPORT" --save "" --appendonly no --bind 127.0.0.1 > "$WORK/redis.log" 2>&1 &
  REDIS_PID=$!
  sed "s|^\[shaping\]\$|[shaping]\nshared = \"redis://127.0.0.1:$RPORT\"|" "$WORK/shaped.toml" > "$WORK/shared.toml"
fi

run() { # label config
  rm -rf "$WORK/run"; mkdir -p "$WORK/run/config"
  # Paths in a config resolve against its directory: config/tern.toml keeps its files in
  # ../data, so a copy in run/config/ puts them (the spool) in the empty run/data.
  cp "$2" "$WORK/run/config/tern.toml"
  (cd "$WORK/run" && exec "$BIN" serve --config "$WORK/run/config/tern.toml" > "$WORK/tern.log" 2>&1) &
  local pid=$!
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/2525) 2>/dev/null && (exec 3<>/dev/tcp/127.0.0.1/8025) 2>/dev/null && break; sleep 0.1; done
  "$BENCH/relay-bench" -n "$N" -T 300 -L "$1" -c 20 127.0.0.1:2525 2>&1 | grep "^relay-bench: target"
  kill -TERM "$pid"; wait "$pid"
}

for r in $(seq "$ROUNDS"); do
  run "plain-r$r" "$WORK/plain.toml"
  run "shaped10k-r$r" "$WORK/shaped.toml"
  [ -n "$REDIS_PID" ] && run "shared10k-r$r" "$WORK/shared.toml"
done
