"""The NVML backend: real GPUs through nvidia-ml-py (pynvml). The only module that imports pynvml.

Design points (design.md §5), and why:
- Capabilities are probed, not assumed. A call or metric that answers NotSupported,
  FunctionNotFound, NoPermission or ArgumentVersionMismatch on a GPU is recorded once and never
  asked again, so an old driver costs one failed call, not one per second per GPU, and the series
  is left out (absent is not zero).
- GpuIsLost (and the GPU-level errors a reset produces) raise GpuLost for that GPU only;
  `recover()` re-acquires the handle by UUID and re-creates the GPM samples.
- The tick is hot: all scalar fields come from ONE nvmlDeviceGetFieldValues call, metric keys are
  constants, and the slow nvmlDeviceGetPcieThroughput (a 20 ms sampling window per call) and
  nvidia-smi are never used. The requests NVML fills in (field values, the ~19 KB GPM request,
  temperature) are allocated once per GPU; the first and last go to NVML straight through pynvml's
  function pointers, because pynvml's wrappers build them anew on every call (_FieldRequest), and
  answers are unpacked with one struct call per request (_members).
- XIDs arrive as events, not as a "last XID" value: one thread waits on an NVML event set and
  counts them per (GPU, XID) so no burst between two ticks is lost.

Calls for one GPU must not overlap (the sampler never queues a GPU whose reading is still
running); different GPUs may be read from different threads at the same time, which NVML allows
(the sampler does when a reading hangs).

MIG: a GPU with MIG mode on also reports one MigReading per GPU instance: its memory (from a MIG
device handle of that instance) and its GPM ratios (nvmlGpmMigSampleGet on the parent, two samples
per instance, like the whole-GPU path). The mode and the instance list are read on the first tick
after discovery or recovery, then re-read every `mig_refresh_interval` seconds and on the tick after
any failing MIG call (instances can be created and destroyed while the agent runs), never every tick.
A GPU whose driver answers NotSupported to the MIG mode query (pre-Ampere, consumer boards) has no
MIG. Per-process attribution to MIG instances is not done: processes are reported per GPU.
"""

from __future__ import annotations

import ctypes
import logging
import re
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import pynvml

from agent.backends import BackendUnavailable, GpuLost
from agent.snapshot import GpuIdentity, GpuReading, MigReading, ProcessReading

log = logging.getLogger(__name__)

SIM_HINT = "on hosts without NVIDIA GPUs run with --backend sim"

# "This GPU cannot do that": probe once, remember, leave the series out.
_CAPABILITY_ERRORS = frozenset({
    pynvml.NVML_ERROR_NOT_SUPPORTED,
    pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
    pynvml.NVML_ERROR_NO_PERMISSION,
    pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH,
})
# "The GPU itself is gone": fell off the bus, needs or just had a reset, or NVML lost its state.
_LOST_ERRORS = frozenset({
    pynvml.NVML_ERROR_GPU_IS_LOST,
    pynvml.NVML_ERROR_GPU_NOT_FOUND,
    pynvml.NVML_ERROR_RESET_REQUIRED,
    pynvml.NVML_ERROR_UNKNOWN,
    pynvml.NVML_ERROR_UNINITIALIZED,
})

ALL_LINKS = 0xFFFFFFFF  # field scopeId meaning "summed over every NVLink"
NVML_SUCCESS = pynvml.NVML_SUCCESS


@dataclass(frozen=True)
class _Field:
    """One scalar NVML field: where its value goes and the factor to base units."""

    field_id: int
    metric: str
    scale: float = 1.0
    label: str | None = None  # the value of the metric's one extra label, for labelled metrics
    scope: int = 0


_FIELDS = (
    _Field(pynvml.NVML_FI_DEV_POWER_INSTANT, "gpu_power_watts", 1e-3),  # mW
    _Field(pynvml.NVML_FI_DEV_POWER_CURRENT_LIMIT, "gpu_power_limit_watts", 1e-3),  # mW
    _Field(pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION, "gpu_energy_joules_total", 1e-3),  # mJ
    _Field(pynvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES, "gpu_pcie_transmit_bytes_total"),
    _Field(pynvml.NVML_FI_DEV_PCIE_COUNT_RX_BYTES, "gpu_pcie_receive_bytes_total"),
    _Field(pynvml.NVML_FI_DEV_PCIE_REPLAY_COUNTER, "gpu_pcie_replay_errors_total"),
    _Field(pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, "gpu_nvlink_transmit_bytes_total", 1024.0, scope=ALL_LINKS),
    _Field(pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, "gpu_nvlink_receive_bytes_total", 1024.0, scope=ALL_LINKS),
    _Field(pynvml.NVML_FI_DEV_MEMORY_TEMP, "gpu_memory_temperature_celsius"),
    _Field(pynvml.NVML_FI_DEV_ECC_SBE_VOL_TOTAL, "gpu_ecc_errors_total", label="correctable"),
    _Field(pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL, "gpu_ecc_errors_total", label="uncorrectable"),
    _Field(pynvml.NVML_FI_DEV_REMAPPED_COR, "gpu_remapped_rows", label="correctable"),
    _Field(pynvml.NVML_FI_DEV_REMAPPED_UNC, "gpu_remapped_rows", label="uncorrectable"),
    _Field(pynvml.NVML_FI_DEV_REMAPPED_PENDING, "gpu_remapped_rows", label="pending"),
    _Field(pynvml.NVML_FI_DEV_REMAPPED_FAILURE, "gpu_remapped_rows", label="failure"),
)

