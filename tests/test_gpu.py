"""The NVML backend and the agent on real NVIDIA GPUs (marker `gpu`), and the same checks on the fake.

Every test runs twice: against the host's driver (`[driver]`, marked gpu: skipped, with the
reason, where NVML cannot start; run them on a GPU host with `pytest -m gpu -ra`) and against
tests/fakenvml set up as 8 GPUs, seven H100s and an A100 (`[fake]`, always), so that the checks a real GPU
gets cannot rot where CI has none. What the driver showed belongs in docs/validation/.

Checked: discovery agrees with NVML's own count and identity calls; every device metric is in
its physical range; GPM is detected on Hopper and newer and its ratios appear within two reads;
metrics a GPU does not support are absent rather than 0; a real CUDA process (driver only: a
context and 256 MiB allocated through libcuda with ctypes, no CUDA toolkit) appears with its
memory; and `gpuphase run --backend nvml` serves a scrape that promtool accepts.
"""

from __future__ import annotations

import ctypes.util
import math
import os
import subprocess
import sys
import time

import pynvml
import pytest

from gpuphase.agent.backends.nvml import NvmlBackend
from tests.agentproc import AgentProcess, poll
from tests.conftest import require_tool
from tests.fakenvml import FakeNvml

GIB = 1024**3
CUDA_ALLOCATION = 256 * 1024**2
RATIOS = ("gpu_utilization_ratio", "gpu_memory_controller_busy_ratio", "gpu_sm_active_ratio",
          "gpu_sm_occupancy_ratio", "gpu_tensor_active_ratio", "gpu_dram_active_ratio",
          "gpu_fp16_active_ratio", "gpu_fp32_active_ratio", "gpu_fp64_active_ratio")
COUNTERS = ("gpu_energy_joules_total", "gpu_pcie_transmit_bytes_total", "gpu_pcie_receive_bytes_total",
            "gpu_nvlink_transmit_bytes_total", "gpu_nvlink_receive_bytes_total")
# Architectures with GPM (NVML_DEVICE_ARCH_HOPPER = 9 and later), by the name a driver reports.
GPM_NAMES = ("H100", "H200", "H800", "H20", "GH200", "B100", "B200", "GB200")


def _driver_gpus() -> int:
    """GPUs the host's own NVML reports; skip (with the reason) where there is none."""
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError) as error:
        pytest.skip(f"no NVIDIA driver here ({error})")
    try:
        count = pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()
    if count == 0:
        pytest.skip("the NVIDIA driver reports no GPU")
    return count


@pytest.fixture(scope="module", params=[pytest.param("driver", marks=pytest.mark.gpu), "fake"])
def host(request, fake_nvml_library, tmp_path_factory):
    """(kind, environment for a subprocess agent), with this process's pynvml pointed at the GPUs."""
    if request.param == "driver":
        _driver_gpus()
        yield "driver", {}
        return
    fake = FakeNvml(fake_nvml_library, tmp_path_factory.mktemp("gpu-fake"))
    fake.control({"gpus": 8, "gpu7.gpm": False, "gpu0.processes": {os.getpid(): CUDA_ALLOCATION}})
    with fake.activate():
        yield "fake", fake.environment()


@pytest.fixture(scope="module")
def backend(host):
    backend = NvmlBackend()
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def identities(backend):
    return backend.discover()


def _nvml_truth() -> list[tuple[str, str, str]]:
    """(uuid, name, pci bus id) of each GPU, from pynvml directly: what discovery must agree with."""
    pynvml.nvmlInit()
    try:
        out = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            pci = pynvml.nvmlDeviceGetPciInfo(handle).busId
            out.append((_text(pynvml.nvmlDeviceGetUUID(handle)), _text(pynvml.nvmlDeviceGetName(handle)),
                        _text(pci)))
        return out
    finally:
        pynvml.nvmlShutdown()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _has_gpm(name: str) -> bool:
    return any(model in name for model in GPM_NAMES)


def _two_readings(backend, index):
    """Two readings at least GPM's minimum 100 ms apart (GPM ratios need a pair of samples)."""
    first = backend.read(index)
    time.sleep(0.25)
    return first, backend.read(index)


def test_discovery_agrees_with_nvml(identities):
    truth = _nvml_truth()
    assert [i.index for i in identities] == list(range(len(truth)))
    assert [(i.uuid, i.name) for i in identities] == [(uuid, name) for uuid, name, _ in truth]
    for identity, (_, _, pci) in zip(identities, truth):
        assert identity.uuid.startswith(("GPU-", "MIG-")), identity
        assert identity.pci_bus_id.lower() == pci.lower(), identity
        assert identity.driver_version and identity.driver_version[0].isdigit(), identity
        assert identity.cuda_version and identity.cuda_version[0].isdigit(), identity


def test_gpm_is_detected_on_hopper_and_newer(identities):
    for identity in identities:
        if _has_gpm(identity.name):
            assert identity.gpm_supported, f"{identity.name} has GPM, but the probe said no"


