"""Hand-built Views for the exporter tests: every field set on purpose, nothing random.

rich_view() is the scenario that must exercise every metric in gpuphase/model/metrics.yaml:
  GPU 0  H100, GPM, two processes (one without a utilization sample), two MIG instances,
         phases for service "vllm" with activity integrals, an XID
  GPU 1  A100, no GPM: the GPM series must be absent, phase integrals None
  GPU 2  lost (up=False) after having answered once: only gpu_info, gpu_up 0 and the
         last-sample timestamp; its stale values must not be exported
  GPU 3  lost before it ever answered: no last-sample timestamp at all
and the agent's own process figures (fixed ones: a live read varies from scrape to scrape).
"""

from __future__ import annotations

from gpuphase.model.snapshot import GpuIdentity, GpuSample, MigReading, ProcessSample, Snapshot
from gpuphase.model.view import ListenerStats, PhaseSeries, ProcessStats, SamplerStats, SpanStats, View

NOW = 1_700_000_000.0
GIB = 1024.0**3

H100 = GpuIdentity(
    index=0,
    uuid="GPU-00000000-1111-2222-3333-444444444444",
    name="NVIDIA H100 80GB HBM3",
    pci_bus_id="00000000:18:00.0",
    driver_version="550.54.15",
    cuda_version="12.4",
    serial="1650123456789",
    gpm_supported=True,
)
A100 = GpuIdentity(
    index=1,
    uuid="GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
    name="NVIDIA A100-SXM4-80GB",
    pci_bus_id="00000000:2A:00.0",
    driver_version="550.54.15",
    cuda_version="12.4",
)
LOST = GpuIdentity(index=2, uuid="GPU-dead0000-0000-0000-0000-000000000002", name="NVIDIA H100 80GB HBM3",
                   gpm_supported=True)
NEVER_SEEN = GpuIdentity(index=3, uuid="GPU-dead0000-0000-0000-0000-000000000003", name="NVIDIA H100 80GB HBM3")

GPM_VALUES = {
    "gpu_sm_active_ratio": 0.82,
    "gpu_sm_occupancy_ratio": 0.41,
    "gpu_tensor_active_ratio": 0.12,
    "gpu_dram_active_ratio": 0.77,
    "gpu_fp16_active_ratio": 0.10,
    "gpu_fp32_active_ratio": 0.05,
    "gpu_fp64_active_ratio": 0.0,
}


def device_values(power: float, memory_used: float) -> dict[str, float]:
    """The values every GPU of these fixtures reports, GPM or not."""
    total = 80 * GIB
    return {
        "gpu_utilization_ratio": 0.98,
        "gpu_memory_controller_busy_ratio": 0.71,
        "gpu_temperature_celsius": 61.0,
        "gpu_memory_temperature_celsius": 66.0,
        "gpu_memory_total_bytes": total,
        "gpu_memory_used_bytes": memory_used,
        "gpu_memory_free_bytes": total - memory_used,
        "gpu_power_watts": power,
        "gpu_power_limit_watts": 700.0,
        "gpu_energy_joules_total": 1.25e6,
        "gpu_pcie_transmit_bytes_total": 3.0e9,
        "gpu_pcie_receive_bytes_total": 9.0e9,
        "gpu_pcie_replay_errors_total": 0.0,
        "gpu_nvlink_transmit_bytes_total": 4.0e11,
        "gpu_nvlink_receive_bytes_total": 4.1e11,
    }


def device_labelled(xids: dict[str, float] | None = None) -> dict[str, dict[str, float]]:
    return {
        "gpu_clock_hertz": {"graphics": 1.98e9, "sm": 1.98e9, "memory": 2.619e9, "video": 1.545e9},
        "gpu_clock_event_active": {"gpu_idle": 0.0, "sw_power_cap": 1.0, "hw_slowdown": 0.0, "sw_thermal": 0.0},
        "gpu_ecc_errors_total": {"correctable": 2.0, "uncorrectable": 0.0},
        "gpu_remapped_rows": {"correctable": 1.0, "uncorrectable": 0.0, "pending": 0.0, "failure": 0.0},
        "gpu_xid_errors_total": dict(xids or {}),
    }


