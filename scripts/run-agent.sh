#!/usr/bin/env bash
# Set up and run the agent. On a host with the NVIDIA driver it samples the real GPUs;
# on one without, it runs `gpuphase demo`: simulated GPUs with a synthetic LLM workload.
# Extra arguments go to the gpuphase command, e.g. scripts/run-agent.sh --web.listen-address=:9842
set -euo pipefail
cd "$(dirname "$0")/.."
GPUPHASE_EXTRAS=test scripts/setup.sh
if ldconfig -p 2>/dev/null | grep -q 'libnvidia-ml.so.1'; then
  echo "NVIDIA driver found: sampling the real GPUs"
  exec .venv/bin/gpuphase run "$@"
fi
echo "No NVIDIA driver on this host: running the demo on simulated GPUs"
exec .venv/bin/gpuphase demo "$@"
