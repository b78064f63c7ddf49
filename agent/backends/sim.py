"""Simulated GPUs: counters that follow a settable activity state, physically consistent.

Used by `--backend sim`, the tests and `gpuphase demo`. Each GPU has an activity *source*: a
function giving the average activity over a wall-clock interval. By default it is a constant
the caller sets (`set_activity`); the demo installs one driven by its ground-truth phase timeline,
so the simulated GPM counters are exactly what a real GPU would average over each tick.

Physical relations kept on purpose (tests rely on them): energy is the integral of power, used +
free = total, ratios stay in [0, 1], counters never decrease, and an `a100-sxm-80gb` has no GPM
metrics at all, exactly as NVML answers NotSupported on Ampere.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable

from gpuphase.agent.backends import GpuLost
from gpuphase.model.snapshot import GpuIdentity, GpuReading, ProcessReading

MIB = 1024 * 1024


@dataclass(frozen=True)
class GpuProfile:
    model: str
    memory_total_bytes: int
    power_idle_watts: float
    power_max_watts: float  # what a fully compute-bound phase draws (prefill, near TDP)
    power_limit_watts: float
    sm_clock_max_hz: float
    sm_clock_idle_hz: float
    memory_clock_hz: float
    gpm: bool
    nvlink_bytes_per_second: float  # at full tensor activity (tensor-parallel all-reduce traffic)


PROFILES: dict[str, GpuProfile] = {
    # Power: the reference values in docs/phases.md (idle ~75 W, prefill ~700 W, decode ~380 W).
    "h100-sxm-80gb": GpuProfile(
        model="NVIDIA H100 80GB HBM3",
        memory_total_bytes=81559 * MIB,
        power_idle_watts=75.0,
        power_max_watts=700.0,
        power_limit_watts=700.0,
        sm_clock_max_hz=1980e6,
        sm_clock_idle_hz=345e6,
        memory_clock_hz=2619e6,
        gpm=True,
        nvlink_bytes_per_second=120e9,
    ),
    # A100-80GB: 63 / 400 / 250 W; Ampere has no GPM (nvmlGpmQueryDeviceSupport says no).
    "a100-sxm-80gb": GpuProfile(
        model="NVIDIA A100-SXM4-80GB",
        memory_total_bytes=81920 * MIB,
        power_idle_watts=63.0,
        power_max_watts=400.0,
        power_limit_watts=400.0,
        sm_clock_max_hz=1410e6,
        sm_clock_idle_hz=210e6,
        memory_clock_hz=1593e6,
        gpm=False,
        nvlink_bytes_per_second=80e9,
    ),
}


@dataclass(frozen=True)
class Activity:
    """Average activity of a GPU over an interval; every ratio in [0, 1]."""

    busy: float = 0.0  # share of time any kernel ran (NVML utilization.gpu)
    sm_active: float = 0.0
    sm_occupancy: float = 0.0
    tensor_active: float = 0.0
    dram_active: float = 0.0
    fp16_active: float = 0.0
    fp32_active: float = 0.0
    fp64_active: float = 0.0

    def scaled_sum(self, other: "Activity", weight: float) -> "Activity":
        """self + weight * other, field by field (for time-weighted averages)."""
        return Activity(**{name: getattr(self, name) + weight * getattr(other, name) for name in _ACTIVITY_FIELDS})

    def scaled(self, factor: float) -> "Activity":
        return Activity(**{name: getattr(self, name) * factor for name in _ACTIVITY_FIELDS})


_ACTIVITY_FIELDS = tuple(Activity.__dataclass_fields__)
IDLE = Activity()

# Typical activity of a busy GPU by serving phase; inside the reference bands of docs/phases.md.
PHASE_ACTIVITY: dict[str, Activity] = {
    "idle": IDLE,
    "prefill": Activity(busy=1.0, sm_active=0.95, sm_occupancy=0.45, tensor_active=0.62, dram_active=0.35,
                        fp16_active=0.55, fp32_active=0.10),
    "decode": Activity(busy=1.0, sm_active=0.80, sm_occupancy=0.22, tensor_active=0.12, dram_active=0.75,
                       fp16_active=0.10, fp32_active=0.05),
    "mixed": Activity(busy=1.0, sm_active=0.92, sm_occupancy=0.38, tensor_active=0.42, dram_active=0.58,
                      fp16_active=0.38, fp32_active=0.08),
}

ActivitySource = Callable[[float, float], Activity]


def power_for(profile: GpuProfile, activity: Activity) -> float:
    """Board power from activity: idle floor plus a load share fitted to the reference powers
    (prefill ~700 W and decode ~380 W on an H100 with PHASE_ACTIVITY's figures)."""
    load = 0.1 * activity.sm_active + 1.357 * activity.tensor_active + 0.259 * activity.dram_active
    return profile.power_idle_watts + (profile.power_max_watts - profile.power_idle_watts) * min(1.0, load)


class SimGpu:
    """One simulated GPU. Not thread-safe by itself; SimBackend serialises access per GPU."""

    def __init__(self, index: int, profile: GpuProfile, rng: random.Random, clock: Callable[[], float]):
        self.profile = profile
        self.identity = GpuIdentity(
            index=index,
            uuid=f"GPU-{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}-{rng.getrandbits(16):04x}-"
            f"{rng.getrandbits(16):04x}-{rng.getrandbits(48):012x}",
            name=profile.model,
            pci_bus_id=f"00000000:{0x18 + 0x10 * index:02X}:00.0",
            driver_version="550.54.15",
            cuda_version="12.4",
            serial=f"SIM{index:010d}",
            gpm_supported=profile.gpm,
        )
        self._rng = rng
        self._clock = clock
        self._source: ActivitySource = lambda t0, t1: IDLE
        self._processes: tuple[ProcessReading, ...] = ()
        self._last_time = clock()
        self._energy_joules = rng.uniform(1e6, 5e6)  # the counter starts at driver load, not at 0
        self._pcie_tx = self._pcie_rx = self._nvlink_tx = self._nvlink_rx = 0.0
        self._temperature = 32.0
        self._xids: dict[str, float] = {}
        self.lost = False

    # -- control ---------------------------------------------------------------------------------
    def set_source(self, source: ActivitySource) -> None:
        self._source = source

    def set_processes(self, processes: tuple[ProcessReading, ...]) -> None:
        self._processes = processes

    def inject_xid(self, xid: int) -> None:
        key = str(xid)
        self._xids[key] = self._xids.get(key, 0) + 1

    # -- reading ---------------------------------------------------------------------------------
    def read(self) -> GpuReading:
        if self.lost:
            raise GpuLost(f"simulated GPU {self.identity.index} is lost")
        now = self._clock()
        dt = max(now - self._last_time, 1e-6)
        activity = self._source(self._last_time, now)
        self._last_time = now
        noisy = self._noisy(activity)
        power = power_for(self.profile, noisy)
        self._energy_joules += power * dt
        self._pcie_tx += dt * (5e8 + 2e9 * noisy.busy)
        self._pcie_rx += dt * (5e8 + 3e9 * noisy.busy)
        self._nvlink_tx += dt * self.profile.nvlink_bytes_per_second * noisy.tensor_active
        self._nvlink_rx += dt * self.profile.nvlink_bytes_per_second * noisy.tensor_active
        # First-order thermal lag towards a power-proportional steady state.
        target = 30.0 + 0.07 * (power - self.profile.power_idle_watts)
        self._temperature += (target - self._temperature) * min(1.0, dt / 20.0)

        used = 512 * MIB + sum(p.memory_used_bytes or 0 for p in self._processes)
        used = min(used, self.profile.memory_total_bytes)
        values = {
            "gpu_utilization_ratio": noisy.busy,
            "gpu_memory_controller_busy_ratio": _clamp(noisy.dram_active * 0.92),
            "gpu_temperature_celsius": round(self._temperature),
            "gpu_memory_temperature_celsius": round(self._temperature + 4),
            "gpu_memory_total_bytes": float(self.profile.memory_total_bytes),
            "gpu_memory_used_bytes": float(used),
            "gpu_memory_free_bytes": float(self.profile.memory_total_bytes - used),
            "gpu_power_watts": power,
            "gpu_power_limit_watts": self.profile.power_limit_watts,
            "gpu_energy_joules_total": self._energy_joules,
            "gpu_pcie_transmit_bytes_total": self._pcie_tx,
            "gpu_pcie_receive_bytes_total": self._pcie_rx,
            "gpu_pcie_replay_errors_total": 0.0,
            "gpu_nvlink_transmit_bytes_total": self._nvlink_tx,
            "gpu_nvlink_receive_bytes_total": self._nvlink_rx,
            # Set only when the process query worked (as the NVML backend does), so that a GPU whose
            # processes cannot be listed shows no count rather than a misleading "0 = free".
            "gpu_processes": float(len(self._processes)),
        }
        if self.profile.gpm:
            values.update(
                gpu_sm_active_ratio=noisy.sm_active,
                gpu_sm_occupancy_ratio=noisy.sm_occupancy,
                gpu_tensor_active_ratio=noisy.tensor_active,
                gpu_dram_active_ratio=noisy.dram_active,
                gpu_fp16_active_ratio=noisy.fp16_active,
                gpu_fp32_active_ratio=noisy.fp32_active,
                gpu_fp64_active_ratio=noisy.fp64_active,
            )
        busy = noisy.busy > 0.05
        sm_clock = self.profile.sm_clock_max_hz if busy else self.profile.sm_clock_idle_hz
        labelled = {
            "gpu_clock_hertz": {
                "graphics": sm_clock,
                "sm": sm_clock,
                "memory": self.profile.memory_clock_hz,
                "video": 1755e6 if busy else 765e6,
            },
            "gpu_clock_event_active": {
                "gpu_idle": 0.0 if busy else 1.0,
                "sw_power_cap": 1.0 if power >= 0.98 * self.profile.power_limit_watts else 0.0,
                "hw_slowdown": 0.0,
                "sw_thermal_slowdown": 0.0,
                "hw_thermal_slowdown": 0.0,
                "hw_power_brake_slowdown": 0.0,
            },
            "gpu_ecc_errors_total": {"correctable": 0.0, "uncorrectable": 0.0},
            "gpu_remapped_rows": {"correctable": 0.0, "uncorrectable": 0.0, "pending": 0.0, "failure": 0.0},
            "gpu_xid_errors_total": dict(self._xids),
        }
        total_memory = sum(p.memory_used_bytes or 0 for p in self._processes) or 1.0
        processes = tuple(
            replace(p, sm_active_ratio=_clamp(noisy.sm_active * (p.memory_used_bytes or 0) / total_memory))
            for p in self._processes
        )
        return GpuReading(values=values, labelled=labelled, processes=processes)

    def _noisy(self, activity: Activity) -> Activity:
        """Measurement noise of ~1 point on busy counters; an idle GPU reads exactly idle."""
        if activity.busy <= 0.0:
            return activity
        return Activity(**{name: _clamp(getattr(activity, name) + self._rng.gauss(0.0, 0.006))
                           if getattr(activity, name) > 0 else 0.0 for name in _ACTIVITY_FIELDS})


def _clamp(value: float) -> float:
    return 0.0 if value < 0.0 else 1.0 if value > 1.0 else value


class SimBackend:
    """Backend protocol over SimGpus. Per-GPU locks: the sampler reads GPUs from several threads."""

    name = "sim"

    def __init__(self, gpus: int, profile: str, seed: int = 0, clock: Callable[[], float] = time.time):
        if profile not in PROFILES:
            from gpuphase.agent.backends import BackendUnavailable

            raise BackendUnavailable(f"unknown simulated GPU profile {profile!r}; known: {', '.join(PROFILES)}")
        rng = random.Random(seed)
        self.gpus = [SimGpu(i, PROFILES[profile], random.Random(rng.getrandbits(64)), clock) for i in range(gpus)]
        self._locks = [threading.Lock() for _ in self.gpus]

    @classmethod
    def from_config(cls, config) -> "SimBackend":
        return cls(config.sim_gpus, config.sim_profile, config.sim_seed)

    def discover(self) -> list[GpuIdentity]:
        return [gpu.identity for gpu in self.gpus]

    def read(self, index: int) -> GpuReading:
        with self._locks[index]:
            return self.gpus[index].read()

    def recover(self, index: int) -> GpuIdentity:
        gpu = self.gpus[index]
        if gpu.lost:
            raise GpuLost(f"simulated GPU {index} is still lost")
        return gpu.identity

    def close(self) -> None:
        pass

    # -- control, for tests and the demo ---------------------------------------------------------
    def set_activity(self, index: int, activity: Activity) -> None:
        self.gpus[index].set_source(lambda t0, t1: activity)

    def set_source(self, index: int, source: ActivitySource) -> None:
        self.gpus[index].set_source(source)

    def set_processes(self, index: int, processes: tuple[ProcessReading, ...]) -> None:
        self.gpus[index].set_processes(processes)

    def set_lost(self, index: int, lost: bool) -> None:
        self.gpus[index].lost = lost

    def inject_xid(self, index: int, xid: int) -> None:
        with self._locks[index]:
            self.gpus[index].inject_xid(xid)
