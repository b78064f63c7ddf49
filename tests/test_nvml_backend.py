"""NvmlBackend through the real pynvml ctypes layer, against the fake libnvidia-ml.so.1 in tests/fakenvml."""

from __future__ import annotations

import ctypes
import math
import os
import subprocess
import sys
import threading
import time

import pynvml
import pytest

from gpuphase.agent.backends import BackendUnavailable, GpuLost
from gpuphase.agent.backends.nvml import NvmlBackend
from gpuphase.agent.backends.nvml import fields as nvml_fields
from tests.fakenvml import FakeNvml

GIB = 1024**3
EVENT_WAIT_MS = 50  # short XID waits so close() (and each test) ends quickly
GPM_RATIOS = (
    "gpu_sm_active_ratio", "gpu_sm_occupancy_ratio", "gpu_tensor_active_ratio", "gpu_dram_active_ratio",
    "gpu_fp16_active_ratio", "gpu_fp32_active_ratio", "gpu_fp64_active_ratio",
)
CLOCK_EVENT_REASONS = {
    "gpu_idle", "applications_clocks_setting", "sw_power_cap", "hw_slowdown", "sync_boost",
    "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown", "display_clock_setting",
}


@pytest.fixture
def fake(fake_nvml_library, tmp_path):
    with FakeNvml(fake_nvml_library, tmp_path).activate() as fake:
        fake.control({"gpus": 2, "gpu1.gpm": False})  # GPU 0 Hopper-like, GPU 1 Ampere-like
        yield fake


@pytest.fixture
def backend(fake):
    backend = NvmlBackend(event_wait_ms=EVENT_WAIT_MS)
    yield backend
    backend.close()


