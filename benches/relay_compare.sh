#!/usr/bin/env bash
# relay_compare.sh -- tern beside Postfix, alternating, on this machine (loopback only).
#
# Usage (from the repo root, as root, with Debian's postfix installed; build first with
# `cargo build --release`):
#   benches/relay_compare.sh [rounds]        # default 2 rounds
#
# Per round it runs ../shared/bench/relay-bench (20,000 x 5 KB):
#   accept only: tern with delivery suspended vs postfix-baseline with defer_transports=smtp,
#                20 and 50 sessions;
#   end to end:  tern vs postfix-baseline, 20 and 50 sessions, with and without -k;
#   DKIM:        tern signing every message with a fresh Ed25519 key, then a fresh RSA-2048 key,
#                20 and 50 sessions (compare with the plain Postfix rows: Postfix signs nothing).
# Each tern run starts from an empty spool in a temp dir. Prints relay-bench's result lines.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH=$ROOT/../shared/bench
BIN=$ROOT/target/release/tern
ROUNDS=${1:-2}
[ -x "$BIN" ] || { echo "build first: cargo build --release" >&2; exit 2; }
WORK=$(mktemp -d /tmp/relay-compare.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

sed 's/^suspended = false/suspended = true/' "$ROOT/config/tern.toml" > "$WORK/suspended.toml"
"$BIN" dkim keygen --domain bench.test --selector s1 --algorithm ed25519 --out "$WORK/dkim.pem" >/dev/null 2>&1
# check_dkim_records off: bench.test is no real domain, and benchmarks ask no DNS beyond loopback.
{ sed 's/^check_dkim_records = true/check_dkim_records = false/' "$ROOT/config/tern.toml"; printf '\n[[dkim]]\ndomain = "bench.test"\nselector = "s1"\nkey = "%s"\n' "$WORK/dkim.pem"; } > "$WORK/dkim.toml"
"$BIN" dkim keygen --domain bench.test --selector s2 --algorithm rsa --bits 2048 --out "$WORK/rsa.pem" >/dev/null 2>&1
{ sed 's/^check_dkim_records = true/check_dkim_records = false/' "$ROOT/config/tern.toml"; printf '\n[[dkim]]\ndomain = "bench.test"\nselector = "s2"\nkey = "%s"\n' "$WORK/rsa.pem"; } > "$WORK/rsa.toml"

run_tern() { # label config timeout relay-bench-args...
  local label=$1 cfg=$2 t=$3; shift 3
  rm -rf "$WORK/run"; mkdir -p "$WORK/run/config"
  # Paths in a config resolve against its directory: config/tern.toml keeps its files in
  # ../data, so a copy in run/config/ puts them (the spool) in the empty run/data.
  cp "$cfg" "$WORK/run/config/tern.toml"
  (cd "$WORK/run" && exec "$BIN" serve --config "$WORK/run/config/tern.toml" > "$WORK/tern.log" 2>&1) &
  local pid=$!
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/2525) 2>/dev/null && (exec 3<>/dev/tcp/127.0.0.1/8025) 2>/dev/null && break; sleep 0.1; done
  "$BENCH/relay-bench" -n 20000 -T "$t" -L "$label" "$@" 127.0.0.1:2525 2>&1 | grep "^relay-bench: target"
  kill -TERM "$pid"; wait "$pid"
}
run_postfix() { # label postfix-baseline-args...
  local label=$1; shift
  timeout 900 "$BENCH/postfix-baseline" "$@" 2>&1 | grep "^relay-bench: target" | sed "s/label=.*/label=$label/"
}

for r in $(seq "$ROUNDS"); do
  for c in 20 50; do
    run_tern "tern-acceptonly-c$c-r$r" "$WORK/suspended.toml" 10 -c "$c"
    run_postfix "postfix-acceptonly-c$c-r$r" -o defer_transports=smtp -- -n 20000 -T 45 -c "$c"
  done
  for args in "-c 20" "-c 50" "-c 20 -k" "-c 50 -k"; do
    tag=$(echo "$args" | tr -d ' -')
    # shellcheck disable=SC2086
    run_tern "tern-$tag-r$r" "$ROOT/config/tern.toml" 120 $args
    # shellcheck disable=SC2086
    run_postfix "postfix-$tag-r$r" -- -n 20000 -T 300 $args
  done
  run_tern "tern-dkim-c20-r$r" "$WORK/dkim.toml" 120 -c 20
  run_tern "tern-dkim-c50-r$r" "$WORK/dkim.toml" 120 -c 50
  run_tern "tern-rsa2048-c20-r$r" "$WORK/rsa.toml" 120 -c 20
  run_tern "tern-rsa2048-c50-r$r" "$WORK/rsa.toml" 120 -c 50
done
