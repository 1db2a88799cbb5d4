#!/usr/bin/env bash
# tern_ab.sh -- two tern binaries (say, before and after a change) alternating on this machine,
# end to end and with Ed25519 DKIM, so a shared, noisy machine affects both alike.
#
# Usage (from the repo root; build both first):
#   benches/tern_ab.sh OLD_BIN NEW_BIN [rounds]      # default 3 rounds
#
# Per round and per binary, ../shared/bench/relay-bench (20,000 x 5 KB, loopback only):
# end to end at 20 and 50 sessions, then DKIM-signed at 20 and 50 sessions, each run from an
# empty spool in a temp dir, on config/tern.toml. Prints relay-bench's result lines, labelled
# old-... / new-...
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH=$ROOT/../shared/bench
OLD=${1:?old binary}
NEW=${2:?new binary}
ROUNDS=${3:-3}
WORK=$(mktemp -d /tmp/tern-ab.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

"$NEW" dkim keygen --domain bench.test --selector s1 --algorithm ed25519 --out "$WORK/dkim.pem" >/dev/null 2>&1
{ sed "s/^check_dkim_records = true/check_dkim_records = false/" "$ROOT/config/tern.toml"; printf '\n[[dkim]]\ndomain = "bench.test"\nselector = "s1"\nkey = "%s"\n' "$WORK/dkim.pem"; } > "$WORK/dkim.toml"

run() { # label binary config relay-bench-args...
  local label=$1 bin=$2 cfg=$3; shift 3
  # $WORK/data: where a binary from before configs resolved paths against their own
  # directory puts ../data (against the working directory, run/).
  rm -rf "$WORK/run" "$WORK/data"; mkdir -p "$WORK/run/config"
  # Paths in a config resolve against its directory: config/tern.toml keeps its files in
  # ../data, so a copy in run/config/ puts them (the spool) in the empty run/data.
  cp "$cfg" "$WORK/run/config/tern.toml"
  (cd "$WORK/run" && exec "$bin" serve --config "$WORK/run/config/tern.toml" > "$WORK/tern.log" 2>&1) &
  local pid=$!
  # The admin port too: the SMTP port answers before the spool is open (the intake journal),
  # the admin server only once the daemon is fully started, so the run measures the same
  # steady state for binaries from before and after that change.
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/2525) 2>/dev/null && (exec 3<>/dev/tcp/127.0.0.1/8025) 2>/dev/null && break; sleep 0.1; done
  "$BENCH/relay-bench" -n 20000 -T 120 -L "$label" "$@" 127.0.0.1:2525 2>&1 | grep "^relay-bench: target"
  kill -TERM "$pid"; wait "$pid"
  sleep 2
}

for r in $(seq "$ROUNDS"); do
  for c in 20 50; do
    run "old-c$c-r$r" "$OLD" "$ROOT/config/tern.toml" -c "$c"
    run "new-c$c-r$r" "$NEW" "$ROOT/config/tern.toml" -c "$c"
  done
  for c in 20 50; do
    run "old-dkim-c$c-r$r" "$OLD" "$WORK/dkim.toml" -c "$c"
    run "new-dkim-c$c-r$r" "$NEW" "$WORK/dkim.toml" -c "$c"
  done
done
