#!/usr/bin/env bash
# Set up and run the agent. On a host with the NVIDIA driver it samples the real GPUs;
# on one without, it runs `gpuphase demo`: simulated GPUs with a synthetic LLM workload.
# Extra arguments go to the gpuphase command, e.g. scripts/run-agent.sh --log.level=debug
#
# Ports (environment variables; unset = the agent's default, which GPUPHASE_* settings may change):
#   AGENT_PORT      /metrics, /-/healthy, /-/ready    default 9842 (all interfaces: --web.listen-address :PORT)
#   OTLP_GRPC_PORT  OTLP/gRPC span receiver           default 4317 (loopback: --otlp.grpc-listen-address 127.0.0.1:PORT)
#   OTLP_HTTP_PORT  OTLP/HTTP span receiver           default 4318 (loopback: --otlp.http-listen-address 127.0.0.1:PORT)
# e.g. a second agent next to a running one: AGENT_PORT=9843 OTLP_GRPC_PORT=4319 OTLP_HTTP_PORT=4320 scripts/run-agent.sh
# Flags among the extra arguments win over these variables.
set -euo pipefail
cd "$(dirname "$0")/.."
ports=()
if [ -n "${AGENT_PORT:-}" ]; then ports+=(--web.listen-address ":$AGENT_PORT"); fi
if [ -n "${OTLP_GRPC_PORT:-}" ]; then ports+=(--otlp.grpc-listen-address "127.0.0.1:$OTLP_GRPC_PORT"); fi
if [ -n "${OTLP_HTTP_PORT:-}" ]; then ports+=(--otlp.http-listen-address "127.0.0.1:$OTLP_HTTP_PORT"); fi
GPUPHASE_EXTRAS=test scripts/setup.sh
if ldconfig -p 2>/dev/null | grep -q 'libnvidia-ml.so.1'; then
  echo "NVIDIA driver found: sampling the real GPUs"
  exec .venv/bin/gpuphase run ${ports[@]+"${ports[@]}"} "$@"
fi
echo "No NVIDIA driver on this host: running the demo on simulated GPUs"
exec .venv/bin/gpuphase demo ${ports[@]+"${ports[@]}"} "$@"
