"""Start and stop a real vLLM OpenAI server (CPU, loopback, the tiny model) with tracing on.

Used by record.py and check.py; the exact command and environment are returned so that they can
be recorded next to the fixtures and printed by the check.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

# The environment every run gets: loopback only, nothing fetched from the hub, no usage report,
# a small CPU KV cache. Tracing variables are added per transport (see command()).
BASE_ENV = {
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
SERVED_NAME = "tiny-llama"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(python: str, model_dir: str, port: int, transport: str, otlp_address: str,
            service: str | None) -> tuple[list[str], dict[str, str]]:
    """(argv, the tracing environment) for one server.

    transport "grpc": `--otlp-traces-endpoint grpc://HOST:PORT` (vLLM 0.32 builds its gRPC exporter
    with insecure=True itself; OTEL_EXPORTER_OTLP_TRACES_INSECURE=true is set as well, for versions
    that do not). "http": OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf and
    `http://HOST:PORT/v1/traces`.
    """
    env = dict(BASE_ENV)
    if transport == "grpc":
        endpoint = f"grpc://{otlp_address}"
        env["OTEL_EXPORTER_OTLP_TRACES_INSECURE"] = "true"
    elif transport == "http":
        endpoint = f"http://{otlp_address}/v1/traces"
        env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = "http/protobuf"
    else:
        raise ValueError(transport)
    if service:
        env["OTEL_SERVICE_NAME"] = service
    argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
            "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
            "--max-model-len", "512", "--max-num-seqs", "16", "--enforce-eager",
            "--otlp-traces-endpoint", endpoint]
    return argv, env


class VllmServer:
    """One vLLM server as a context manager: started in its own process group, waited for on
    /health, stopped with SIGTERM to the group (its EngineCore and worker children too)."""

    def __init__(self, python: str, model_dir: str, transport: str, otlp_address: str,
                 service: str | None, log_path: Path, ready_timeout: float = 300.0) -> None:
        self.port = free_port()
        self.argv, self.tracing_env = command(python, model_dir, self.port, transport, otlp_address, service)
        self.log_path = log_path
        self.ready_timeout = ready_timeout
        self.popen: subprocess.Popen | None = None
        self.started_in = 0.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "VllmServer":
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "VLLM_"))}
        env.update(self.tracing_env)
        begin = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        deadline = begin + self.ready_timeout
        while True:
            if self.popen.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.popen.returncode}; see {self.log_path}:\n"
                                   + self.log_path.read_text(errors="replace")[-3000:])
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"vLLM not healthy after {self.ready_timeout:.0f}s; see {self.log_path}")
            time.sleep(0.5)
        self.started_in = time.monotonic() - begin
        return self

    def __exit__(self, *exc_info: object) -> None:
        popen = self.popen
        if popen is None or popen.poll() is not None:
            return
        os.killpg(popen.pid, signal.SIGTERM)  # the group this class started, nothing else
        try:
            popen.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait(10)

    def version(self) -> str:
        with urllib.request.urlopen(self.base_url + "/version", timeout=5) as response:
            return json.loads(response.read())["version"]

    def description(self) -> dict:
        """The command line and the environment it ran with (what the fixture metadata records)."""
        return {"argv": [Path(self.argv[0]).name, *self.argv[1:]], "env": dict(sorted(self.tracing_env.items()))}
