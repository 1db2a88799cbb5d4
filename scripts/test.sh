#!/usr/bin/env bash
# The README's test command: installs what the test suite needs on a fresh Debian/Ubuntu
# machine, then runs it. Extra arguments go to `cargo test` (e.g. `scripts/test.sh --test it`).
#
# Needs: strace (fsync-before-250 proof), python3 (smtplib client tests), systemd-analyze
# (unit file check), redis-server and redis-cli (shaping and fleet tests start their own servers and a Redis Cluster), dkimpy + pynacl
# (independent DKIM verification, Ed25519 included), jsonschema (TLS-RPT reports checked
# against the RFC 8460 format), chromium (the web console's test drives headless Chromium over
# the DevTools protocol; it fails, not skips, without it).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v strace >/dev/null 2>&1 || need+=(strace)
command -v python3 >/dev/null 2>&1 || need+=(python3 python3-pip)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
# redis-cli joins the Redis Cluster of the fleet test (`redis-cli --cluster create`).
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "scripts/test.sh: need root or sudo to install: ${need[*]}" >&2; exit 1; }
    sudo=(sudo)
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq "${need[@]}"
fi

if ! python3 -c 'import dkim, nacl, jsonschema' 2>/dev/null; then
  python3 -m pip install --quiet dkimpy pynacl jsonschema 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages dkimpy pynacl jsonschema
fi

exec cargo test --workspace "$@"