def eventually(probe, timeout=10.0):
    """Poll probe() until it returns something truthy; fail with the last value after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {result!r})")
        time.sleep(0.02)


def read_until(backend, index, condition):
    """Poll backend.read(index) until condition(reading) holds; return that reading."""

    def probe():
        reading = backend.read(index)
        return reading if condition(reading) else None

    return eventually(probe)


def read_with_gpm(backend, index):
    """GPM needs two samples >= 100 ms apart: poll until the ratios appear."""
    return read_until(backend, index, lambda r: "gpu_sm_active_ratio" in r.values)


@pytest.mark.parametrize("c_name, ctypes_struct", [
    ("nvmlPciInfo_t", pynvml.nvmlPciInfo_t),
    ("nvmlMemory_t", pynvml.c_nvmlMemory_t),
    ("nvmlMemory_v2_t", pynvml.c_nvmlMemory_v2_t),
    ("nvmlUtilization_t", pynvml.c_nvmlUtilization_t),
    ("nvmlFieldValue_t", pynvml.c_nvmlFieldValue_t),
    ("nvmlProcessInfo_v2_t", pynvml.c_nvmlProcessInfo_v3_t),
    ("nvmlProcessUtilizationSample_t", pynvml.c_nvmlProcessUtilizationSample_t),
    ("nvmlEventData_t", pynvml.c_nvmlEventData_t),
    ("nvmlGpmMetric_t", pynvml.c_nvmlGpmMetric_t),
    ("nvmlGpmMetricsGet_t", pynvml.c_nvmlGpmMetricsGet_t),
    ("nvmlGpmSupport_t", pynvml.c_nvmlGpmSupport_t),
    ("nvmlTemperature_v1_t", pynvml.c_nvmlTemperature_v1_t),
])
def test_fake_struct_layouts_match_pynvml(fake, c_name, ctypes_struct):
    assert fake.sizeof(c_name) == ctypes.sizeof(ctypes_struct)


@pytest.mark.parametrize("value_type, member, value", [
    (pynvml.NVML_VALUE_TYPE_DOUBLE, "dVal", -2.5),
    (pynvml.NVML_VALUE_TYPE_UNSIGNED_INT, "uiVal", 0xFFFF_FFFE),
    (pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG, "ulVal", 123456789),
    (pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, "ullVal", 2**64 - 3),
    (pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG, "sllVal", -(2**62)),
    (pynvml.NVML_VALUE_TYPE_SIGNED_INT, "siVal", -7),
    (pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT, "usVal", 65535),
])
@pytest.mark.parametrize("stale", [0, 0xFFFF_FFFF_FFFF_FFFF])  # the union's bytes before the driver's answer
def test_field_answers_decode_every_value_type_from_the_driver_layout(value_type, member, value, stale):
    """The field-values answer is unpacked in one go rather than read member by member: each
    value type must come out as pynvml's union reads it, whatever the union's other bytes hold."""
    request = nvml_fields.FieldRequest(nvml_fields.FIELDS[:2])
    entries = (pynvml.c_nvmlFieldValue_t * 2).from_buffer(request._entries)  # as the driver sees them
    for entry, status in zip(entries, (pynvml.NVML_SUCCESS, pynvml.NVML_ERROR_NOT_SUPPORTED)):
        entry.value.ullVal = stale
        setattr(entry.value, member, value)
        entry.valueType, entry.nvmlReturn = value_type, status

    answers = request._unpack(request._entries)

    assert answers[0::3] == (value_type, value_type)
    assert answers[1::3] == (pynvml.NVML_SUCCESS, pynvml.NVML_ERROR_NOT_SUPPORTED)
    assert nvml_fields.DECODE[value_type](answers[2]) == float(getattr(entries[0].value, member)) == float(value)


def test_discover_reports_identity_of_every_gpu(backend):
    gpus = backend.discover()

    assert [g.index for g in gpus] == [0, 1]
    assert len({g.uuid for g in gpus}) == 2 and all(g.uuid.startswith("GPU-") for g in gpus)
    assert gpus[0].name == "NVIDIA H100 80GB HBM3" and gpus[1].name == "NVIDIA A100-SXM4-80GB"
    assert [g.pci_bus_id for g in gpus] == ["00000000:18:00.0", "00000000:28:00.0"]
    assert {(g.driver_version, g.cuda_version) for g in gpus} == {("550.54.15", "12.4")}
    assert all(g.serial for g in gpus)
    assert [g.gpm_supported for g in gpus] == [True, False]


def test_hopper_reports_gpm_ratios_and_ampere_leaves_them_out(backend):
    backend.discover()
    assert not set(GPM_RATIOS) & set(backend.read(0).values), "first tick has no previous GPM sample"

    hopper = read_with_gpm(backend, 0).values
    ampere = backend.read(1).values

    for name in GPM_RATIOS:
        assert 0.0 <= hopper[name] <= 1.0, name
        assert name not in ampere
    assert "gpu_utilization_ratio" in ampere


def test_values_are_in_base_units(backend, fake):
    fake.control({
        "gpu0.field.190": 450000,  # power limit, mW
        "gpu0.field.3": 7,  # volatile correctable ECC errors
        "gpu0.field.145": 1,  # a row remapping failed
        "gpu0.clock_reasons": pynvml.nvmlClocksEventReasonSwPowerCap | pynvml.nvmlClocksEventReasonHwThermalSlowdown,
    })
    backend.discover()
    reading = backend.read(0)
    values, labelled = reading.values, reading.labelled

    assert values["gpu_power_limit_watts"] == 450.0
    assert 290.0 <= values["gpu_power_watts"] <= 410.0  # the fake draws 350 +- 50 W
    assert values["gpu_energy_joules_total"] > 1000 * 290  # > 1000 s of uptime at >= 290 W, in J not mJ
    assert values["gpu_memory_total_bytes"] == 80 * GIB
    assert values["gpu_memory_used_bytes"] + values["gpu_memory_free_bytes"] == values["gpu_memory_total_bytes"]
    assert values["gpu_nvlink_transmit_bytes_total"] % 1024 == 0  # KiB -> bytes
    assert values["gpu_pcie_transmit_bytes_total"] > 0 and "gpu_pcie_replay_errors_total" in values
    assert 20 <= values["gpu_temperature_celsius"] <= 100
    assert 20 <= values["gpu_memory_temperature_celsius"] <= 100
    for name in ("gpu_utilization_ratio", "gpu_memory_controller_busy_ratio"):
        assert 0.0 <= values[name] <= 1.0
    assert set(labelled["gpu_clock_hertz"]) == {"graphics", "sm", "memory", "video"}
    assert labelled["gpu_clock_hertz"]["memory"] == 2619e6
    assert labelled["gpu_ecc_errors_total"] == {"correctable": 7.0, "uncorrectable": 0.0}
    assert labelled["gpu_remapped_rows"] == {"correctable": 0.0, "uncorrectable": 0.0, "pending": 0.0, "failure": 1.0}
    active = labelled["gpu_clock_event_active"]
    assert set(active) == CLOCK_EVENT_REASONS
    assert {reason for reason, on in active.items() if on} == {"sw_power_cap", "hw_thermal_slowdown"}


def test_counters_never_decrease(backend):
    backend.discover()
    counters = ("gpu_energy_joules_total", "gpu_pcie_transmit_bytes_total", "gpu_pcie_receive_bytes_total",
                "gpu_nvlink_transmit_bytes_total", "gpu_nvlink_receive_bytes_total")
    readings = [backend.read(1).values for _ in range(5)]
    last = readings[-1]["gpu_pcie_receive_bytes_total"]
    readings.append(read_until(backend, 1, lambda r: r.values["gpu_pcie_receive_bytes_total"] > last).values)
    for name in counters:
        series = [r[name] for r in readings]
        assert series == sorted(series), name
        assert series[-1] > series[0], name


def test_unsupported_metrics_are_left_out_and_probed_only_once(backend, fake):
    fake.control({"gpu0.unsupported": ["field83", "nvmlDeviceGetCurrentClocksEventReasons", "gpm10"]})
    backend.discover()

    read_with_gpm(backend, 0)
    readings = [backend.read(0) for _ in range(5)]

    for reading in readings:
        assert "gpu_energy_joules_total" not in reading.values
        assert "gpu_clock_event_active" not in reading.labelled
        assert "gpu_dram_active_ratio" not in reading.values
        assert "gpu_power_watts" in reading.values and "gpu_sm_active_ratio" in reading.values
    assert fake.call_count("nvmlDeviceGetFieldValues") >= 6
    assert fake.call_count("field83") == 1
    assert fake.call_count("nvmlDeviceGetCurrentClocksEventReasons") == 1
    assert fake.call_count("gpm10") == 1
    # the other GPU is unaffected
    assert "gpu_clock_event_active" in backend.read(1).labelled


def test_temperature_falls_back_to_the_deprecated_call_on_old_drivers(backend, fake):
    fake.control({"gpu0.unsupported": "nvmlDeviceGetTemperatureV"})
    backend.discover()
    for _ in range(3):
        assert 20 <= backend.read(0).values["gpu_temperature_celsius"] <= 100
    assert fake.call_count("nvmlDeviceGetTemperatureV") == 1
    assert fake.call_count("nvmlDeviceGetTemperature") == 3


def test_discover_after_close_starts_again(fake):
    backend = NvmlBackend(event_wait_ms=EVENT_WAIT_MS)
    first = backend.discover()
    backend.close()
    try:
        assert backend.discover() == first
        fake.control({"gpu1.xid": [48]})
        eventually(lambda: backend.read(1).labelled.get("gpu_xid_errors_total") == {"48": 1.0})
    finally:
        backend.close()


def test_processes_and_no_permission(backend, fake):
    fake.control({
        "gpu0.processes": {1234: 2 * GIB, 5678: GIB},
        "gpu0.no_permission": "nvmlDeviceGetComputeRunningProcesses_v3",
        "gpu1.processes": {1234: 2 * GIB, 5678: GIB},
    })
    backend.discover()

    for _ in range(3):
        denied = backend.read(0)
        assert denied.processes == ()
        assert "gpu_processes" not in denied.values, "unknown is not 'no processes'"
    assert fake.call_count("nvmlDeviceGetComputeRunningProcesses_v3") == 1

    allowed = backend.read(1)
    assert allowed.values["gpu_processes"] == 2
    assert {(p.pid, p.memory_used_bytes) for p in allowed.processes} == {(1234, 2.0 * GIB), (5678, 1.0 * GIB)}
    assert all(0.0 <= p.sm_active_ratio <= 1.0 for p in allowed.processes)
    assert allowed.values["gpu_memory_used_bytes"] >= 3 * GIB


def test_process_share_is_kept_when_no_new_samples(backend, fake):
    fake.control({"gpu1.processes": {42: GIB}})
    backend.discover()
    first = backend.read(1).processes[0].sm_active_ratio
    # back-to-back reads mostly fall in the same 100 ms sample period: NotFound, keep the old share
    later = [backend.read(1).processes[0].sm_active_ratio for _ in range(3)]
    assert first is not None and None not in later
    fake.control({"gpu1.processes": {}})
    assert backend.read(1).processes == ()


def test_lost_gpu_raises_for_that_gpu_only_and_recovers(backend, fake):
    identities = backend.discover()
    backend.read(0)

    fake.control({"gpu0.lost": True})
    with pytest.raises(GpuLost):
        backend.read(0)
    assert "gpu_utilization_ratio" in backend.read(1).values
    with pytest.raises(GpuLost):
        backend.recover(0)

    fake.control({"gpu0.lost": None})
    assert backend.recover(0) == identities[0]
    assert 0.0 <= read_with_gpm(backend, 0).values["gpu_sm_active_ratio"] <= 1.0


def test_gpu_lost_at_discovery_is_reported_and_recovered_later(backend, fake):
    fake.control({"gpu1.lost": True})
    identities = backend.discover()
    assert len(identities) == 2
    with pytest.raises(GpuLost):
        backend.read(1)
    fake.control({"gpu1.lost": None})
    assert backend.recover(1).uuid.startswith("GPU-")
    assert "gpu_utilization_ratio" in backend.read(1).values


def test_a_hanging_call_blocks_only_its_gpu(backend, fake):
    backend.discover()
    fake.control({"gpu0.hang.nvmlDeviceGetUtilizationRates": 60})
    results = []
    hung = threading.Thread(target=lambda: results.append(backend.read(0)), daemon=True)
    hung.start()
    eventually(lambda: fake.call_count("nvmlDeviceGetUtilizationRates") == 1)  # GPU 0 is inside the call

    assert "gpu_utilization_ratio" in backend.read(1).values
    assert hung.is_alive() and not results

    fake.control({"gpu0.hang.nvmlDeviceGetUtilizationRates": None})  # the hang ends when released
    hung.join(timeout=10)
    assert not hung.is_alive() and "gpu_utilization_ratio" in results[0].values


def test_a_configured_hang_ends_by_itself(backend, fake):
    backend.discover()
    fake.control({"gpu0.hang.nvmlDeviceGetMemoryInfo": 0.3})
    done = threading.Event()
    threading.Thread(target=lambda: (backend.read(0), done.set()), daemon=True).start()
    assert done.wait(timeout=10)


def test_xid_events_are_counted_per_xid(backend, fake):
    backend.discover()
    fake.control({"gpu0.xid": [79, 79, 13]})

    eventually(lambda: backend.read(0).labelled.get("gpu_xid_errors_total") == {"79": 2.0, "13": 1.0})
    fake.control({"gpu0.xid": [79, 79, 13, 31]})  # the list is cumulative: one more event
    eventually(lambda: backend.read(0).labelled.get("gpu_xid_errors_total") == {"79": 2.0, "13": 1.0, "31": 1.0})
    assert "gpu_xid_errors_total" not in backend.read(1).labelled


def test_xid_storm_keeps_counting(backend, fake):
    backend.discover()
    fake.control({"gpu1.xid_storm": "43:500"})
    eventually(lambda: backend.read(1).labelled.get("gpu_xid_errors_total", {}).get("43", 0) >= 100)


def test_close_stops_the_event_thread(fake):
    backend = NvmlBackend(event_wait_ms=EVENT_WAIT_MS)
    backend.discover()
    assert any(t.name == "nvml-xid-events" for t in threading.enumerate())
    backend.close()
    assert not any(t.name == "nvml-xid-events" and t.is_alive() for t in threading.enumerate())
    assert fake.call_count("nvmlEventSetFree") == 1
    assert fake.call_count("nvmlGpmSampleFree") == 2  # the Hopper GPU's two samples
    assert fake.call_count("nvmlShutdown") == 1


def test_driver_not_loaded_is_a_clear_error(backend, fake):
    fake.control({"driver_missing": True})
    with pytest.raises(BackendUnavailable, match="driver is not loaded") as caught:
        backend.discover()
    assert "--backend sim" in str(caught.value)


def test_missing_library_is_a_clear_error(monkeypatch):
    def no_library(name, *args, **kwargs):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(pynvml, "nvmlLib", None)
    monkeypatch.setattr(pynvml, "CDLL", no_library)
    monkeypatch.setattr(pynvml, "_nvmlGetFunctionPointer_cache", {})
    with pytest.raises(BackendUnavailable, match="libnvidia-ml.so.1 not found") as caught:
        NvmlBackend(event_wait_ms=EVENT_WAIT_MS).discover()
    assert "--backend sim" in str(caught.value)


def test_subprocess_finds_the_fake_through_ld_library_path(fake_nvml_library, tmp_path):
    fake = FakeNvml(fake_nvml_library, tmp_path)
    fake.control(gpus=3)
    script = "import pynvml; pynvml.nvmlInit(); print(pynvml.nvmlDeviceGetCount())"
    env = {**os.environ, **fake.environment()}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3"


def test_gpm_and_energy_stay_finite_over_many_reads(backend):
    backend.discover()
    read_with_gpm(backend, 0)
    for _ in range(20):
        values = backend.read(0).values
        assert all(math.isfinite(v) for v in values.values())
