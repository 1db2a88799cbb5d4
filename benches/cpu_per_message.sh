#!/usr/bin/env bash
# cpu_per_message.sh -- where tern's CPU goes per relayed message (loopback only).
#
# Usage (from the repo root, as root, after `cargo build --release`):
#   benches/cpu_per_message.sh [sessions] [config]       # default 50, config/tern.toml
#   PERF=1 benches/cpu_per_message.sh 50                 # also `perf record` the daemon
#   N=20000 EXTRA=-k benches/cpu_per_message.sh 20       # relay-bench's -k (reuse inbound)
#
# Runs ../shared/bench/relay-bench (N x 5 KB, default 20,000) against tern from an empty spool
# in a temp dir and prints, besides relay-bench's line:
#   - daemon CPU per message: (utime+stime over the run) / N, from /proc/PID/stat;
#   - the group-commit counters over the run (writes, rounds);
#   - per thread name: CPU ticks (1/100 s) and voluntary/involuntary context switches
#     (/proc/PID/task/*/status), which shows wake-up traffic such as sled's IO pool.
# With PERF=1 the profile goes to target/cpu_per_message.perf.data (`perf report -i ...
# --sort comm,sym`); the release profile keeps line tables for it.
# With HARNESS=1 it then runs the harness alone (smtp-source straight into smtp-sink, same N,
# sessions and EXTRA) and prints the CPU that one SMTP hop costs its two endpoints together
# (utime+stime of relay-bench and its children: smtp-source, smtp-sink, and relay-bench's own
# polling, so a slight overestimate) and tern's end-to-end rate as a share of that ceiling.
# A relay is both endpoints once (the server of the inbound hop, the client of the outbound
# one), so the hop's cost is the floor under a relay's CPU per message before any spooling.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${BIN:-$ROOT/target/release/tern}
BENCH=$ROOT/../shared/bench
C=${1:-50}
CFG=${2:-$ROOT/config/tern.toml}
N=${N:-20000}
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 2; }
WORK=$(mktemp -d /tmp/cpu-per-message.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/run/config"
cp "$CFG" "$WORK/run/config/tern.toml"
(cd "$WORK/run" && exec "$BIN" serve --config "$WORK/run/config/tern.toml" > "$WORK/tern.log" 2>&1) &
pid=$!
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/2525) 2>/dev/null && (exec 3<>/dev/tcp/127.0.0.1/8025) 2>/dev/null && break; sleep 0.1; done
counters() {
  curl -s 127.0.0.1:8025/metrics |
    awk '/^tern_spool_commits_total /{w=$2} /^tern_spool_commit_batch_writes_count /{r=$2} END {printf "%d %d", w, r}'
}
read -r w0 r0 <<< "$(counters)"
t0=$(awk '{print $14+$15}' "/proc/$pid/stat")
if [ "${PERF:-0}" = 1 ]; then
  perf record -F 999 -g --call-graph dwarf,16384 -p "$pid" -o "$ROOT/target/cpu_per_message.perf.data" 2>/dev/null &
  perf_pid=$!
fi
# shellcheck disable=SC2086
"$BENCH/relay-bench" -n "$N" -T 300 -c "$C" ${EXTRA:-} 127.0.0.1:2525 2>&1 | grep "^relay-bench: target" | tee "$WORK/tern.result"
t1=$(awk '{print $14+$15}' "/proc/$pid/stat")
[ "${PERF:-0}" = 1 ] && { kill -INT "$perf_pid"; wait "$perf_pid"; }
read -r w1 r1 <<< "$(counters)"
echo "cpu_ms_per_msg=$(echo "scale=4; ($t1-$t0)*1000/100/$N" | bc) commits=$((w1-w0)) rounds=$((r1-r0))"
for t in /proc/"$pid"/task/*; do
  echo "$(cat "$t/comm" | tr ' ' _) $(awk '{print $14+$15}' "$t/stat") $(awk '/^voluntary_ctxt/{v=$2} /^nonvoluntary_ctxt/{n=$2} END {print v, n}' "$t/status")"
done | awk '{c[$1]+=$2; v[$1]+=$3; n[$1]+=$4} END {for (k in c) printf "  %-18s cpu_ticks=%-5d voluntary_cs=%-7d involuntary_cs=%d\n", k, c[k], v[k], n[k]}' | sort -t= -k2 -nr
kill -TERM "$pid"; wait "$pid"
if [ "${HARNESS:-0}" = 1 ]; then
  # relay-bench's sink port (2526) is free again once tern is gone.
  # shellcheck disable=SC2086
  /usr/bin/time -f "harness_cpu_s=%U+%S" -o "$WORK/harness.time" \
    "$BENCH/relay-bench" -n "$N" -T 300 -c "$C" ${EXTRA:-} 127.0.0.1:2526 2>&1 | grep "^relay-bench: target" | tee "$WORK/harness.result"
  cpu=$(sed -n 's/^harness_cpu_s=//p' "$WORK/harness.time" | bc)
  ceiling=$(sed -n 's/.* e2e_msgs_per_s=\([0-9.]*\).*/\1/p' "$WORK/harness.result")
  e2e=$(sed -n 's/.* e2e_msgs_per_s=\([0-9.]*\).*/\1/p' "$WORK/tern.result")
  echo "harness_cpu_ms_per_msg=$(echo "scale=4; $cpu*1000/$N" | bc) harness_msgs_per_s=$ceiling tern_e2e_share_of_ceiling=$(echo "scale=3; $e2e/$ceiling" | bc)"
fi
