"""A real Prometheus (and Alertmanager) for end-to-end tests: started on free loopback ports,
queried through their HTTP APIs, stopped with the test."""

from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Sequence

import yaml

from tests.agentproc import free_port, poll
from tests.conftest import require_tool


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    """`poll` for services still starting: an exception (connection refused...) counts as not yet."""
    def attempt():
        try:
            return predicate()
        except Exception:
            return None

    return poll(attempt, timeout, interval, what)


class _Service:
    """A server binary run for one test: started, awaited on /-/ready, stopped on exit."""

    name = "service"

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.log_path = workdir / f"{self.name}.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def __enter__(self):
        self.process = subprocess.Popen(self.command(), stdout=self.log_path.open("w"), stderr=subprocess.STDOUT)
        wait_until(lambda: urllib.request.urlopen(f"{self.url}/-/ready", timeout=1).status == 200, 60,
                   what=f"{self.name} ready (log: {self.log_path})")
        return self

    def __exit__(self, *exc) -> None:
        if self.process:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


class Prometheus(_Service):
    """`prometheus` scraping `targets` every `scrape_interval`, optionally with rule files and an Alertmanager."""

    name = "prometheus"

    def __init__(self, workdir: Path, targets: Sequence[str], scrape_interval: str = "1s",
                 rule_files: Sequence[Path] = (), alertmanager: str | None = None, evaluation_interval: str = "1s",
                 remote_write: str | None = None):
        super().__init__(workdir)
        self.binary = require_tool("prometheus")
        config: dict[str, Any] = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": evaluation_interval},
            "scrape_configs": [{"job_name": "gpuphase", "static_configs": [{"targets": list(targets)}]}],
            "rule_files": [str(path) for path in rule_files],
        }
        if remote_write:  # recorded series too: what a fleet's long-term store receives
            config["remote_write"] = [{"url": remote_write, "queue_config": {"batch_send_deadline": "1s"}}]
        if alertmanager:
            config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))

    def command(self) -> list[str]:
        return [self.binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """Instant query (now, or at Unix time `at`); returns the result vector (raises on a PromQL error)."""
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        body = get_json(f"{self.url}/api/v1/query?" + urllib.parse.urlencode(params))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def targets_up(self) -> bool:
        active = get_json(f"{self.url}/api/v1/targets")["data"]["activeTargets"]
        return bool(active) and all(target["health"] == "up" for target in active)


class VictoriaMetrics(_Service):
    """Single-node VictoriaMetrics (Debian package victoria-metrics): a fleet's long-term store,
    fed by Prometheus' remote write, answering the same /api/v1 queries."""

    name = "victoria-metrics"

    def __init__(self, workdir: Path):
        super().__init__(workdir)
        self.binary = require_tool("victoria-metrics")

    @property
    def remote_write_url(self) -> str:
        return f"{self.url}/api/v1/write"

    def command(self) -> list[str]:
        # latencyOffset 0: by default the newest 30 s are hidden from queries, for late samples.
        return [self.binary, f"-storageDataPath={self.workdir / 'vm'}", f"-httpListenAddr=127.0.0.1:{self.port}",
                "-retentionPeriod=1y", "-search.latencyOffset=0s", "-search.disableCache", "-loggerLevel=WARN"]

    def __enter__(self):
        self.process = subprocess.Popen(self.command(), stdout=self.log_path.open("w"), stderr=subprocess.STDOUT)
        wait_until(lambda: urllib.request.urlopen(f"{self.url}/health", timeout=1).status == 200, 60,
                   what=f"{self.name} healthy (log: {self.log_path})")
        return self

    def flush(self) -> None:
        """Make every sample received so far visible to queries."""
        urllib.request.urlopen(f"{self.url}/internal/force_flush", timeout=10).read()


class Alertmanager(_Service):
    name = "alertmanager"

    def __init__(self, workdir: Path, config: Path):
        super().__init__(workdir)
        self.binary = require_tool("prometheus-alertmanager")
        self.cluster_port = free_port()
        self.config = config

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [self.binary, f"--config.file={self.config}", f"--storage.path={self.workdir / 'am'}",
                f"--web.listen-address={self.address}", f"--cluster.listen-address=127.0.0.1:{self.cluster_port}",
                "--log.level=warn"]

    def alerts(self) -> list[dict]:
        return get_json(f"{self.url}/api/v2/alerts")