def h100_sample() -> GpuSample:
    return GpuSample(
        identity=H100,
        up=True,
        timestamp=NOW,
        last_success=NOW,
        # 3 processes on the GPU, 2 of them kept as series (the --process.max-series cap).
        values={**device_values(power=412.5, memory_used=71 * GIB), **GPM_VALUES, "gpu_processes": 3.0},
        labelled=device_labelled(xids={"79": 1.0, "13": 2.0}),
        processes=(
            ProcessSample(pid=4242, process_name="python3", container="vllm", pod="vllm-0", namespace="serving",
                          memory_used_bytes=70 * GIB, sm_active_ratio=0.9),
            # Just started: NVML has no utilization sample for it yet.
            ProcessSample(pid=4343, process_name="pt_main_thread", memory_used_bytes=512 * 1024.0**2),
        ),
        mig=(
            MigReading(gpu_instance_id=1, profile="3g.40gb", values={
                "gpu_mig_memory_used_bytes": 30 * GIB,
                "gpu_mig_memory_total_bytes": 40 * GIB,
                "gpu_mig_sm_active_ratio": 0.6,
                "gpu_mig_tensor_active_ratio": 0.2,
                "gpu_mig_dram_active_ratio": 0.5,
            }),
            # A slice without GPM figures: only its memory is exported.
            MigReading(gpu_instance_id=2, profile="3g.40gb", values={
                "gpu_mig_memory_used_bytes": 1 * GIB,
                "gpu_mig_memory_total_bytes": 40 * GIB,
            }),
        ),
    )


def a100_sample() -> GpuSample:
    return GpuSample(
        identity=A100,
        up=True,
        timestamp=NOW,
        last_success=NOW,
        values={**device_values(power=250.0, memory_used=20 * GIB), "gpu_processes": 0.0},
        labelled=device_labelled(),
        processes=(),
    )


def lost_sample() -> GpuSample:
    """Fell off the bus 30 s ago; the sampler still holds its last (now stale) values."""
    return GpuSample(
        identity=LOST,
        up=False,
        timestamp=NOW,
        last_success=NOW - 30,
        values={**device_values(power=700.0, memory_used=79 * GIB), **GPM_VALUES},
        labelled=device_labelled(xids={"79": 1.0}),
        processes=(ProcessSample(pid=999, process_name="stale", memory_used_bytes=GIB, sm_active_ratio=0.5),),
        mig=(MigReading(gpu_instance_id=9, profile="7g.80gb", values={"gpu_mig_memory_used_bytes": GIB}),),
    )


def never_seen_sample() -> GpuSample:
    return GpuSample(identity=NEVER_SEEN, up=False, timestamp=NOW)


def phase_series() -> tuple[PhaseSeries, ...]:
    h100 = [
        PhaseSeries(gpu=0, uuid=H100.uuid, service="vllm", phase="prefill", seconds=12.0, tokens=24576,
                    energy_joules=8400.0, sm_active_seconds=11.0, tensor_active_seconds=6.0,
                    dram_active_seconds=4.0),
        PhaseSeries(gpu=0, uuid=H100.uuid, service="vllm", phase="decode", seconds=40.0, tokens=5120,
                    energy_joules=15200.0, sm_active_seconds=30.0, tensor_active_seconds=4.0,
                    dram_active_seconds=30.0),
        PhaseSeries(gpu=0, uuid=H100.uuid, service="vllm", phase="mixed", seconds=5.0, tokens=0,
                    energy_joules=2900.0, sm_active_seconds=4.5, tensor_active_seconds=1.5,
                    dram_active_seconds=3.0),
        PhaseSeries(gpu=0, uuid=H100.uuid, service="vllm", phase="idle", seconds=3.0, tokens=0,
                    energy_joules=225.0, sm_active_seconds=0.0, tensor_active_seconds=0.0,
                    dram_active_seconds=0.0),
    ]
    # No GPM on the A100: the activity integrals are unknown, not zero.
    a100 = [
        PhaseSeries(gpu=1, uuid=A100.uuid, service="tgi", phase="decode", seconds=20.0, tokens=900,
                    energy_joules=5000.0),
        PhaseSeries(gpu=1, uuid=A100.uuid, service="tgi", phase="idle", seconds=40.0, energy_joules=2520.0),
    ]
    return tuple(h100 + a100)


def rich_view() -> View:
    return View(
        snapshot=Snapshot(
            timestamp=NOW,
            gpus=(h100_sample(), a100_sample(), lost_sample(), never_seen_sample()),
            complete=True,
            tick_duration_seconds=0.004,
        ),
        backend="sim",
        phases=phase_series(),
        last_span={(0, H100.uuid, "vllm"): NOW - 1.5, (1, A100.uuid, "tgi"): NOW - 8.0},
        spans=SpanStats(
            received={"vllm": 1200, "tgi": 300},
            rejected={"malformed": 2},
            unmatched={"no_mapping": 7},
            clipped=3,
        ),
        sampler=SamplerStats(ticks=3600, overruns=1, last_tick_duration_seconds=0.004),
        listeners={"web": ListenerStats(3, {"evicted": 2}), "otlp_http": ListenerStats(1, {"header_too_large": 1})},
        process=ProcessStats(virtual_memory_bytes=1.5 * GIB, resident_memory_bytes=96 * 1024.0**2,
                             start_time_seconds=NOW - 3600, cpu_seconds=42.5, open_fds=23, max_fds=1_048_576),
    )


def empty_view() -> View:
    """Before the first tick: no snapshot yet."""
    return View(snapshot=None, backend="nvml")