_DOUBLE_BITS, _DOUBLE = struct.Struct("<Q"), struct.Struct("<d")
_ULONG_MASK = (1 << 8 * ctypes.sizeof(ctypes.c_ulong)) - 1
# The value of each nvmlValueType_t, as a float, from the 8 bytes of a c_nvmlValue_t union read as
# one little-endian unsigned integer (NVML runs on little-endian hosts only: x86-64, Arm64, POWER
# LE). A member narrower than the union is its low bytes; the others are masked off.
_DECODE: dict[int, Callable[[int], float]] = {
    pynvml.NVML_VALUE_TYPE_DOUBLE: lambda raw: _DOUBLE.unpack(_DOUBLE_BITS.pack(raw))[0],
    pynvml.NVML_VALUE_TYPE_UNSIGNED_INT: lambda raw: float(raw & 0xFFFFFFFF),
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG: lambda raw: float(raw & _ULONG_MASK),
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: float,
    pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: lambda raw: float(raw - (raw >> 63 << 64)),
    pynvml.NVML_VALUE_TYPE_SIGNED_INT: lambda raw: float((raw & 0xFFFFFFFF) - (((raw >> 31) & 1) << 32)),
    pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT: lambda raw: float(raw & 0xFFFF),
}


def _members(struct_type: type, *members: tuple[str, str]) -> str:
    """A struct-module format of one `struct_type`: the named members (in layout order) as the given
    codes, the bytes between them skipped. One unpack of a whole array of answers, in C, costs
    about half of reading its members through ctypes, which builds an object per array element."""
    layout, at = "", 0
    for name, code in members:
        member = getattr(struct_type, name)
        layout += f"{member.offset - at}x{code}"
        at = member.offset + member.size
    return layout + f"{ctypes.sizeof(struct_type) - at}x"


_FIELD_ANSWER = _members(pynvml.c_nvmlFieldValue_t, ("valueType", "I"), ("nvmlReturn", "I"), ("value", "Q"))
_GPM_ANSWER = _members(pynvml.c_nvmlGpmMetric_t, ("nvmlReturn", "I"), ("value", "d"))


def _plain_struct(struct_type: type) -> type:
    """A ctypes.Structure with the layout of one of pynvml's structs, minus its base class's
    Python-level __getattribute__ and __setattr__ hooks (they convert bytes and friendly values;
    the members used through these are all numbers and pointers). A hook costs about a
    microsecond per member, which for the requests filled in every tick (GPM sample pointers) and
    the answers read was a third of the backend's CPU time."""
    return type(f"Plain{struct_type.__name__}", (ctypes.Structure,), {"_fields_": struct_type._fields_})


_PlainFieldValue = _plain_struct(pynvml.c_nvmlFieldValue_t)
_PlainGpmMetric = _plain_struct(pynvml.c_nvmlGpmMetric_t)
_PlainGpmMetricsGet = _plain_struct(pynvml.c_nvmlGpmMetricsGet_t)  # the sample pointers are set every tick
_PlainTemperature = _plain_struct(pynvml.c_nvmlTemperature_v1_t)


def _call_nvml(function: str, *args: Any) -> None:
    """NVML's `function` called straight through pynvml's cached function pointer, raising NVMLError
    as pynvml's wrappers do: for the requests this module allocates once per GPU (see _FieldRequest)."""
    status = pynvml._nvmlGetFunctionPointer(function)(*args)
    if status != NVML_SUCCESS:
        raise pynvml.NVMLError(status)


_GPM_METRICS = (
    (pynvml.NVML_GPM_METRIC_SM_UTIL, "gpu_sm_active_ratio"),
    (pynvml.NVML_GPM_METRIC_SM_OCCUPANCY, "gpu_sm_occupancy_ratio"),
    (pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL, "gpu_tensor_active_ratio"),
    (pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL, "gpu_dram_active_ratio"),
    (pynvml.NVML_GPM_METRIC_FP16_UTIL, "gpu_fp16_active_ratio"),
    (pynvml.NVML_GPM_METRIC_FP32_UTIL, "gpu_fp32_active_ratio"),
    (pynvml.NVML_GPM_METRIC_FP64_UTIL, "gpu_fp64_active_ratio"),
)

