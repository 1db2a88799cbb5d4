#!/usr/bin/env bash
# cluster_compare.sh -- end-to-end relay throughput of tern alone, tern as a fleet node
# ([cluster] on a Redis this script starts on loopback), and Postfix, alternating in one run.
#
# Usage (from the repo root, as root, with Debian's postfix and redis-server installed;
# build first with `cargo build --release`):
#   benches/cluster_compare.sh [rounds]      # default 3 rounds
# Per round: tern-off, tern-on, postfix, each ../shared/bench/relay-bench end to end
# (N messages of 5 KB, C sessions). Prints relay-bench's result lines.
#
# Ports are its own (env-overridable) so it can run beside relay_compare.sh and the others
# (which use 2525/2526/8025):
#   CC_SMTP_PORT (default 2625)  tern's / Postfix's SMTP listener
#   CC_SINK_PORT (default 2626)  relay-bench's smtp-sink
#   CC_ADMIN_PORT (default 8125) tern's admin listener
#   CC_REDIS_PORT (default 6479) the fleet's redis-server
#   CC_N (default 20000), CC_C (default 50): messages and sessions per run
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH=$ROOT/../shared/bench
BIN=${CC_BIN:-$ROOT/target/release/tern}
ROUNDS=${1:-3}
SMTP_PORT=${CC_SMTP_PORT:-2625}
SINK_PORT=${CC_SINK_PORT:-2626}
ADMIN_PORT=${CC_ADMIN_PORT:-8125}
REDIS_PORT=${CC_REDIS_PORT:-6479}
N=${CC_N:-20000}
C=${CC_C:-50}
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 2; }
command -v redis-server >/dev/null || { echo "needs redis-server (apt-get install redis-server)" >&2; exit 2; }
WORK=$(mktemp -d /tmp/cluster-compare.XXXXXX)
REDIS_PID=
cleanup() { [ -n "$REDIS_PID" ] && kill "$REDIS_PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

# The shipped config on this script's ports.
sed -e "s/127\.0\.0\.1:2525/127.0.0.1:$SMTP_PORT/" \
    -e "s/127\.0\.0\.1:2526/127.0.0.1:$SINK_PORT/" \
    -e "s/127\.0\.0\.1:8025/127.0.0.1:$ADMIN_PORT/" \
    "$ROOT/config/tern.toml" > "$WORK/off.toml"
# A fleet node: the keys every node shares come from files (made below), [cluster] on the
# script's Redis (shaping.shared follows it: rates and warm-up counts in Redis too).
sed -e '/^\[bounce\]$/a origin_key_file = "../keys/origin.key"' \
    -e '/^\[unsubscribe\]$/a key_file = "../keys/unsubscribe.key"' \
    -e 's|^secret_file = "../data/tracking.key"|secret_file = "../keys/tracking.key"|' \
    "$WORK/off.toml" > "$WORK/on.toml"
printf '\n[cluster]\nurl = "redis://127.0.0.1:%s"\nnode = "bench"\nprefix = "bench"\n' "$REDIS_PORT" >> "$WORK/on.toml"

# AOF with fsync every second, as docs/OPERATIONS.md recommends for a fleet.
mkdir -p "$WORK/redis"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly yes \
  --appendfsync everysec --dir "$WORK/redis" > "$WORK/redis.log" 2>&1 &
REDIS_PID=$!
for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done

run_tern() { # label config
  local label=$1 cfg=$2
  rm -rf "$WORK/run"; mkdir -p "$WORK/run/config" "$WORK/run/keys"
  for k in origin unsubscribe tracking; do
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$WORK/run/keys/$k.key"
    chmod 600 "$WORK/run/keys/$k.key"
  done
  redis-cli -p "$REDIS_PORT" flushall > /dev/null
  cp "$cfg" "$WORK/run/config/tern.toml"
  (cd "$WORK/run" && exec "$BIN" serve --config "$WORK/run/config/tern.toml" > "$WORK/tern.log" 2>&1) &
  local pid=$!
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$SMTP_PORT") 2>/dev/null && break; sleep 0.1; done
  "$BENCH/relay-bench" -p "$SINK_PORT" -n "$N" -T 300 -c "$C" -L "$label" 127.0.0.1:"$SMTP_PORT" 2>&1 \
    | grep "^relay-bench: target" || { echo "$label failed:"; tail -5 "$WORK/tern.log"; }
  kill -TERM "$pid"; wait "$pid"
}
run_postfix() { # label
  timeout 900 "$BENCH/postfix-baseline" -P "$SMTP_PORT" -p "$SINK_PORT" -- -n "$N" -T 300 -c "$C" 2>&1 \
    | grep "^relay-bench: target" | sed "s/label=.*/label=$1/"
}

echo "# $(date -u +%FT%TZ) $(nproc) cores; load: $(cut -d' ' -f1-3 /proc/loadavg)"
for r in $(seq "$ROUNDS"); do
  run_tern "tern-off-r$r" "$WORK/off.toml"
  run_tern "tern-on-r$r" "$WORK/on.toml"
  run_postfix "postfix-r$r"
  echo "# load: $(cut -d' ' -f1-3 /proc/loadavg)"
done
echo "# redis used_memory after the last run: $(redis-cli -p "$REDIS_PORT" info memory | grep '^used_memory_human' | tr -d '\r')"
