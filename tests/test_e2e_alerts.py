"""Alerts and dashboards end to end: `gpuphase demo` (mixed-fleet: healthy GPUs 0-1, a memory-bound
GPU 2, an allocated-but-idle GPU 3 with VRAM nearly full, an unused GPU 4) scraped by a real
Prometheus that loads the repo's rules (windows scaled down with `--for-scale`) and sends to a real
Alertmanager running the repo's example config. The expected alerts must reach Alertmanager's API,
the healthy GPUs must raise none, and every dashboard panel query must return data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gpuphase.dashboards.build import all_queries
from tests.agentproc import AgentProcess
from tests.realprom import Alertmanager, Prometheus, wait_until

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent

EXPECTED = {("GpuIdleAllocated", "3"), ("GpuMemoryNearlyFull", "3"), ("GpuMemoryBandwidthBound", "2"),
            ("GpuUnused", "4")}
HEALTHY_GPUS = {"0", "1"}


def scaled_rules(path: Path) -> Path:
    """The repo's rules with every `for:` and alert window divided by 100 (6 h unused -> 20 s here)."""
    subprocess.run([sys.executable, "-m", "gpuphase.alerts.rules", "--for-scale", "0.01", "--scrape-interval", "1s",
                    "--set", "unused_for=20s", "-o", str(path)], check=True, cwd=ROOT)
    return path


def alertmanager_config(path: Path, webhook_port: int) -> Path:
    """The example config as shipped, its loopback webhooks pointed at a port nobody listens on."""
    text = (ROOT / "alerts" / "alertmanager.yml").read_text().replace("127.0.0.1:5001", f"127.0.0.1:{webhook_port}")
    path.write_text(text)
    return path


def test_expected_alerts_reach_alertmanager_and_every_dashboard_query_has_data(tmp_path):
    from tests.agentproc import free_port

    rules = scaled_rules(tmp_path / "rules.yaml")
    (tmp_path / "am").mkdir()
    (tmp_path / "prom").mkdir()
    with Alertmanager(tmp_path / "am", alertmanager_config(tmp_path / "alertmanager.yml", free_port())) as am, \
            AgentProcess(["--demo.scenario", "mixed-fleet", "--sample.interval", "500ms"],
                         env={"OTEL_BSP_SCHEDULE_DELAY": "1000"}, command="demo") as agent, \
            Prometheus(tmp_path / "prom", [f"127.0.0.1:{agent.metrics_port}"], rule_files=[rules],
                       alertmanager=am.address) as prometheus:

        def arrived():
            got = {(a["labels"]["alertname"], a["labels"].get("gpu", "")) for a in am.alerts()}
            return got if EXPECTED <= got else None

        received = wait_until(arrived, 240, interval=2, what=f"alerts {sorted(EXPECTED)} at Alertmanager")
        for alert in am.alerts():
            labels = alert["labels"]
            assert labels.get("gpu") not in HEALTHY_GPUS, f"a healthy GPU raised {labels}"
            assert labels["alertname"] not in ("GpuAgentDown", "GpuCollectorFailing", "GpuLost"), labels
            for key in ("summary", "description", "runbook_url"):
                assert alert["annotations"].get(key), (labels["alertname"], key)
            assert labels.get("severity") in ("page", "warning", "info")
        assert EXPECTED <= received

        instance = f"127.0.0.1:{agent.metrics_port}"
        empty = [(dashboard, panel, expr) for dashboard, panel, expr in
                 all_queries(instance_regex=instance, rate_interval="30s", include_sparse=False)
                 if not prometheus.query(expr)]
        assert not empty, "panel queries without data:\n" + "\n".join(f"{d} / {p}: {e}" for d, p, e in empty)