# What nvmlGpmMigSampleGet supports for one GPU instance, as named in agent/metrics.yaml.
_MIG_GPM_METRICS = (
    (pynvml.NVML_GPM_METRIC_SM_UTIL, "gpu_mig_sm_active_ratio"),
    (pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL, "gpu_mig_tensor_active_ratio"),
    (pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL, "gpu_mig_dram_active_ratio"),
)

_CLOCKS = (
    ("graphics", pynvml.NVML_CLOCK_GRAPHICS, "clock:graphics"),
    ("sm", pynvml.NVML_CLOCK_SM, "clock:sm"),
    ("memory", pynvml.NVML_CLOCK_MEM, "clock:memory"),
    ("video", pynvml.NVML_CLOCK_VIDEO, "clock:video"),
)

_CLOCK_EVENT_REASONS = (
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

GPM_MIN_INTERVAL = 0.1  # NVML: two GPM samples must be at least 100 ms apart
# An XID storm (a failing GPU can raise hundreds a second) must not become a log storm: the first
# XID of each kind per GPU is logged at once, later ones as one summary line at most this often.
# gpu_xid_errors_total counts every one regardless.
XID_LOG_INTERVAL = 60.0
# MIG instances are re-listed this often (seconds): reconfiguring MIG is rare, listing costs a few
# NVML calls per possible instance, and a failing MIG call triggers a re-listing at once anyway.
MIG_REFRESH_INTERVAL = 30.0


def _clamp_ratio(percent: float) -> float:
    return min(1.0, max(0.0, percent / 100.0))


def _handle_address(handle: Any) -> int | None:
    return ctypes.cast(handle, ctypes.c_void_p).value


def _text(value: str | bytes) -> str:
    """pynvml returns str from most getters but bytes from some struct members, depending on version."""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _cuda_version(encoded: int) -> str:
    """NVML encodes CUDA 12.4 as 12040."""
    return f"{encoded // 1000}.{encoded % 1000 // 10}"


class _FieldRequest:
    """The nvmlDeviceGetFieldValues request of one GPU (the fields it still supports), allocated once.

    pynvml's nvmlDeviceGetFieldValues builds a new array on every call and sets each entry's ids
    through its structs' __setattr__ hook, which with a quick driver costs about three times the
    call itself (measured on tests/fakenvml, 15 fields: some 35 µs per GPU per tick against 12).
    NVML writes only an entry's outputs (status, type, value, timestamp, latency), so the ids set
    here once stay; the answers are unpacked in one go (see _members). The temperature request
    (_TemperatureRequest) is kept the same way.
    """

    def __init__(self, fields: tuple[_Field, ...]):
        self.fields = fields
        self.plan = tuple((f, f.metric, f.label, f.scale) for f in fields)
        self._entries = (_PlainFieldValue * len(fields))()
        for entry, field in zip(self._entries, fields):
            entry.fieldId, entry.scopeId = field.field_id, field.scope
        self._count = ctypes.c_int32(len(fields))
        self._unpack = struct.Struct("<" + _FIELD_ANSWER * len(fields)).unpack_from

    def fetch(self, handle: Any) -> tuple[int, ...]:
        """(value type, status, the value's raw 8 bytes) of each field, flat; raises NVMLError."""
        _call_nvml("nvmlDeviceGetFieldValues", handle, self._count, self._entries)
        return self._unpack(self._entries)


class _TemperatureRequest:
    """The nvmlDeviceGetTemperatureV request of one GPU, allocated once (see _FieldRequest): pynvml's
    wrapper builds it and sets its version and sensor through the __setattr__ hook on every call,
    which made the call half as dear again as the other single-struct getters."""

    def __init__(self) -> None:
        self._request = _PlainTemperature(version=pynvml.nvmlTemperature_v1, sensorType=pynvml.NVML_TEMPERATURE_GPU)
        self._pointer = ctypes.pointer(self._request)

    def fetch(self, handle: Any) -> int:
        """The GPU's temperature in °C; raises NVMLError."""
        _call_nvml("nvmlDeviceGetTemperatureV", handle, self._pointer)
        return self._request.temperature


class _GpmRequest:
    """The ~19 KB nvmlGpmMetricsGet request and the metrics it asks for, allocated once.

    One request can serve several sample pairs that are never evaluated at the same time: all MIG
    instances of one GPU share one (calls for one GPU never overlap). A metric the GPU answers
    NotSupported for is dropped from the request for good.
    """

    def __init__(self, metrics: tuple[tuple[int, str], ...]):
        self._request = _PlainGpmMetricsGet(version=pynvml.NVML_GPM_METRICS_GET_VERSION)
        # The request's metrics, written through plain structs; a view, not a copy.
        self._slots = (_PlainGpmMetric * pynvml.NVML_GPM_METRIC_MAX).from_buffer(
            self._request, _PlainGpmMetricsGet.metrics.offset)
        self._metrics: tuple[tuple[int, str], ...] = ()
        self._set_metrics(metrics)

    def _set_metrics(self, metrics: tuple[tuple[int, str], ...]) -> None:
        self._metrics = metrics
        self._request.numMetrics = len(metrics)
        for slot, (metric_id, _name) in enumerate(metrics):
            self._slots[slot].metricId = metric_id
        # (status, value) of each metric asked for, flat (see _members)
        self._unpack = struct.Struct("<" + _GPM_ANSWER * len(metrics)).unpack_from

    def evaluate(self, previous: Any, current: Any) -> dict[str, float]:
        """The ratios over the interval between two samples."""
        self._request.sample1 = previous
        self._request.sample2 = current
        pynvml.nvmlGpmMetricsGet(self._request)
        values: dict[str, float] = {}
        dropped = []
        answers = self._unpack(self._request, _PlainGpmMetricsGet.metrics.offset)
        for (metric_id, name), status, percent in zip(self._metrics, answers[0::2], answers[1::2]):
            if status == NVML_SUCCESS:
                ratio = percent / 100.0  # _clamp_ratio, inlined: 7 metrics per GPU per tick
                values[name] = 0.0 if ratio < 0.0 else 1.0 if ratio > 1.0 else ratio
            elif status in _CAPABILITY_ERRORS:
                dropped.append(metric_id)
        if dropped:
            log.info("GPM metrics %s are not supported; leaving them out", dropped)
            self._set_metrics(tuple(m for m in self._metrics if m[0] not in dropped))
        return values


class _Gpm:
    """GPM sampling for one GPU, or for one MIG GPU instance of it (gpu_instance_id): two samples,
    allocated once and swapped every tick, and a metrics request (shared where given)."""

    def __init__(self, handle: Any, request: _GpmRequest | None = None, gpu_instance_id: int | None = None):
        self._handle = handle
        self._gpu_instance_id = gpu_instance_id
        self._samples = [pynvml.nvmlGpmSampleAlloc()]
        try:
            self._samples.append(pynvml.nvmlGpmSampleAlloc())
        except pynvml.NVMLError:
            self.free()
            raise
        self._request = request if request is not None else _GpmRequest(_GPM_METRICS)
        self._previous_at: float | None = None  # monotonic time of the previous sample
        self._last: dict[str, float] = {}

    def _take(self, sample: Any) -> None:
        if self._gpu_instance_id is None:
            pynvml.nvmlGpmSampleGet(self._handle, sample)
        else:
            pynvml.nvmlGpmMigSampleGet(self._handle, self._gpu_instance_id, sample)

    def read(self) -> dict[str, float]:
        """GPM ratios over the interval since the previous call; {} on the first call.

        A call less than 100 ms after the previous one returns the previous figures rather than
        an NVML error or nothing (the sampler may tick faster under test or after an overrun).
        """
        now = time.monotonic()
        if self._previous_at is not None and now - self._previous_at < GPM_MIN_INTERVAL:
            return self._last
        previous, current = self._samples
        self._take(current)
        first = self._previous_at is None
        self._samples.reverse()
        self._previous_at = now
        if first:
            return {}
        values = self._request.evaluate(previous, current)
        self._last = values
        return values

    def free(self) -> None:
        """Release the samples; errors are ignored because this runs on lost GPUs and at shutdown."""
        for sample in self._samples:
            try:
                pynvml.nvmlGpmSampleFree(sample)
            except pynvml.NVMLError as err:
                log.debug("nvmlGpmSampleFree: %s", err)
        self._samples = []


class _Gpu:
    """Handle, probed capabilities and per-tick state of one GPU."""

    def __init__(self, index: int, handle: Any, identity: GpuIdentity, gpm: _Gpm | None,
                 unsupported: set[str] | None = None, mig_refresh_interval: float = MIG_REFRESH_INTERVAL):
        self.index = index
        self.handle = handle
        self.identity = identity
        self.gpm = gpm
        self.unsupported: set[str] = unsupported if unsupported is not None else set()
        self.mig = _MigInstances(self, mig_refresh_interval)
        self.fields = _FieldRequest(tuple(f for f in _FIELDS if f"field:{f.field_id}" not in self.unsupported))
        self._temperature = _TemperatureRequest()
        self._process_sm: dict[int, float] = {}
        self._process_seen_us = 0
        self._reasons: tuple[int | None, dict[str, float]] = (None, {})  # last clock-event mask, as a dict

    # --- error handling -------------------------------------------------------------------------

    def fail(self, key: str, err: pynvml.NVMLError) -> None:
        """Sort an NVML error: GPU gone -> GpuLost; capability -> remember and skip; else skip this tick."""
        if err.value in _LOST_ERRORS:
            raise GpuLost(f"GPU {self.index} ({self.identity.uuid}): {key}: {err}") from err
        if err.value in _CAPABILITY_ERRORS:
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
            values["gpu_utilization_ratio"] = _clamp_ratio(utilization.gpu)
            values["gpu_memory_controller_busy_ratio"] = _clamp_ratio(utilization.memory)

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
                if status in _LOST_ERRORS:
                    raise GpuLost(f"GPU {self.index} ({self.identity.uuid}): field {field.field_id}: "
                                  f"{pynvml.NVMLError(status)}")
                if status in _CAPABILITY_ERRORS:
                    dropped.append(field)
                continue
            decode = _DECODE.get(value_type)
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
            self.fields = _FieldRequest(tuple(f for f in request.fields if f not in dropped))

    def _read_clocks(self, labelled: dict[str, dict[str, float]]) -> None:
        clocks: dict[str, float] = {}
        for name, clock_type, key in _CLOCKS:
            mhz = self.call(key, pynvml.nvmlDeviceGetClockInfo, self.handle, clock_type)
            if mhz is not None:
                clocks[name] = mhz * 1e6
        if clocks:
            labelled["gpu_clock_hertz"] = clocks
        reasons = self.call("clock_event_reasons", pynvml.nvmlDeviceGetCurrentClocksEventReasons, self.handle)
        if reasons is not None:
            if reasons != self._reasons[0]:  # the mask seldom changes: its dict is built once per change
                self._reasons = (reasons, {name: 1.0 if reasons & bit else 0.0 for name, bit in _CLOCK_EVENT_REASONS})
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
                self._process_sm[pid] = _clamp_ratio(sample.smUtil)
            self._process_seen_us = max(self._process_seen_us, stamp)
        for pid in [pid for pid in self._process_sm if pid not in pids]:
            del self._process_sm[pid]

    def close(self) -> None:
        if self.gpm is not None:
            self.gpm.free()
            self.gpm = None
        self.mig.close()


_MIG_PROFILE = re.compile(r" MIG (?:\d+c\.)?(\S+)$")


def _mig_profile(device_name: str) -> str:
    """The GPU instance profile in a MIG device's name: "NVIDIA H100 80GB HBM3 MIG 3g.40gb" -> "3g.40gb".

    A MIG device that is one of several compute instances of a GPU instance is named
    "... MIG 1c.3g.40gb"; the label is the GPU instance's profile, so the "1c." is dropped.
    """
    match = _MIG_PROFILE.search(device_name)
    return match.group(1) if match else "unknown"


@dataclass
class _MigInstance:
    """One MIG GPU instance as last listed."""

    gpu_instance_id: int
    profile: str
    handle: Any  # a MIG device handle inside this GPU instance: the instance's memory is read on it
    gpm: _Gpm | None  # samples of the instance, taken on the parent GPU

    def close(self) -> None:
        if self.gpm is not None:
            self.gpm.free()
            self.gpm = None


class _MigInstances:
    """The MIG GPU instances of one GPU and their per-tick readings.

    Errors go through the GPU's own rules (`_Gpu.fail`): lost -> GpuLost, NotSupported & co. ->
    that MIG query is never asked again. Any other failure (typically: an instance was destroyed
    since it was listed, so its handle or id is stale) makes the next tick re-list the instances.
    """

    def __init__(self, gpu: _Gpu, refresh_interval: float):
        self._gpu = gpu
        self._refresh_interval = refresh_interval
        self._refresh_at = 0.0  # monotonic time of the next listing; 0 = on the next tick
        self._instances: dict[int, _MigInstance] = {}  # by GPU instance id
        self._gpm_request: _GpmRequest | None = None  # shared by the instances' GPM samples

    def read(self) -> tuple[MigReading, ...]:
        if time.monotonic() >= self._refresh_at:
            self._refresh()
        if not self._instances:  # MIG off: most GPUs
            return ()
        return tuple(self._read_instance(instance) for instance in self._instances.values())

    def close(self) -> None:
        self._replace({})

    # --- listing --------------------------------------------------------------------------------

    def _call(self, key: str, function: Callable[..., Any], *args: Any) -> Any:
        """function(*args), or None when unsupported or failed; a failure means re-list next tick."""
        if key in self._gpu.unsupported:
            return None
        try:
            return function(*args)
        except pynvml.NVMLError as err:
            self._gpu.fail(key, err)
            if err.value not in _CAPABILITY_ERRORS:
                self._refresh_at = 0.0
            return None

    def _refresh(self) -> None:
        self._refresh_at = time.monotonic() + self._refresh_interval
        mode = self._call("mig_mode", pynvml.nvmlDeviceGetMigMode, self._gpu.handle)
        if mode is None and "mig_mode" not in self._gpu.unsupported:
            return  # failed this tick: keep what we have, try again next tick
        listed = self._list() if mode is not None and mode[0] == pynvml.NVML_DEVICE_MIG_ENABLE else {}
        if listed is not None:
            self._replace(listed)

    def _list(self) -> dict[int, tuple[str, Any]] | None:
        """{GPU instance id: (profile, a MIG device handle)}, or None when listing failed this tick."""
        handle = self._gpu.handle
        slots = self._call("mig_devices", pynvml.nvmlDeviceGetMaxMigDeviceCount, handle)
        if slots is None:
            return {} if "mig_devices" in self._gpu.unsupported else None
        found: dict[int, tuple[str, Any]] = {}
        for slot in range(slots):
            try:
                mig_handle = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
                gpu_instance_id = pynvml.nvmlDeviceGetGpuInstanceId(mig_handle)
                if gpu_instance_id in found:  # another compute instance of a GPU instance already seen
                    continue
                name = _text(pynvml.nvmlDeviceGetName(mig_handle))
            except pynvml.NVMLError as err:
                if err.value == pynvml.NVML_ERROR_NOT_FOUND:  # no MIG device in this slot
                    continue
                self._gpu.fail("mig_devices", err)
                if err.value in _CAPABILITY_ERRORS:
                    return {}
                self._refresh_at = 0.0
                return None
            found[gpu_instance_id] = (_mig_profile(name), mig_handle)
        return found

    def _replace(self, listed: dict[int, tuple[str, Any]]) -> None:
        """Take a new listing; an instance that is still there keeps its GPM samples (no gap in ratios)."""
        before = [(i.gpu_instance_id, i.profile) for i in self._instances.values()]
        old = dict(self._instances)
        instances: dict[int, _MigInstance] = {}
        for gpu_instance_id, (profile, mig_handle) in sorted(listed.items()):
            previous = old.pop(gpu_instance_id, None)
            if previous is not None and previous.profile == profile:
                gpm = previous.gpm
            else:
                if previous is not None:
                    previous.close()
                gpm = self._open_gpm(gpu_instance_id)
            instances[gpu_instance_id] = _MigInstance(gpu_instance_id, profile, mig_handle, gpm)
        for gone in old.values():
            gone.close()
        if [(i.gpu_instance_id, i.profile) for i in instances.values()] != before:
            log.info("GPU %d: MIG GPU instances: %s", self._gpu.index,
                     ", ".join(f"{i.gpu_instance_id} ({i.profile})" for i in instances.values()) or "none")
        self._instances = instances

    def _open_gpm(self, gpu_instance_id: int) -> _Gpm | None:
        if not self._gpu.identity.gpm_supported:
            return None
        if self._gpm_request is None:
            self._gpm_request = _GpmRequest(_MIG_GPM_METRICS)
        return self._call("mig_gpm", _Gpm, self._gpu.handle, self._gpm_request, gpu_instance_id)

    # --- one tick -------------------------------------------------------------------------------

    def _read_instance(self, instance: _MigInstance) -> MigReading:
        values: dict[str, float] = {}
        memory = self._call("mig_memory", pynvml.nvmlDeviceGetMemoryInfo, instance.handle)
        if memory is not None:
            values["gpu_mig_memory_total_bytes"] = float(memory.total)
            values["gpu_mig_memory_used_bytes"] = float(memory.total - memory.free)
        if instance.gpm is not None:
            ratios = self._call("mig_gpm", instance.gpm.read)
            if ratios is not None:
                values.update(ratios)
            elif "mig_gpm" in self._gpu.unsupported:
                for each in self._instances.values():
                    each.close()
        return MigReading(instance.gpu_instance_id, instance.profile, values)


class _XidWatcher:
    """Counts XID events per (GPU, XID) on one background thread blocked in nvmlEventSetWait."""

    def __init__(self, wait_ms: int) -> None:
        self._wait_ms = wait_ms  # how long one nvmlEventSetWait blocks; bounds close()'s latency
        self._lock = threading.Lock()
        self._counts: dict[int, dict[str, float]] = {}
        self._by_address: dict[int, int] = {}
        self._by_uuid: dict[str, int] = {}
        self._logged: dict[tuple[int, int], tuple[float, float]] = {}  # (gpu, xid) -> (when, count then)
        self._stop = threading.Event()
        self._event_set: Any = None
        self._thread: threading.Thread | None = None

    def start(self, gpus: list[_Gpu]) -> None:
        try:
            self._event_set = pynvml.nvmlEventSetCreate()
        except pynvml.NVMLError as err:
            log.warning("XID events unavailable (nvmlEventSetCreate: %s); gpu_xid_errors_total is left out", err)
            return
        for gpu in gpus:
            self.register(gpu)
        self._thread = threading.Thread(target=self._run, name="nvml-xid-events", daemon=True)
        self._thread.start()

    def register(self, gpu: _Gpu) -> None:
        """Watch one GPU (again, after a recovery). A GPU that refuses events is just not watched."""
        if self._event_set is None:
            return
        try:
            pynvml.nvmlDeviceRegisterEvents(gpu.handle, pynvml.nvmlEventTypeXidCriticalError, self._event_set)
        except pynvml.NVMLError as err:
            log.warning("GPU %d: XID events unavailable (%s)", gpu.index, err)
            return
        with self._lock:
            self._by_address[_handle_address(gpu.handle)] = gpu.index
            self._by_uuid[gpu.identity.uuid] = gpu.index

    def counts(self, index: int) -> dict[str, float]:
        """A copy of the XID counts of one GPU (the reading must not share a dict with this thread)."""
        if index not in self._counts:  # the usual case, told without the lock (one dict lookup)
            return {}
        with self._lock:
            counts = self._counts.get(index)
            return dict(counts) if counts else {}

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = pynvml.nvmlEventSetWait_v2(self._event_set, self._wait_ms)
            except pynvml.NVMLError_Timeout:
                continue
            except pynvml.NVMLError as err:  # e.g. a lost GPU in the set: back off, keep watching the rest
                log.debug("nvmlEventSetWait: %s", err)
                self._stop.wait(1.0)
                continue
            if data.eventType & pynvml.nvmlEventTypeXidCriticalError:
                self._count(data.device, int(data.eventData))
        try:
            pynvml.nvmlEventSetFree(self._event_set)
        except pynvml.NVMLError as err:
            log.debug("nvmlEventSetFree: %s", err)

    def _count(self, device: Any, xid: int) -> None:
        with self._lock:
            index = self._by_address.get(_handle_address(device))
        if index is None:  # a handle we did not hand out: find the GPU by UUID
            try:
                index = self._by_uuid.get(_text(pynvml.nvmlDeviceGetUUID(device)))
            except pynvml.NVMLError:
                index = None
        if index is None:
            log.warning("XID %d on an unknown GPU", xid)
            return
        with self._lock:
            per_gpu = self._counts.setdefault(index, {})
            key = str(xid)
            per_gpu[key] = total = per_gpu.get(key, 0.0) + 1.0
        self._log(index, xid, total)

    def _log(self, index: int, xid: int, total: float) -> None:
        """Called on this watcher's thread only, so _logged needs no lock."""
        now = time.monotonic()
        last = self._logged.get((index, xid))
        if last is None:
            log.warning("GPU %d: XID %d", index, xid)
        elif now - last[0] >= XID_LOG_INTERVAL:
            log.warning("GPU %d: XID %d, %d more since %.0fs ago", index, xid, total - last[1], now - last[0])
        else:
            return
        self._logged[(index, xid)] = (now, total)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=4 * self._wait_ms / 1000)
            if self._thread.is_alive():
                log.warning("the XID event thread did not stop (NVML call hung)")


