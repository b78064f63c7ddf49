#!/usr/bin/env bash
# Create .venv with gpuphase and its test dependencies. Idempotent; used by run-agent.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip "setuptools>=77" >/dev/null
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[${GPUPHASE_EXTRAS:-test}]"
