"""One GPU: its handle, the capabilities it turned out not to have, and one tick's reading."""

from __future__ import annotations

import logging
from typing import Any, Callable

import pynvml

from gpuphase.agent.backends import GpuLost
from gpuphase.agent.backends.nvml.common import CAPABILITY_ERRORS, LOST_ERRORS, NVML_SUCCESS, clamp_ratio
from gpuphase.agent.backends.nvml.fields import DECODE, FIELDS, FieldRequest, TemperatureRequest
from gpuphase.agent.backends.nvml.gpm import Gpm
from gpuphase.agent.backends.nvml.mig import MIG_REFRESH_INTERVAL, MigInstances
from gpuphase.model.snapshot import GpuIdentity, GpuReading, ProcessReading

log = logging.getLogger(__name__)

CLOCKS = (
    ("graphics", pynvml.NVML_CLOCK_GRAPHICS, "clock:graphics"),
    ("sm", pynvml.NVML_CLOCK_SM, "clock:sm"),
    ("memory", pynvml.NVML_CLOCK_MEM, "clock:memory"),
    ("video", pynvml.NVML_CLOCK_VIDEO, "clock:video"),
)

CLOCK_EVENT_REASONS = (
    ("gpu_idle", pynvml.nvmlClocksEventReasonGpuIdle),
    ("applications_clocks_setting", pynvml.nvmlClocksEventReasonApplicationsClocksSetting),
    ("sw_power_cap", pynvml.nvmlClocksEventReasonSwPowerCap),
    ("hw_slowdown", pynvml.nvmlClocksEventReasonHwSlowdown),
    ("sync_boost", pynvml.nvmlClocksEventReasonSyncBoost),
    ("sw_thermal_slowdown", pynvml.nvmlClocksEventReasonSwThermalSlowdown),
    ("hw_thermal_slowdown", pynvml.nvmlClocksEventReasonHwThermalSlowdown),
    ("hw_power_brake_slowdown", pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown),
    ("display_clock_setting", pynvml.nvmlClocksEventReasonDisplayClockSetting),
)