class NvmlBackend:
    """Backend over NVML. Cheap to construct; `discover()` initialises the library."""

    name = "nvml"

    def __init__(self, config: Any = None, *, event_wait_ms: int = 500,
                 mig_refresh_interval: float = MIG_REFRESH_INTERVAL):
        self._config = config
        self._mig_refresh_interval = mig_refresh_interval
        self._gpus: dict[int, _Gpu] = {}
        self._event_wait_ms = event_wait_ms
        self._xids = _XidWatcher(event_wait_ms)
        self._initialized = False
        self._system = ("", "")  # driver version, CUDA version: the same for every GPU

    # --- Backend protocol -----------------------------------------------------------------------

    def discover(self) -> list[GpuIdentity]:
        self._init_library()
        try:
            count = pynvml.nvmlDeviceGetCount()
            driver_version = _text(pynvml.nvmlSystemGetDriverVersion())
            cuda_version = self._optional(lambda: _cuda_version(pynvml.nvmlSystemGetCudaDriverVersion_v2()))
        except pynvml.NVMLError as err:
            self.close()
            raise BackendUnavailable(f"NVML initialised but cannot list GPUs: {err}") from err
        self._system = (driver_version, cuda_version)
        for index in range(count):
            self._gpus[index] = self._open(index, pynvml.nvmlDeviceGetHandleByIndex, index, unsupported=None)
        self._xids.start([gpu for gpu in self._gpus.values() if gpu.handle is not None])
        return [gpu.identity for gpu in self._gpus.values()]

    def read(self, index: int) -> GpuReading:
        gpu = self._gpus.get(index)
        if gpu is None or gpu.handle is None:
            raise GpuLost(f"GPU {index} has no NVML handle")
        return gpu.read(self._xids.counts(index))

    def recover(self, index: int) -> GpuIdentity:
        old = self._gpus.get(index)
        if old is None:
            raise GpuLost(f"GPU {index} is unknown to NVML")
        old.close()
        if old.identity.uuid.startswith("GPU-"):
            gpu = self._open(index, pynvml.nvmlDeviceGetHandleByUUID, old.identity.uuid, old.unsupported)
        else:  # lost before we ever learnt its UUID
            gpu = self._open(index, pynvml.nvmlDeviceGetHandleByIndex, index, old.unsupported)
        self._gpus[index] = gpu
        if gpu.handle is None:
            raise GpuLost(f"GPU {index} is still not answering")
        self._xids.register(gpu)
        return gpu.identity

    def close(self) -> None:
        self._xids.stop()
        self._xids = _XidWatcher(self._event_wait_ms)  # a later discover() starts a fresh one
        for gpu in self._gpus.values():
            gpu.close()
        self._gpus = {}
        if self._initialized:
            self._initialized = False
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError as err:
                log.debug("nvmlShutdown: %s", err)

    # --- helpers --------------------------------------------------------------------------------

    def _init_library(self) -> None:
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError_LibraryNotFound as err:
            raise BackendUnavailable(
                f"NVML library libnvidia-ml.so.1 not found ({err}): is the NVIDIA driver installed? {SIM_HINT}"
            ) from err
        except pynvml.NVMLError_DriverNotLoaded as err:
            raise BackendUnavailable(
                f"the NVIDIA kernel driver is not loaded ({err}); load it or wait for it with --nvml.wait; {SIM_HINT}"
            ) from err
        except pynvml.NVMLError as err:
            raise BackendUnavailable(f"NVML failed to initialise: {err}; {SIM_HINT}") from err
        self._initialized = True

    def _reinit_if_needed(self, err: pynvml.NVMLError) -> bool:
        """After a GPU reset NVML may answer Uninitialized: initialise it again once."""
        if err.value != pynvml.NVML_ERROR_UNINITIALIZED:
            return False
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError:
            return False
        return True

    def _open(self, index: int, get_handle: Callable[[Any], Any], key: Any, unsupported: set[str] | None) -> _Gpu:
        """Acquire a GPU's handle, identity and GPM state. A GPU that does not answer comes back
        with handle None and a placeholder identity, so it is reported down and retried."""
        try:
            try:
                handle = get_handle(key)
            except pynvml.NVMLError as err:
                if not self._reinit_if_needed(err):
                    raise
                handle = get_handle(key)
            identity, gpm = self._identify(index, handle)
        except pynvml.NVMLError as err:
            log.warning("GPU %d does not answer: %s", index, err)
            old = self._gpus.get(index)
            identity = old.identity if old else GpuIdentity(index=index, uuid=f"unknown-{index}", name="unknown")
            return _Gpu(index, None, identity, None, unsupported)
        return _Gpu(index, handle, identity, gpm, unsupported, self._mig_refresh_interval)

    def _identify(self, index: int, handle: Any) -> tuple[GpuIdentity, _Gpm | None]:
        driver_version, cuda_version = self._system
        uuid = _text(pynvml.nvmlDeviceGetUUID(handle))
        gpm = self._open_gpm(index, handle)
        identity = GpuIdentity(
            index=index,
            uuid=uuid,
            name=_text(pynvml.nvmlDeviceGetName(handle)),
            pci_bus_id=self._optional(lambda: _text(pynvml.nvmlDeviceGetPciInfo(handle).busId)),
            driver_version=driver_version,
            cuda_version=cuda_version,
            serial=self._optional(lambda: _text(pynvml.nvmlDeviceGetSerial(handle))),
            gpm_supported=gpm is not None,
        )
        return identity, gpm

    def _open_gpm(self, index: int, handle: Any) -> _Gpm | None:
        """GPM state when the GPU supports it (Hopper and newer); ArgumentVersionMismatch = no."""
        try:
            if not pynvml.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice:
                return None
            return _Gpm(handle)
        except pynvml.NVMLError as err:
            if err.value in _LOST_ERRORS:
                raise
            log.info("GPU %d: GPM unavailable (%s)", index, err)
            return None

    @staticmethod
    def _optional(getter: Callable[[], Any], default: Any = "") -> Any:
        """An identity detail some GPUs or drivers do not have (serial, PCI info): default when missing."""
        try:
            return getter()
        except pynvml.NVMLError as err:
            if err.value in _LOST_ERRORS:
                raise
            return default
