#!/usr/bin/env bash
# `make monitor`: `segloop serve` and Debian's Prometheus, both on loopback; Prometheus scrapes
# the service with monitoring/prometheus.yml (target 127.0.0.1:8000) and evaluates
# monitoring/alerts.yml. Its UI (http://127.0.0.1:9090/graph) is the dashboard. Ctrl-C stops both.
# Arguments go to `segloop serve` (e.g. --backend torch); keep its port 8000 or edit the target.
set -euo pipefail
cd "$(dirname "$0")/.."
PROM_PORT=${PROM_PORT:-9090}
if ! command -v prometheus >/dev/null; then
  echo "monitor: needs Debian's prometheus (apt-get install prometheus)" >&2
  exit 1
fi
mkdir -p .cache/prometheus
segloop serve "$@" &
serve=$!
prometheus --config.file=monitoring/prometheus.yml --storage.tsdb.path=.cache/prometheus \
  --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn &
prom=$!
trap 'kill "$serve" "$prom" 2>/dev/null || true; wait' EXIT INT TERM
echo "Prometheus: http://127.0.0.1:$PROM_PORT/graph (alerts: /alerts); the service: http://127.0.0.1:8000/docs"
wait -n
