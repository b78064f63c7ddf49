#!/usr/bin/env bash
# A newcomer's view: `gpuphase demo` next to a local Prometheus loading the repo's alert rules
# (windows scaled down so the idle and under-memoried alerts fire within minutes) and an
# Alertmanager with the example routing. Prometheus and Alertmanager are used when installed
# (Debian: apt-get install prometheus prometheus-alertmanager); without them only the demo runs.
# Extra arguments go to `gpuphase demo`.
#
# Everything listens on 127.0.0.1. Ports (environment variables):
#   AGENT_PORT      the agent's /metrics, /-/healthy, /-/ready   default 9842
#   OTLP_GRPC_PORT  the agent's OTLP/gRPC span receiver          default 4317 (the demo's spans go here)
#   OTLP_HTTP_PORT  the agent's OTLP/HTTP span receiver          default 4318
#   PROM_PORT       Prometheus                                   default 9090
#   AM_PORT         Alertmanager                                 default 9093
# e.g. next to a running agent: AGENT_PORT=9843 OTLP_GRPC_PORT=4319 OTLP_HTTP_PORT=4320 scripts/demo-stack.sh
# GPUPHASE_ALERT_SCALE (default 0.01) scales the alert rules' windows.
set -euo pipefail
cd "$(dirname "$0")/.."
AGENT_PORT=${AGENT_PORT:-9842}
OTLP_GRPC_PORT=${OTLP_GRPC_PORT:-4317}
OTLP_HTTP_PORT=${OTLP_HTTP_PORT:-4318}
PROM_PORT=${PROM_PORT:-9090}
AM_PORT=${AM_PORT:-9093}
SCALE=${GPUPHASE_ALERT_SCALE:-0.01}

# A port some other process holds would otherwise fail in the background (Prometheus,
# Alertmanager) or after the set-up (the agent): say which one, and the variable that moves it.
in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
busy=()
for var in AGENT_PORT OTLP_GRPC_PORT OTLP_HTTP_PORT PROM_PORT AM_PORT; do
  if in_use "${!var}"; then busy+=("$var=${!var}"); fi
done
if [ ${#busy[@]} -gt 0 ]; then
  echo "demo-stack.sh: already in use on 127.0.0.1: ${busy[*]} (another agent or demo stack?);" \
       "set those variables to free ports" >&2
  exit 1
fi

scripts/setup.sh
work=$(mktemp -d -t gpuphase-stack-XXXX)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT INT TERM

# report_step 30s: `gpuphase report` has something to read after a minute instead of five.
.venv/bin/python -m gpuphase.alerts.rules --for-scale "$SCALE" --scrape-interval 5s --set unused_for=2m \
  --set report_step=30s -o "$work/rules.yaml"
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
  agent OTLP      gRPC 127.0.0.1:$OTLP_GRPC_PORT, HTTP http://127.0.0.1:$OTLP_HTTP_PORT/v1/traces
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
if command -v prometheus >/dev/null; then
  cat <<TEXT
  After 3 minutes, the waste report (docs/report.md) in another terminal:
    .venv/bin/gpuphase report --prometheus.url http://127.0.0.1:$PROM_PORT --range 10m --price.gpu-hour 2.50
    (--format html --output report.html for the plots)
  Scaling signals (docs/scaling.md): http://127.0.0.1:$PROM_PORT/graph?g0.expr=gpuphase%3Aservice_desired_gpus%3Arate5m
TEXT
fi
echo
.venv/bin/gpuphase demo --demo.scenario mixed-fleet --web.listen-address "127.0.0.1:$AGENT_PORT" \
  --otlp.grpc-listen-address "127.0.0.1:$OTLP_GRPC_PORT" --otlp.http-listen-address "127.0.0.1:$OTLP_HTTP_PORT" "$@"
