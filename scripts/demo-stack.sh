#!/usr/bin/env bash
# A newcomer's view: `gpuphase demo` next to a local Prometheus loading the repo's alert rules
# (windows scaled down so the idle and under-memoried alerts fire within minutes) and an
# Alertmanager with the example routing. Prometheus and Alertmanager are used when installed
# (Debian: apt-get install prometheus prometheus-alertmanager); without them only the demo runs.
# Ports: agent 9842, Prometheus 9090, Alertmanager 9093 (override with the variables below).
set -euo pipefail
cd "$(dirname "$0")/.."
AGENT_PORT=${AGENT_PORT:-9842}
PROM_PORT=${PROM_PORT:-9090}
AM_PORT=${AM_PORT:-9093}
SCALE=${GPUPHASE_ALERT_SCALE:-0.01}

scripts/setup.sh
work=$(mktemp -d -t gpuphase-stack-XXXX)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT INT TERM

.venv/bin/python -m gpuphase.alerts.rules --for-scale "$SCALE" --scrape-interval 5s --set unused_for=2m -o "$work/rules.yaml"
am_binary=$(command -v prometheus-alertmanager || command -v alertmanager || true)
if [ -n "$am_binary" ]; then
  "$am_binary" --config.file=alerts/alertmanager.yml --storage.path="$work/am" \
    --web.listen-address=127.0.0.1:$AM_PORT --cluster.listen-address= --log.level=warn &
  pids+=($!)
fi
if command -v prometheus >/dev/null; then
  cat >"$work/prometheus.yml" <<YAML
global: {scrape_interval: 5s, evaluation_interval: 5s}
rule_files: ["$work/rules.yaml"]
scrape_configs:
  - job_name: gpuphase
    static_configs: [{targets: ["127.0.0.1:$AGENT_PORT"]}]
alerting:
  alertmanagers: [{static_configs: [{targets: ["127.0.0.1:$AM_PORT"]}]}]
YAML
  prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
    --web.listen-address=127.0.0.1:$PROM_PORT --log.level=warn &
  pids+=($!)
fi

cat <<TEXT

  gpuphase demo stack
  -------------------
  agent metrics   http://127.0.0.1:$AGENT_PORT/metrics
TEXT
if command -v prometheus >/dev/null; then
  echo "  Prometheus      http://127.0.0.1:$PROM_PORT/alerts   (rules: alert windows x$SCALE)"
else
  echo "  Prometheus      not installed (apt-get install prometheus) - skipped"
fi
if [ -n "$am_binary" ]; then
  echo "  Alertmanager    http://127.0.0.1:$AM_PORT"
else
  echo "  Alertmanager    not installed (apt-get install prometheus-alertmanager) - skipped"
fi
cat <<TEXT
  Grafana         import dashboards/gpuphase-*.json with a Prometheus data source
                  pointing at http://127.0.0.1:$PROM_PORT
  Expect within a few minutes: GpuIdleAllocated and GpuMemoryNearlyFull on GPU 3,
  GpuMemoryBandwidthBound on GPU 2, GpuUnused on GPU 4; GPUs 0-1 stay quiet.

TEXT
.venv/bin/gpuphase demo --demo.scenario mixed-fleet --web.listen-address 127.0.0.1:$AGENT_PORT "$@"
