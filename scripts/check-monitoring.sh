#!/usr/bin/env bash
# Checks the monitoring kit in contrib/: the Prometheus alert rules load
# (`promtool check rules`) and pass their unit tests (`promtool test rules`), and the Grafana
# dashboard is valid JSON. promtool comes with Debian's `prometheus` package, installed here
# when missing (as root). The dashboard's metric names are checked by a unit test
# (telemetry::tests::the_grafana_dashboard_uses_only_exported_metrics_and_every_one).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null 2>&1; then
  sudo=()
  [ "$(id -u)" -ne 0 ] && sudo=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends prometheus
fi

promtool check rules contrib/prometheus/tern-alerts.yml
(cd contrib/prometheus && promtool test rules tern-alerts.test.yml)
python3 -m json.tool contrib/grafana/tern-dashboard.json >/dev/null
echo "check-monitoring: rules, rule tests and dashboard ok"
