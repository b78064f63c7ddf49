"""`gpuphase run --backend sim` as a subprocess, scraped by a real Prometheus, read back through
Prometheus' HTTP API; the live exposition passes `promtool check metrics`."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import pytest

from gpuphase.model import metricdefs
from tests.agentproc import AgentProcess
from tests.conftest import require_tool
from tests.realprom import Prometheus, wait_until

pytestmark = pytest.mark.e2e

# Device metrics of design.md §4 every simulated H100 serves (MIG and per-phase ones need more setup).
DEVICE_COLLECTORS = ("device", "gpm", "memory", "power", "interconnect", "errors", "processes")
NOT_PER_GPU_IN_SIM = {"gpu_process_memory_used_bytes", "gpu_process_sm_active_ratio", "gpu_xid_errors_total"}


def device_metric_names() -> list[str]:
    return [d.name for d in metricdefs.load().values()
            if d.collector in DEVICE_COLLECTORS and d.name not in NOT_PER_GPU_IN_SIM]


def test_sim_h100_node_scraped_by_prometheus(tmp_path):
    args = ["--backend", "sim", "--sim.gpus", "4", "--sample.interval", "500ms"]
    with AgentProcess(args) as agent, Prometheus(tmp_path, [f"127.0.0.1:{agent.metrics_port}"]) as prometheus:
        wait_until(prometheus.targets_up, 30, what="Prometheus to scrape the agent")
        wait_until(lambda: prometheus.query("gpu_up"), 30, what="gpu_up in Prometheus")
        for name in device_metric_names():
            result = prometheus.query(f"count by (gpu) ({name})")
            assert sorted(r["metric"]["gpu"] for r in result) == ["0", "1", "2", "3"], name
        assert float(prometheus.query("sum(gpu_up)")[0]["value"][1]) == 4
        # used + free = total, seen from Prometheus.
        diff = prometheus.query("max(abs(gpu_memory_used_bytes + gpu_memory_free_bytes - gpu_memory_total_bytes))")
        assert float(diff[0]["value"][1]) == 0
        info = prometheus.query('gpu_info{name="NVIDIA H100 80GB HBM3", gpm_supported="true"}')
        assert len(info) == 4
        success = prometheus.query("min(gpu_scrape_collector_success)")
        assert float(success[0]["value"][1]) == 1
        with urllib.request.urlopen(agent.metrics_url, timeout=5) as response:
            exposition = response.read().decode()
    promtool = require_tool("promtool")
    check = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, text=True)
    assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr


def test_sim_a100_has_no_gpm_series():
    with AgentProcess(["--backend", "sim", "--sim.gpus", "2", "--sim.profile", "a100-sxm-80gb"]) as agent:
        with urllib.request.urlopen(agent.metrics_url, timeout=5) as response:
            text = response.read().decode()
    assert 'gpu_up{gpu="1"' in text
    for family in ("gpu_sm_active_ratio", "gpu_sm_occupancy_ratio", "gpu_tensor_active_ratio",
                   "gpu_dram_active_ratio"):
        assert family not in text
    assert "gpu_utilization_ratio{" in text


def test_run_without_a_driver_exits_with_a_clear_message(tmp_path):
    """backend auto on a host without libnvidia-ml: exit non-zero, one line naming --backend sim."""
    probe = subprocess.run(["sh", "-c", "ldconfig -p | grep -q libnvidia-ml.so.1"])
    if probe.returncode == 0:
        pytest.skip("this host has an NVIDIA driver (tests/test_faults.py covers a missing one via the fake)")
    result = subprocess.run([sys.executable, "-m", "gpuphase", "run", "--web.listen-address", "127.0.0.1:0"],
                            capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin",
                                                                             "LD_LIBRARY_PATH": str(tmp_path)},
                            cwd=str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("gpuphase:")]
    assert len(lines) == 1 and "--backend sim" in lines[0], result.stderr
