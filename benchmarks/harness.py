"""Shared tools of the benchmarks: percentiles, free ports, the agent as a subprocess, the machine.

The agent is measured as a subprocess (psutil RSS and CPU times) wherever memory or CPU is the
figure: measuring it inside the harness would count the harness's own imports and threads.
"""

from __future__ import annotations

import datetime
import http.client
import os
import platform
import time
from pathlib import Path
from typing import Sequence

import psutil

from tests import agentproc

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
ALL_GPUS_8 = "0,1,2,3,4,5,6,7"


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child that imports this checkout's packages."""
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class AgentProcess(agentproc.AgentProcess):
    """The end-to-end tests' agent subprocess, with the figures the benchmarks read off it.

    Not ready-waited on entry: callers time `wait_ready()`, which returns seconds since the spawn.
    """

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        super().__init__(["--log.level", "warn", *args], env, wait_ready=False)
        self.started_at = float("nan")

    def start(self) -> None:
        self.started_at = time.perf_counter()
        super().start()

    def wait_ready(self, timeout: float = 30.0, interval: float = 0.005) -> float:
        """Seconds from spawning the process until /-/ready answered 200 (polled every 5 ms)."""
        super().wait_ready(timeout, interval)
        return time.perf_counter() - self.started_at

    def rss_bytes(self) -> int:
        return self.process().memory_info().rss

    def cpu_seconds(self) -> float:
        return agentproc.cpu_seconds(self.process())

    def metrics_text(self) -> str:
        status, body = self.get("/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        return body


def replica_services(gpus: int = 8) -> tuple[str, ...]:
    """One vLLM replica per GPU (TP-1), the names replica_agent_args maps."""
    return tuple(f"vllm-{gpu}" for gpu in range(gpus))


def replica_agent_args(gpus: int = 8, interval: str = "1s") -> list[str]:
    """Flags of a simulated agent with one service per GPU (replica_services)."""
    mapping = [arg for gpu, name in enumerate(replica_services(gpus)) for arg in ("--phase.map", f"{name}={gpu}")]
    return ["--backend", "sim", "--sim.gpus", str(gpus), "--sample.interval", interval, *mapping]


def sim_agent_args(gpus: int = 8, interval: str = "1s", *extra: str) -> list[str]:
    """Flags of a simulated agent whose service "vllm" owns every GPU (so windows are placed)."""
    every = ",".join(str(i) for i in range(gpus))
    return ["--backend", "sim", "--sim.gpus", str(gpus), "--sample.interval", interval,
            "--phase.map", f"vllm={every}", *extra]


class CpuMeter:
    """CPU share of one core used by a process between two readings (1.0 = one core fully busy)."""

    def __init__(self, process: psutil.Process):
        self._process = process
        self._cpu, self._wall = self._read()

    def _read(self) -> tuple[float, float]:
        times = self._process.cpu_times()
        return times.user + times.system, time.monotonic()

    def share(self) -> float:
        """Share since the previous call (or construction); restarts the window."""
        cpu, wall = self._read()
        share = (cpu - self._cpu) / max(wall - self._wall, 1e-9)
        self._cpu, self._wall = cpu, wall
        return share


def machine() -> dict[str, str]:
    """What the figures were measured on, for the report's header."""
    from google.protobuf.internal import api_implementation

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "python": platform.python_version(),
        "protobuf backend": api_implementation.Type(),
        "os": f"{platform.system()} {platform.release()}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
