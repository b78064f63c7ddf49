"""Figure 7: gpuphase next to nvitop-exporter, both on the same fake libnvidia-ml (8 GPUs, 1 s interval).

Both run as subprocesses with LD_LIBRARY_PATH pointing at tests/fakenvml's library, side by side
for the same window, measured with psutil. nvitop-exporter is optional: when it is not
installed, or does not run on the fake library, the section says so and why.
nvidia-smi's per-call cost needs a real driver and is not measured here.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.harness import MIB, AgentProcess, CpuMeter, http_get, subprocess_env
from benchmarks.results import Figure, Section
from benchmarks.sampling import fake_control
from tests.agentproc import free_port
from tests.fakenvml import FakeNvml, build_fake_nvml


def _gpu_series(text: str) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith("#") and "gpu" in line.split("{")[0]
               and not line.startswith(("gpu_scrape_", "gpu_spans_", "gpu_agent")))


def _missing_functions(log: str) -> list[str]:
    return sorted(set(re.findall(r"undefined symbol: (\w+)", log)))


def run(seconds: float = 60.0) -> Section:
    section = Section(
        "peers", "Peers on the same fake NVML",
        f"gpuphase (`--backend nvml`) and nvitop-exporter (`--interval 1`) at the same time for {seconds:g} s, "
        "both loading tests/fakenvml's libnvidia-ml.so.1 (8 GPUs) through LD_LIBRARY_PATH; RSS at the end, "
        "CPU share over the window (psutil).")
    exporter = shutil.which("nvitop-exporter")
    with tempfile.TemporaryDirectory(prefix="gpuphase-bench-peers-") as tmp:
        fake = FakeNvml(build_fake_nvml(Path(tmp) / "build"), Path(tmp) / "run")
        fake.control(fake_control())
        env = fake.environment()
        with AgentProcess("--backend", "nvml", "--sample.interval", "1s", env=env) as agent:
            agent.wait_ready()
            peer = peer_log = None
            if exporter:
                peer_port = free_port()
                peer_log = open(Path(tmp) / "nvitop.log", "w+")
                peer = subprocess.Popen([exporter, "--bind-address", "127.0.0.1", "--port", str(peer_port),
                                         "--interval", "1"], env=subprocess_env(env), stdout=peer_log,
                                        stderr=subprocess.STDOUT)
                time.sleep(2)  # its first collection
            try:
                ours = CpuMeter(agent.process())
                theirs = CpuMeter(psutil.Process(peer.pid)) if peer and peer.poll() is None else None
                time.sleep(seconds)
                our_cpu, our_rss = ours.share(), agent.rss_bytes() / MIB
                our_series = _gpu_series(agent.metrics_text())
                section.figures.append(Figure("gpuphase RSS", our_rss, "MiB"))
                section.figures.append(Figure("gpuphase CPU share", our_cpu * 100, "%"))
                section.figures.append(Figure("gpuphase GPU series", our_series, "series"))
                if theirs is not None and peer.poll() is None:
                    their_cpu, their_rss = theirs.share(), psutil.Process(peer.pid).memory_info().rss / MIB
                    status, body = http_get(peer_port, "/metrics")
                    their_series = _gpu_series(body.decode()) if status == 200 else 0
                    section.figures.append(Figure("nvitop-exporter RSS", their_rss, "MiB", "gpuphase RSS", our_rss))
                    section.figures.append(Figure("nvitop-exporter CPU share", their_cpu * 100, "%",
                                                  "gpuphase CPU share", our_cpu * 100))
                    section.figures.append(Figure("nvitop-exporter GPU series", their_series, "series",
                                                  "gpuphase GPU series", our_series))
            finally:
                if peer:
                    peer.terminate()
                    peer.wait(10)
            if peer_log:
                peer_log.seek(0)
                log = peer_log.read()
                peer_log.close()
                missing = _missing_functions(log)
                tracebacks = log.count("Traceback")
                section.notes.append(
                    f"nvitop-exporter ran on the fake library; it logged {tracebacks} tracebacks"
                    + (f" for NVML functions the fake does not export ({', '.join(missing)}) and kept "
                       "serving" if missing else "") + ".")
            else:
                section.notes.append("nvitop-exporter is not installed (the `bench` extra: `pip install -e '.[bench]'`): not measured.")
    section.notes.append("nvidia-smi per-call cost: not measured here (no GPU; it needs a real driver).")
    section.notes.append("dcgm-exporter needs DCGM and a real GPU: not measured here.")
    return section


def quick_kwargs() -> dict:
    return {"seconds": 10.0}
