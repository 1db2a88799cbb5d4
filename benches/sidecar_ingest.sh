#!/usr/bin/env bash
# sidecar_ingest.sh -- HTTP ingest throughput of the plain path and of the sidecar with a
# generating model, alternated in the same run on this machine (so load from others affects
# both alike), each from an empty spool with delivery suspended.
#
# Usage (from the repo root):
#   cargo build --release --bin tern --example inject_load --example fake_model
#   benches/sidecar_ingest.sh [rounds] [calls] [recipients/call]   # default 2, 20000, 1
#   (PROFILE=debug: the debug build, for a quick look; figures come from release)
#
# The model is examples/fake_model.rs on 127.0.0.1:18443 over HTTPS (its own CA in
# sidecar.model.ca_file): every answer after 1 s, 16 calls at once. The campaign is
# config/tern.toml's "winback" (two generated slots, 2 variants and the holdout,
# segment_field = "segment"); inject_load gives each call the segment s<call % 4>. With
# COLD=1 the campaign's `segments` stay config/tern.toml's (others), so the first messages
# of each s<i> wait for the model (about 1 s, every client stalled); by default the campaign
# names segments s0-s3 and they are generated at start, ahead of need (the run starts 2 s
# after the daemon). Either way every message renders the shared text. It prints
# inject_load's lines (plain-..., sidecar-...) with the sidecar's content counts.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
REL=$ROOT/target/${PROFILE:-release}
ROUNDS=${1:-2}
CALLS=${2:-20000}
RCPTS=${3:-1}
WORK=$(mktemp -d /tmp/tern-sidecar-ingest.XXXXXX)
trap 'kill $MODEL 2>/dev/null; rm -rf "$WORK"' EXIT

"$REL/examples/fake_model" 18443 "$WORK/model-ca.pem" 1000 16 > "$WORK/model.log" 2>&1 &
MODEL=$!
for _ in $(seq 50); do [ -s "$WORK/model-ca.pem" ] && break; sleep 0.1; done

# config/tern.toml with delivery suspended, the model at the fake server, and an unsubscribe
# base URL so the campaign's one-click headers can be built.
sed -e 's/^suspended = false/suspended = true/' \
    -e 's|^base_url = "http://127.0.0.1:8080/v1"|base_url = "https://localhost:18443/v1"\nca_file = "'"$WORK"'/model-ca.pem"\nmax_concurrency = 16|' \
    "$ROOT/config/tern.toml" > "$WORK/tern.toml"
if [ "${COLD:-0}" != 1 ]; then
  sed -i 's/^segments = \["new", "lapsed", "vip"\]/segments = ["s0", "s1", "s2", "s3"]/' "$WORK/tern.toml"
fi

run() { # label [campaign]
  local label=$1 campaign=${2:-}
  rm -rf "$WORK/run" "$WORK/data"; mkdir -p "$WORK/run/config"
  cp "$WORK/tern.toml" "$WORK/run/config/tern.toml"
  (cd "$WORK/run" && exec "$REL/tern" serve --config "$WORK/run/config/tern.toml" > "$WORK/tern-$label.log" 2>&1) &
  local pid=$!
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/8025) 2>/dev/null && [ -s "$WORK/run/data/admin.token" ] && break; sleep 0.1; done
  sleep 2
  echo -n "$label: "
  INJECT_CAMPAIGN=$campaign "$REL/examples/inject_load" 127.0.0.1:8025 "$WORK/run/data/admin.token" "$CALLS" 20 "$RCPTS" 5000 2>&1 | tr '\n' ' '
  echo
  kill -TERM "$pid"; wait "$pid"
  sleep 1
}

for r in $(seq "$ROUNDS"); do
  run "plain-r$r"
  run "sidecar-r$r" winback
done
grep "calls" "$WORK/model.log" | tail -1
