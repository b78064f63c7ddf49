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
                 rule_files: Sequence[Path] = (), alertmanager: str | None = None, evaluation_interval: str = "1s"):
        super().__init__(workdir)
        self.binary = require_tool("prometheus")
        config: dict[str, Any] = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": evaluation_interval},
            "scrape_configs": [{"job_name": "gpuphase", "static_configs": [{"targets": list(targets)}]}],
            "rule_files": [str(path) for path in rule_files],
        }
        if alertmanager:
            config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))

    def command(self) -> list[str]:
        return [self.binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]

    def query(self, expr: str) -> list[dict]:
        """Instant query; returns the result vector (raises on a PromQL error)."""
        body = get_json(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def targets_up(self) -> bool:
        active = get_json(f"{self.url}/api/v1/targets")["data"]["activeTargets"]
        return bool(active) and all(target["health"] == "up" for target in active)


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
