"""Figure 2: the cost of one sampling tick for 8 GPUs on the fake libnvidia-ml, against bare pynvml.

Both sides go through the real pynvml ctypes layer into tests/fakenvml's library, so the driver
cost is the same small constant on both and the ratio isolates what the backend and the sampler
add (error handling, probing, unit conversion, snapshots, one worker thread per GPU).

Rounds are paced 100 ms apart, as NVML wants for GPM samples: the backend skips a GPM read that
comes sooner, and the baseline must do exactly the same calls. CPU is process time (all threads:
the per-GPU workers and the XID watcher are part of the agent's cost); wall is perf_counter.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pynvml

from agent.backends.nvml import _FIELDS, NvmlBackend
from agent.config import Config
from agent.sampler import Sampler
from agent.snapshot import GpuIdentity, GpuReading
from benchmarks.harness import percentile
from benchmarks.results import Figure, Section
from tests.fakenvml import FakeNvml, build_fake_nvml

GPUS = 8
PACE = 0.1  # seconds between rounds: GPM's minimum sample spacing
GOAL = 1.3


def fake_control(gpus: int = GPUS) -> dict:
    """8 Hopper-like GPUs, each with one compute process (so the process calls return data)."""
    settings: dict = {"gpus": gpus}
    for index in range(gpus):
        settings[f"gpu{index}.processes"] = {4000 + index: 70 * 2**30}
    return settings


class BarePynvml:
    """The calls one tick makes per GPU, written straight against pynvml with nothing around them."""

    def __init__(self, gpus: int):
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(gpus)]
        self.field_ids = [(f.field_id, f.scope) for f in _FIELDS]
        self.gpm = []
        for handle in self.handles:
            request = pynvml.c_nvmlGpmMetricsGet_t()
            request.version = pynvml.NVML_GPM_METRICS_GET_VERSION
            request.numMetrics = 7
            for slot, metric in enumerate((2, 3, 5, 10, 13, 12, 11)):
                request.metrics[slot].metricId = metric
            previous = pynvml.nvmlGpmSampleAlloc()
            pynvml.nvmlGpmSampleGet(handle, previous)  # the first sample; ticks compare against it
            self.gpm.append([handle, previous, pynvml.nvmlGpmSampleAlloc(), request])
        self.seen_us = [0] * gpus

    def tick(self) -> None:
        for i, handle in enumerate(self.handles):
            pynvml.nvmlDeviceGetUtilizationRates(handle)
            pynvml.nvmlDeviceGetMemoryInfo(handle)
            pynvml.nvmlDeviceGetTemperatureV(handle, pynvml.NVML_TEMPERATURE_GPU)
            pynvml.nvmlDeviceGetFieldValues(handle, self.field_ids)
            for clock in (pynvml.NVML_CLOCK_GRAPHICS, pynvml.NVML_CLOCK_SM, pynvml.NVML_CLOCK_MEM,
                          pynvml.NVML_CLOCK_VIDEO):
                pynvml.nvmlDeviceGetClockInfo(handle, clock)
            pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle)
            gpm = self.gpm[i]
            pynvml.nvmlGpmSampleGet(handle, gpm[2])
            gpm[3].sample1, gpm[3].sample2 = gpm[1], gpm[2]
            pynvml.nvmlGpmMetricsGet(gpm[3])
            gpm[1], gpm[2] = gpm[2], gpm[1]
            pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            try:
                samples = pynvml.nvmlDeviceGetProcessUtilization(handle, self.seen_us[i])
                self.seen_us[i] = max([self.seen_us[i], *(s.timeStamp for s in samples)])
            except pynvml.NVMLError_NotFound:
                pass

    def close(self) -> None:
        for _handle, first, second, _request in self.gpm:
            pynvml.nvmlGpmSampleFree(first)
            pynvml.nvmlGpmSampleFree(second)


class NullBackend:
    """GPUs that answer at once with a constant reading: what Sampler.tick() costs by itself."""

    name = "null"

    def __init__(self, gpus: int):
        self._identities = [GpuIdentity(index=i, uuid=f"GPU-null-{i}", name="null", pci_bus_id="",
                                        driver_version="", cuda_version="", gpm_supported=False)
                            for i in range(gpus)]
        self._reading = GpuReading(values={"gpu_utilization_ratio": 0.5}, labelled={}, processes=(), mig=())

    def discover(self) -> list[GpuIdentity]:
        return self._identities

    def read(self, index: int) -> GpuReading:
        return self._reading

    def recover(self, index: int) -> GpuIdentity:
        return self._identities[index]

    def close(self) -> None:
        pass


def _sampler_rounds(backend, rounds: int) -> tuple[list[float], list[float]]:
    sampler = Sampler(backend, interval=1.0, timeout=5.0)
    sampler.start(run_loop=False)
    try:
        sampler.tick()
        return _paced(rounds, sampler.tick)
    finally:
        sampler.stop()


def _paced(rounds: int, work) -> tuple[list[float], list[float]]:
    """(cpu seconds, wall seconds) of each of `rounds` calls of work(), started PACE apart."""
    cpu, wall = [], []
    next_round = time.monotonic()
    for _ in range(rounds):
        time.sleep(max(0.0, next_round - time.monotonic()))
        next_round += PACE
        c0, w0 = time.process_time(), time.perf_counter()
        work()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return cpu, wall


def measure(rounds: int, directory: Path) -> dict[str, tuple[list[float], list[float]]]:
    library = build_fake_nvml(directory / "build")
    out = {}
    with FakeNvml(library, directory / "run").activate() as fake:
        fake.control(fake_control())
        pynvml.nvmlInit()
        try:
            bare = BarePynvml(GPUS)
            time.sleep(PACE)
            out["bare"] = _paced(rounds, bare.tick)
            bare.close()
        finally:
            pynvml.nvmlShutdown()

        backend = NvmlBackend(Config(), event_wait_ms=500)
        indices = [identity.index for identity in backend.discover()]
        try:
            def read_all() -> None:
                for index in indices:
                    backend.read(index)
            read_all()
            out["backend"] = _paced(rounds, read_all)
        finally:
            backend.close()

        out["machinery"] = _sampler_rounds(NullBackend(GPUS), rounds)
        backend = NvmlBackend(Config(), event_wait_ms=500)
        sampler = Sampler(backend, interval=1.0, timeout=5.0)
        sampler.start(run_loop=False)
        try:
            sampler.tick()
            out["sampler"] = _paced(rounds, sampler.tick)
        finally:
            sampler.stop()
            backend.close()
    return out


def run(rounds: int = 100) -> Section:
    with tempfile.TemporaryDirectory(prefix="gpuphase-bench-nvml-") as tmp:
        data = measure(rounds, Path(tmp))
    bare_cpu = percentile(data["bare"][0], 50)
    section = Section(
        "sampling", "Sampling cost per tick, 8 GPUs (fake libnvidia-ml through pynvml)",
        f"{rounds} rounds paced {PACE:g} s apart, each reading all 8 GPUs: the bare pynvml calls of one tick "
        "(utilization, memory, temperature, one batched field-values call, 4 clocks, clock-event reasons, GPM "
        "sample + metrics, running processes, process utilization), then `NvmlBackend.read()` for each GPU, "
        "then `Sampler.tick()` (per-GPU worker threads, snapshot). Medians; CPU is process time.")
    for key, title in (("backend", "NvmlBackend.read() × 8"), ("sampler", "Sampler.tick(), 8 GPUs")):
        cpu, wall = data[key]
        ratio = percentile(cpu, 50) / bare_cpu
        met = ratio <= GOAL
        note = "" if met else _miss_note(key, percentile(data["machinery"][0], 50))
        section.figures.append(Figure(f"{title}: CPU per tick", percentile(cpu, 50) * 1e6, "µs",
                                      "bare pynvml loop, CPU", bare_cpu * 1e6, f"≤ {GOAL}× baseline", met, note))
        section.figures.append(Figure(f"{title}: wall per tick", percentile(wall, 50) * 1e6, "µs",
                                      "bare pynvml loop, wall", percentile(data["bare"][1], 50) * 1e6))
    machinery = percentile(data["machinery"][0], 50)
    section.figures.append(Figure("Sampler.tick(), 8 GPUs answering at once (no NVML): CPU per tick",
                                  machinery * 1e6, "µs", "bare pynvml loop, CPU", bare_cpu * 1e6))
    section.notes.append(f"p99 CPU per tick: bare {percentile(data['bare'][0], 99) * 1e6:.0f} µs, backend "
                         f"{percentile(data['backend'][0], 99) * 1e6:.0f} µs, sampler "
                         f"{percentile(data['sampler'][0], 99) * 1e6:.0f} µs.")
    section.notes.append(f"The bare loop costs {bare_cpu / GPUS * 1e6:.0f} µs of CPU per GPU here, pynvml's "
                         "ctypes marshalling plus the fake's own work. A real driver adds microseconds to "
                         "milliseconds per call to both sides alike, so on real GPUs the ratio moves towards 1.")
    return section


def _miss_note(key: str, machinery_cpu: float) -> str:
    if key == "backend":
        return ("With a fake driver that answers in nanoseconds, the Python around the calls is all there is to "
                "compare: building the reading's dicts, converting units, checking each call's and each field's "
                "status. Field values and GPM results are already read through plain ctypes views; caching "
                "bound methods and building fewer dicts would be next.")
    return (f"Of this, {machinery_cpu * 1e6:,.0f} µs is the tick's own machinery, measured with GPUs that answer at "
            "once (the figure below): eight thread hand-offs (wake the GPU's worker, be woken when it is done), "
            "which cost this much on this VM. That is the price of isolating a hung GPU on its own thread; "
            "reading every GPU on one thread and moving only a GPU that hangs onto a thread of its own would "
            "remove most of it.")


def quick_kwargs() -> dict:
    return {"rounds": 15}
