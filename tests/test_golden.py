"""Golden /metrics output per scenario (node_exporter's e2e-output.txt), each checked by promtool.

The whole pipeline runs — backend, sampler, process resolution, phase accountant, collectors —
under a hand-driven clock, so the output is reproducible byte for byte. When an output change is
intended, regenerate with `UPDATE_GOLDEN=1 pytest tests/test_golden.py` and review the diff.

/metrics is written by exporters.exposition; each scenario is also rendered by prometheus_client's
generate_latest, which must write the same bytes (tests/test_exposition.py does so on random families).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest

from gpuphase.agent.backends.sim import PHASE_ACTIVITY, SimBackend
from gpuphase.agent.phases import PhaseAccountant
from gpuphase.agent.sampler import Sampler
from gpuphase.exporters.registry import StaticViewSource, build_registry, render
from gpuphase.model.phase import DECODE, PREFILL, PhaseWindow
from gpuphase.model.snapshot import ProcessReading, ProcessSample
from gpuphase.model.view import SamplerStats, SpanStats, View
from tests.conftest import require_tool

GOLDEN = Path(__file__).with_name("golden")
START = 1_767_225_600.0  # 2026-01-01T00:00:00Z


class ManualClock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def fake_resolver(identity, readings):
    """Stands in for /proc: names depend on the machine the test runs on."""
    return tuple(ProcessSample(pid=r.pid, process_name="vllm-worker", container="3f2a9c81d4e7",
                               pod="7d0c7d36-2d7e-4c4e-9a57-2f9d7c1e5b11", memory_used_bytes=r.memory_used_bytes,
                               sm_active_ratio=r.sm_active_ratio) for r in readings)


def run_pipeline(backend, clock: ManualClock, ticks: int, windows=(), before_tick=None) -> View:
    accountant = PhaseAccountant(settle=2.0, retention=60.0, max_services=8)
    sampler = Sampler(backend, interval=1.0, timeout=5.0, resolve_processes=fake_resolver,
                      on_sample=[accountant.add_sample], clock=clock)
    identities = sampler.start(run_loop=False)
    try:
        for gpu in identities[:1]:
            accountant.set_mapping((gpu.index, gpu.uuid), ["llama-70b"])
            accountant.add_windows((gpu.index, gpu.uuid), windows)
        for tick in range(ticks):
            if before_tick:
                before_tick(tick)
            snapshot = sampler.tick()
            accountant.advance(snapshot.timestamp)
            clock.now += 1.0
        view = View(snapshot=snapshot, backend=backend.name, phases=accountant.series(),
                    last_span=accountant.last_span(),
                    spans=SpanStats(received={"vllm": len(windows) // 2}, rejected={"malformed": 1}),
                    sampler=SamplerStats(ticks=sampler.stats().ticks, overruns=0, last_tick_duration_seconds=0.0))
    finally:
        sampler.stop()
        backend.close()
    return view


def reproducible(text: str) -> str:
    return re.sub(r'python_version="[^"]*"', 'python_version="X"', text)


def vllm_windows():
    """Two requests on GPU 0: prefill [1,2], decode [2,5]; prefill [3,3.5], decode [3.5,4.5]."""
    def window(phase, start, end, n, tokens):
        return PhaseWindow(phase, START + start, START + end, "llama-70b", "vllm", f"req{n}{phase}".encode(), tokens)

    return (window(PREFILL, 1, 2, 1, 2048), window(DECODE, 2, 5, 1, 75),
            window(PREFILL, 3, 3.5, 2, 1024), window(DECODE, 3.5, 4.5, 2, 25))


def sim_scenario(profile: str) -> View:
    clock = ManualClock(START)
    backend = SimBackend(2, profile, seed=7, clock=clock)
    backend.set_processes(0, (ProcessReading(pid=4242, memory_used_bytes=70 * 2**30),))

    def follow_windows(tick):
        # The simulated GPU 0 does what the windows say: prefill, then mixed, then decode.
        phase = {1: "prefill", 2: "decode", 3: "mixed", 4: "decode"}.get(tick, "idle")
        backend.set_activity(0, PHASE_ACTIVITY[phase])

    return run_pipeline(backend, clock, ticks=9, windows=vllm_windows(), before_tick=follow_windows)


def fake_nvml_scenario(fake_nvml_library, tmp_path) -> View:
    from gpuphase.agent.backends.nvml import NvmlBackend
    from tests.fakenvml import FakeNvml

    with FakeNvml(fake_nvml_library, tmp_path).activate() as fake:
        fake.control({"gpus": 3, "frozen_time": 42.0, "gpu1.gpm": 0, "gpu0.processes": "4242:75161927680",
                      "gpu0.xid": "79,13", "gpu1.unsupported": "field82"})
        backend = NvmlBackend(event_wait_ms=20)
        clock = ManualClock(START)

        def lose_gpu2(tick):
            if tick == 3:
                fake.control({"gpu2.lost": 1})
            if tick == 1:  # let the XID thread deliver before the readings we keep
                import time

                deadline = time.monotonic() + 5
                while time.monotonic() < deadline and not _xids_seen(backend):
                    time.sleep(0.01)

        return run_pipeline(backend, clock, ticks=5, before_tick=lose_gpu2)


def _xids_seen(backend) -> bool:
    reading = backend.read(0)
    return sum(reading.labelled.get("gpu_xid_errors_total", {}).values()) >= 2


@pytest.mark.parametrize("scenario", ["sim-h100", "sim-a100", "fake-nvml"])
def test_golden_metrics(scenario, request, tmp_path):
    if scenario == "fake-nvml":
        view = fake_nvml_scenario(request.getfixturevalue("fake_nvml_library"), tmp_path)
    else:
        view = sim_scenario({"sim-h100": "h100-sxm-80gb", "sim-a100": "a100-sxm-80gb"}[scenario])
    text = reproducible(render(view, timer=lambda: 0.0))
    path = GOLDEN / f"{scenario}.prom"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs; UPDATE_GOLDEN=1 regenerates it (review the diff)"
    by_prometheus_client = generate_latest(build_registry(StaticViewSource(view), timer=lambda: 0.0)).decode()
    assert reproducible(by_prometheus_client) == text


@pytest.mark.parametrize("name", ["sim-h100.prom", "sim-a100.prom", "fake-nvml.prom"])
def test_golden_files_pass_promtool(name):
    promtool = require_tool("promtool")
    text = (GOLDEN / name).read_text()
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


def test_golden_a100_has_no_gpm_and_h100_has_it():
    h100 = (GOLDEN / "sim-h100.prom").read_text()
    a100 = (GOLDEN / "sim-a100.prom").read_text()
    for family in ("gpu_sm_active_ratio", "gpu_tensor_active_ratio", "gpu_dram_active_ratio"):
        assert f"\n{family}{{" in h100
        assert family not in a100
    # Without GPM the phase activity integrals are unknown, not zero.
    assert "gpu_phase_seconds_total{" in a100 and "gpu_phase_tensor_active_seconds_total{" not in a100