class GpuDevice:
    """Handle, probed capabilities and per-tick state of one GPU."""

    def __init__(self, index: int, handle: Any, identity: GpuIdentity, gpm: Gpm | None,
                 unsupported: set[str] | None = None, mig_refresh_interval: float = MIG_REFRESH_INTERVAL):
        self.index = index
        self.handle = handle
        self.identity = identity
        self.gpm = gpm
        self.unsupported: set[str] = unsupported if unsupported is not None else set()
        self.mig = MigInstances(self, mig_refresh_interval)
        self.fields = FieldRequest(tuple(f for f in FIELDS if f"field:{f.field_id}" not in self.unsupported))
        self._temperature = TemperatureRequest()
        self._process_sm: dict[int, float] = {}
        self._process_seen_us = 0
        self._reasons: tuple[int | None, dict[str, float]] = (None, {})  # last clock-event mask, as a dict

    # --- error handling -------------------------------------------------------------------------

    def fail(self, key: str, err: pynvml.NVMLError) -> None:
        """Sort an NVML error: GPU gone -> GpuLost; capability -> remember and skip; else skip this tick."""
        if err.value in LOST_ERRORS:
            raise GpuLost(f"GPU {self.index} ({self.identity.uuid}): {key}: {err}") from err
        if err.value in CAPABILITY_ERRORS:
            self.unsupported.add(key)
            log.info("GPU %d: %s unavailable (%s); leaving it out from now on", self.index, key, err)
        else:
            log.debug("GPU %d: %s failed this tick: %s", self.index, key, err)

    def call(self, key: str, function: Callable[..., Any], *args: Any) -> Any:
        """function(*args), or None when it is unsupported here or failed this tick."""
        if key in self.unsupported:
            return None
        try:
            return function(*args)
        except pynvml.NVMLError as err:
            self.fail(key, err)
            return None

    # --- one tick -------------------------------------------------------------------------------

    def read(self, xid_counts: dict[str, float]) -> GpuReading:
        """One tick. values["gpu_processes"] is set only when the process query worked, so that
        "cannot tell" (NoPermission, e.g. in a container without the right capability) is absent
        rather than a misleading 0 = free GPU."""
        values: dict[str, float] = {}
        labelled: dict[str, dict[str, float]] = {}
        handle = self.handle

        utilization = self.call("utilization", pynvml.nvmlDeviceGetUtilizationRates, handle)
        if utilization is not None:
            values["gpu_utilization_ratio"] = clamp_ratio(utilization.gpu)
            values["gpu_memory_controller_busy_ratio"] = clamp_ratio(utilization.memory)

        memory = self.call("memory", pynvml.nvmlDeviceGetMemoryInfo, handle)
        if memory is not None:
            # used is derived so that used + free == total holds exactly, whatever the driver's
            # reserved-memory accounting (v1 counts it in used, v2 reports it apart).
            total, free = memory.total, memory.free  # each member read costs a pynvml hook call
            values["gpu_memory_total_bytes"] = float(total)
            values["gpu_memory_free_bytes"] = float(free)
            values["gpu_memory_used_bytes"] = float(total - free)

        temperature = self.call("temperature_v", self._temperature.fetch, handle)
        if temperature is None and "temperature_v" in self.unsupported:  # drivers before nvmlDeviceGetTemperatureV
            temperature = self.call("temperature", pynvml.nvmlDeviceGetTemperature, handle, pynvml.NVML_TEMPERATURE_GPU)
        if temperature is not None:
            values["gpu_temperature_celsius"] = float(temperature)

        self._read_fields(values, labelled)
        self._read_clocks(labelled)

        if self.gpm is not None:
            try:
                values.update(self.gpm.read())
            except pynvml.NVMLError as err:
                self.fail("gpm", err)
                if "gpm" in self.unsupported:
                    self.gpm.free()
                    self.gpm = None

        if xid_counts:
            labelled["gpu_xid_errors_total"] = xid_counts

        processes = self._read_processes()
        if processes is not None:
            values["gpu_processes"] = float(len(processes))
        return GpuReading(values, labelled, processes or (), self.mig.read())

    def _read_fields(self, values: dict[str, float], labelled: dict[str, dict[str, float]]) -> None:
        request = self.fields
        if not request.fields:
            return
        answers = self.call("field_values", request.fetch, self.handle)
        if answers is None:
            return
        dropped = []
        for (field, metric, label, scale), value_type, status, raw in zip(
                request.plan, answers[0::3], answers[1::3], answers[2::3]):
            if status != NVML_SUCCESS:
                if status in LOST_ERRORS:
                    raise GpuLost(f"GPU {self.index} ({self.identity.uuid}): field {field.field_id}: "
                                  f"{pynvml.NVMLError(status)}")
                if status in CAPABILITY_ERRORS:
                    dropped.append(field)
                continue
            decode = DECODE.get(value_type)
            if decode is None:
                continue
            value = decode(raw) * scale
            if label is None:
                values[metric] = value
            else:
                group = labelled.get(metric)
                if group is None:
                    group = labelled[metric] = {}
                group[label] = value
        if dropped:
            for field in dropped:
                self.unsupported.add(f"field:{field.field_id}")
            log.info("GPU %d: NVML fields %s unsupported; leaving them out", self.index, [f.field_id for f in dropped])
            self.fields = FieldRequest(tuple(f for f in request.fields if f not in dropped))

    def _read_clocks(self, labelled: dict[str, dict[str, float]]) -> None:
        clocks: dict[str, float] = {}
        for name, clock_type, key in CLOCKS:
            mhz = self.call(key, pynvml.nvmlDeviceGetClockInfo, self.handle, clock_type)
            if mhz is not None:
                clocks[name] = mhz * 1e6
        if clocks:
            labelled["gpu_clock_hertz"] = clocks
        reasons = self.call("clock_event_reasons", pynvml.nvmlDeviceGetCurrentClocksEventReasons, self.handle)
        if reasons is not None:
            if reasons != self._reasons[0]:  # the mask seldom changes: its dict is built once per change
                self._reasons = (reasons, {name: 1.0 if reasons & bit else 0.0 for name, bit in CLOCK_EVENT_REASONS})
            labelled["gpu_clock_event_active"] = self._reasons[1]  # shared by readings, never changed

    def _read_processes(self) -> tuple[ProcessReading, ...] | None:
        """Compute processes with their memory and SM share; None when this GPU cannot tell."""
        infos = self._running_processes()
        if infos is None:
            return None
        self._update_process_utilization({info.pid for info in infos})
        return tuple(
            ProcessReading(info.pid, None if info.usedGpuMemory is None else float(info.usedGpuMemory),
                           self._process_sm.get(info.pid))
            for info in infos
        )

    def _running_processes(self) -> list[Any] | None:
        if "processes" in self.unsupported:
            return None
        try:
            return pynvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
        except pynvml.NVMLLibraryMismatchError:
            # A driver older than the v3 call: the v2 call has the same layout in pynvml.
            return self.call("processes", pynvml.nvmlDeviceGetComputeRunningProcesses_v2, self.handle)
        except pynvml.NVMLError as err:
            self.fail("processes", err)
            return None

    def _update_process_utilization(self, pids: set[int]) -> None:
        """Fold in samples newer than the last one seen; NotFound means none, so keep the old values."""
        samples = self.call("process_utilization", pynvml.nvmlDeviceGetProcessUtilization,
                            self.handle, self._process_seen_us)
        newest: dict[int, int] = {}
        for sample in samples or ():
            pid, stamp = sample.pid, sample.timeStamp
            if stamp >= newest.get(pid, 0):
                newest[pid] = stamp
                self._process_sm[pid] = clamp_ratio(sample.smUtil)
            self._process_seen_us = max(self._process_seen_us, stamp)
        for pid in [pid for pid in self._process_sm if pid not in pids]:
            del self._process_sm[pid]

    def close(self) -> None:
        if self.gpm is not None:
            self.gpm.free()
            self.gpm = None
        self.mig.close()
