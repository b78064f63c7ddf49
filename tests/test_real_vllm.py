"""The real-server test: a real vLLM (CPU, a tiny local model) traces to a real agent over OTLP/gRPC
and OTLP/HTTP; the agent's token and phase totals are checked against vLLM's own /metrics
(scripts/real_vllm/check.py says what exactly).

Opt-in, by its own command: `scripts/test-real-vllm.sh` creates the vLLM environment and the model,
then runs this module with GPUPHASE_REAL_VLLM=1. Without that variable the module defines no test at
all (nothing to skip: the main suite, CI included, never runs a real vLLM; it replays the recorded
exports in tests/test_vllm_fixtures.py instead). With it, a missing vLLM or model is a failure.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

if os.environ.get("GPUPHASE_REAL_VLLM") == "1":

    @pytest.mark.e2e
    @pytest.mark.timeout(1200)
    def test_real_vllm_over_grpc_and_http_matches_its_own_metrics(tmp_path):
        python = os.environ.get("GPUPHASE_REAL_VLLM_PYTHON", "")
        model = os.environ.get("GPUPHASE_REAL_VLLM_MODEL", "")
        assert python and Path(python).exists(), f"vLLM's python {python!r} is missing (scripts/test-real-vllm.sh)"
        assert (Path(model) / "config.json").exists(), f"the model {model!r} is missing (scripts/test-real-vllm.sh)"
        sys.path.insert(0, str(ROOT / "scripts" / "real_vllm"))
        import check

        report = tmp_path / "report.json"
        logs = Path(os.environ.get("GPUPHASE_REAL_VLLM_LOGS", tmp_path / "logs"))
        status = check.main([python, model, "--report", str(report), "--logs", str(logs)])
        failed = [c for c in json.loads(report.read_text())["checks"] if not c["ok"]]
        assert status == 0 and not failed, failed
