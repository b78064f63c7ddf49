"""Run the real agent (`python -m gpuphase run ...`) as a subprocess, for end-to-end tests.

Why a subprocess and not an in-process Agent: a crash, a deadlock or a leak must be visible as
what an operator would see (a dead process, a port that stops answering, a growing RSS), and
faults such as a hung NVML call must not be able to hang the test runner itself.

    with AgentProcess(["--backend", "sim", "--sim.gpus", "2"]) as agent:
        metrics = agent.scrape()
        assert metrics.value("gpu_up", gpu="0") == 1

The helper picks free loopback ports for /metrics and both OTLP receivers (unless the arguments
name them), waits for /-/ready, and stops the process with SIGTERM (SIGKILL if it will not go).
Its stdout and stderr go to files, never pipes: a chatty agent (an XID storm logs a lot) must not
block on a full pipe nobody reads.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import psutil
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
# Generous: on a loaded 2-core CI machine interpreter start-up alone can take seconds.
DEFAULT_READY_TIMEOUT = 60.0
HTTP_TIMEOUT = 10.0


class AgentDied(AssertionError):
    """The agent exited while a test still needed it; the message carries its stderr."""


def free_port() -> int:
    """A loopback port nobody listens on right now (the OS's choice for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def poll(condition: Callable[[], object], timeout: float, interval: float = 0.1, message: str = "") -> object:
    """Call condition until it returns something truthy; return that, or fail after `timeout` seconds.

    Tests wait on observable state this way instead of sleeping for a guessed duration; the bound
    is only a safety net and deliberately generous.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {message or condition}")
        time.sleep(interval)


class Metrics(dict):
    """One parsed /metrics page: sample name -> list of prometheus_client Samples.

    Keyed by *sample* name (`gpu_energy_joules_total`, not the family name), so names read the
    same as in PromQL. `types` maps sample names to their family's type (counter, gauge, ...).
    """

    def __init__(self, text: str):
        super().__init__()
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.setdefault(sample.name, []).append(sample)
                self.types[sample.name] = family.type

    def samples(self, name: str, **labels: str) -> list[Sample]:
        """Samples of `name` whose labels include all of `labels`."""
        return [s for s in self.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]

    def value(self, name: str, **labels: str) -> float | None:
        """The value of the one sample matching; None when absent. More than one match is a test bug."""
        matches = self.samples(name, **labels)
        if len(matches) > 1:
            raise AssertionError(f"{name}{labels} matches {len(matches)} series")
        return matches[0].value if matches else None

    def names_for(self, **labels: str) -> set[str]:
        """Sample names that have at least one series with these labels (e.g. gpu="1")."""
        return {name for name in self if self.samples(name, **labels)}

    def counters(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every counter sample as {(name, sorted labels): value}, for monotonicity checks."""
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for name, samples in self.items() if self.types.get(name) == "counter" and name.endswith("_total")
            for s in samples
        }