def test_every_device_metric_is_in_its_physical_range(backend, identities):
    for identity in identities:
        first, second = _two_readings(backend, identity.index)
        values = second.values
        total, used, free = (values.get(f"gpu_memory_{k}_bytes") for k in ("total", "used", "free"))
        assert total and total >= 1 * GIB, (identity, values)
        assert used is not None and free is not None and 0 <= used <= total and 0 <= free <= total
        assert used + free == pytest.approx(total, rel=0.02)  # reserved memory sits outside both on some drivers
        for name in RATIOS:
            if name in values:
                assert 0.0 <= values[name] <= 1.0, (identity.index, name, values[name])
        power, limit = values.get("gpu_power_watts"), values.get("gpu_power_limit_watts")
        assert power is not None and 0 < power < 2000, (identity.index, power)
        assert limit is not None and 50 <= limit <= 2000, (identity.index, limit)
        assert 0 < values["gpu_temperature_celsius"] < 120
        clocks = second.labelled.get("gpu_clock_hertz", {})
        assert clocks.get("sm", 0) > 1e8 and clocks.get("memory", 0) > 1e8, clocks
        for name in COUNTERS:
            if name in first.values and name in second.values:
                assert second.values[name] >= first.values[name] >= 0, (identity.index, name)
        for value in (*values.values(), *(v for by in second.labelled.values() for v in by.values())):
            assert math.isfinite(value), values
        if identity.gpm_supported:
            assert {"gpu_sm_active_ratio", "gpu_tensor_active_ratio", "gpu_dram_active_ratio"} <= set(values)
        else:
            assert not {"gpu_sm_active_ratio", "gpu_tensor_active_ratio", "gpu_dram_active_ratio"} & set(values)


def test_unsupported_metrics_are_absent_not_zero(backend, identities):
    """A metric is either read (present) or, after its one probe, left out: never a placeholder 0
    for something the GPU cannot measure. The set of metrics stays the same from read to read."""
    for identity in identities:
        first, second = _two_readings(backend, identity.index)
        third = backend.read(identity.index)
        assert set(third.values) == set(second.values), identity.index
        assert set(third.labelled) == set(second.labelled), identity.index


def test_a_cuda_process_appears_with_its_memory(host, backend, identities):
    kind, _ = host
    if kind == "driver":
        child = _start_cuda_process()
        pid = child.pid
    else:  # the fake was told at set-up that this process holds CUDA_ALLOCATION on GPU 0
        child, pid = None, os.getpid()
    try:
        def seen():
            for identity in identities:
                for process in backend.read(identity.index).processes:
                    if process.pid == pid:
                        return process
            return None

        process = poll(seen, timeout=30, interval=0.5, message=f"pid {pid} among NVML's compute processes")
        assert process.memory_used_bytes is not None and process.memory_used_bytes >= CUDA_ALLOCATION
        assert process.sm_active_ratio is None or 0.0 <= process.sm_active_ratio <= 1.0
    finally:
        if child is not None:
            child.kill()
            child.wait()


_CUDA_PROCESS = f"""
import ctypes, sys, time
cuda = ctypes.CDLL(sys.argv[1])
def check(result, what):
    if result != 0:
        sys.exit(f"{{what}} failed: CUresult {{result}}")
device, context, memory = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_void_p()
check(cuda.cuInit(0), "cuInit")
check(cuda.cuDeviceGet(ctypes.byref(device), 0), "cuDeviceGet")
check(cuda.cuCtxCreate_v2(ctypes.byref(context), 0, device), "cuCtxCreate")
check(cuda.cuMemAlloc_v2(ctypes.byref(memory), ctypes.c_size_t({CUDA_ALLOCATION})), "cuMemAlloc")
print("ready", flush=True)
while True:  # keep the device busy with memsets, which run as kernels
    check(cuda.cuMemsetD32_v2(memory, 7, ctypes.c_size_t({CUDA_ALLOCATION // 4})), "cuMemsetD32")
    check(cuda.cuCtxSynchronize(), "cuCtxSynchronize")
    time.sleep(0.01)
"""


def _start_cuda_process() -> subprocess.Popen:
    """A process holding a CUDA context and CUDA_ALLOCATION bytes on GPU 0, through the driver API."""
    library = ctypes.util.find_library("cuda") or "libcuda.so.1"
    child = subprocess.Popen([sys.executable, "-c", _CUDA_PROCESS, library], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    line = child.stdout.readline()
    if line.strip() != "ready":
        child.kill()
        pytest.fail(f"the CUDA test process did not start: {line}{child.stderr.read()}")
    return child


def test_agent_serves_every_gpu_and_promtool_accepts_the_scrape(host, identities):
    _, environment = host
    promtool = require_tool("promtool")
    with AgentProcess(["--backend", "nvml", "--sample.interval", "500ms"], env=environment) as agent:
        expected_gpm = {str(i.index) for i in identities if i.gpm_supported}

        def all_gpus_read():  # GPM ratios need two samples, so they come one tick after gpu_up
            metrics = agent.scrape()
            up = {s.labels["gpu"]: s.value for s in metrics.samples("gpu_up")}
            gpm = {s.labels["gpu"] for s in metrics.samples("gpu_sm_active_ratio")}
            return metrics if up == {str(i.index): 1.0 for i in identities} and gpm >= expected_gpm else None

        metrics = poll(all_gpus_read, timeout=30, message="gpu_up 1 and GPM ratios for every GPU")
        assert {s.labels["gpu"] for s in metrics.samples("gpu_sm_active_ratio")} == expected_gpm
        _, text = agent.get("/metrics")
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