class AgentProcess:
    """`python -m gpuphase <command> <args>` on free loopback ports, as a context manager.

    env: variables added to (or, with value None, removed from) this process's environment.
    GPUPHASE_* variables of the test runner are never inherited, so a developer's shell cannot
    change what a test runs.
    wait_ready: wait for /-/ready on entry (False for tests about start-up failures).
    """

    def __init__(self, args: Sequence[str], env: Mapping[str, str | None] | None = None, *,
                 command: str = "run", wait_ready: bool = True, ready_timeout: float = DEFAULT_READY_TIMEOUT):
        self.args = list(args)
        self.command = command
        self.wait_for_ready = wait_ready
        self.ready_timeout = ready_timeout
        self.metrics_port = self._port_for("--web.listen-address")
        self.otlp_grpc_port = self._port_for("--otlp.grpc-listen-address")
        self.otlp_http_port = self._port_for("--otlp.http-listen-address")
        self._env = self._environment(env or {})
        self._workdir = tempfile.TemporaryDirectory(prefix="gpuphase-agent-")
        self._stderr_path = Path(self._workdir.name) / "stderr.log"
        self._popen: subprocess.Popen | None = None

    # --- addresses ------------------------------------------------------------------------------

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}/metrics"

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}"

    @property
    def otlp_http_url(self) -> str:
        """The OTLP/HTTP traces endpoint (POST)."""
        return f"http://{HOST}:{self.otlp_http_port}/v1/traces"

    @property
    def otlp_http_address(self) -> str:
        return f"{HOST}:{self.otlp_http_port}"

    @property
    def otlp_grpc_address(self) -> str:
        return f"{HOST}:{self.otlp_grpc_port}"

    # --- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> "AgentProcess":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        command = [sys.executable, "-m", "gpuphase", self.command, *self.args, *self._address_args()]
        with open(self._stderr_path, "wb") as stderr:
            self._popen = subprocess.Popen(command, cwd=ROOT, env=self._env, stdin=subprocess.DEVNULL,
                                           stdout=stderr, stderr=subprocess.STDOUT)
        if self.wait_for_ready:
            try:
                self.wait_ready(self.ready_timeout)
            except BaseException:
                self.stop()
                raise

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit within `timeout`. Returns the exit code."""
        popen = self._popen
        if popen is not None and popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(timeout)
        return self.returncode

    def wait_exit(self, timeout: float) -> int:
        """Wait for the process to exit by itself; its exit code."""
        assert self._popen is not None, "not started"
        return self._popen.wait(timeout)

    @property
    def pid(self) -> int:
        assert self._popen is not None, "not started"
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    def alive(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def process(self) -> psutil.Process:
        """psutil's view of the agent (CPU times, RSS, threads)."""
        return psutil.Process(self.pid)

    def stderr_text(self) -> str:
        """Everything the agent wrote so far (stdout and stderr, interleaved)."""
        try:
            return self._stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # --- talking to it --------------------------------------------------------------------------

    def get(self, path: str, timeout: float = HTTP_TIMEOUT) -> tuple[int, str]:
        """(status, body) of GET base_url + path; raises OSError when nothing answers."""
        try:
            with urllib.request.urlopen(self.base_url + path, timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode(errors="replace")

    def ready(self) -> bool:
        try:
            return self.get("/-/ready", timeout=2.0)[0] == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = DEFAULT_READY_TIMEOUT, interval: float = 0.1) -> None:
        poll(lambda: self._check_alive() and self.ready(), timeout, interval, message="the agent's /-/ready")

    def scrape(self) -> Metrics:
        """GET /metrics, parsed; fails the test (with the agent's stderr) if the agent died."""
        self._check_alive()
        status, text = self.get("/metrics")
        assert status == 200, f"/metrics answered {status}: {text[:500]}"
        return Metrics(text)

    def assert_answering(self) -> Metrics:
        """The agent is alive, ready and serves a parseable /metrics: what every fault test ends with."""
        self._check_alive()
        assert self.ready(), "the agent is alive but not ready"
        return self.scrape()

    # --- internals ------------------------------------------------------------------------------

    def _check_alive(self) -> bool:
        if not self.alive():
            raise AgentDied(f"the agent exited with {self.returncode}; its output:\n{self.stderr_text()[-5000:]}")
        return True

    def _port_for(self, flag: str) -> int:
        """The port given in args for flag, or a free one the helper will pass."""
        for index, arg in enumerate(self.args):
            value = arg.partition("=")[2] if arg.startswith(flag + "=") else (
                self.args[index + 1] if arg == flag and index + 1 < len(self.args) else None)
            if value is not None:
                port = value.rpartition(":")[2]
                return int(port) if port.isdigit() else 0
        return free_port()

    def _address_args(self) -> list[str]:
        given = {arg.partition("=")[0] for arg in self.args}
        out = []
        for flag, port in (("--web.listen-address", self.metrics_port),
                           ("--otlp.grpc-listen-address", self.otlp_grpc_port),
                           ("--otlp.http-listen-address", self.otlp_http_port)):
            if flag not in given:
                out += [flag, f"{HOST}:{port}"]
        return out

    @staticmethod
    def _environment(overrides: Mapping[str, str | None]) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("GPUPHASE_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
        env["PYTHONUNBUFFERED"] = "1"
        for key, value in overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env


def cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU time of a process so far."""
    times = process.cpu_times()
    return times.user + times.system


def series_gpus(metrics: Metrics, name: str) -> set[str]:
    """The gpu label values that have a series of `name`."""
    return {s.labels["gpu"] for s in metrics.get(name, []) if "gpu" in s.labels}


def all_present(metrics: Metrics, names: Iterable[str], **labels: str) -> bool:
    return all(metrics.samples(name, **labels) for name in names)
