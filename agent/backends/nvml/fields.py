"""The scalar NVML fields read in one nvmlDeviceGetFieldValues call per GPU, and the temperature.

Both requests are allocated once per GPU and passed to NVML directly: pynvml's wrappers build them
anew and set every member through a Python hook on each call.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from typing import Any, Callable

import pynvml

from gpuphase.agent.backends.nvml.common import answer_layout, call_nvml, plain_struct

ALL_LINKS = 0xFFFFFFFF  # field scopeId meaning "summed over every NVLink"


@dataclass(frozen=True)
class Field:
    """One scalar NVML field: where its value goes and the factor to base units."""

    field_id: int
    metric: str
    scale: float = 1.0
    label: str | None = None  # the value of the metric's one extra label, for labelled metrics
    scope: int = 0


FIELDS = (
    Field(pynvml.NVML_FI_DEV_POWER_INSTANT, "gpu_power_watts", 1e-3),  # mW
    Field(pynvml.NVML_FI_DEV_POWER_CURRENT_LIMIT, "gpu_power_limit_watts", 1e-3),  # mW
    Field(pynvml.NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION, "gpu_energy_joules_total", 1e-3),  # mJ
    Field(pynvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES, "gpu_pcie_transmit_bytes_total"),
    Field(pynvml.NVML_FI_DEV_PCIE_COUNT_RX_BYTES, "gpu_pcie_receive_bytes_total"),
    Field(pynvml.NVML_FI_DEV_PCIE_REPLAY_COUNTER, "gpu_pcie_replay_errors_total"),
    Field(pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, "gpu_nvlink_transmit_bytes_total", 1024.0, scope=ALL_LINKS),
    Field(pynvml.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, "gpu_nvlink_receive_bytes_total", 1024.0, scope=ALL_LINKS),
    Field(pynvml.NVML_FI_DEV_MEMORY_TEMP, "gpu_memory_temperature_celsius"),
    Field(pynvml.NVML_FI_DEV_ECC_SBE_VOL_TOTAL, "gpu_ecc_errors_total", label="correctable"),
    Field(pynvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL, "gpu_ecc_errors_total", label="uncorrectable"),
    Field(pynvml.NVML_FI_DEV_REMAPPED_COR, "gpu_remapped_rows", label="correctable"),
    Field(pynvml.NVML_FI_DEV_REMAPPED_UNC, "gpu_remapped_rows", label="uncorrectable"),
    Field(pynvml.NVML_FI_DEV_REMAPPED_PENDING, "gpu_remapped_rows", label="pending"),
    Field(pynvml.NVML_FI_DEV_REMAPPED_FAILURE, "gpu_remapped_rows", label="failure"),
)

_DOUBLE_BITS, _DOUBLE = struct.Struct("<Q"), struct.Struct("<d")
_ULONG_MASK = (1 << 8 * ctypes.sizeof(ctypes.c_ulong)) - 1
# The value of each nvmlValueType_t, as a float, from the 8 bytes of a c_nvmlValue_t union read as
# one little-endian unsigned integer (NVML runs on little-endian hosts only: x86-64, Arm64, POWER
# LE). A member narrower than the union is its low bytes; the others are masked off.
DECODE: dict[int, Callable[[int], float]] = {
    pynvml.NVML_VALUE_TYPE_DOUBLE: lambda raw: _DOUBLE.unpack(_DOUBLE_BITS.pack(raw))[0],
    pynvml.NVML_VALUE_TYPE_UNSIGNED_INT: lambda raw: float(raw & 0xFFFFFFFF),
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG: lambda raw: float(raw & _ULONG_MASK),
    pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG: float,
    pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG: lambda raw: float(raw - (raw >> 63 << 64)),
    pynvml.NVML_VALUE_TYPE_SIGNED_INT: lambda raw: float((raw & 0xFFFFFFFF) - (((raw >> 31) & 1) << 32)),
    pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT: lambda raw: float(raw & 0xFFFF),
}


FIELD_ANSWER = answer_layout(pynvml.c_nvmlFieldValue_t, ("valueType", "I"), ("nvmlReturn", "I"), ("value", "Q"))


PlainFieldValue = plain_struct(pynvml.c_nvmlFieldValue_t)


PlainTemperature = plain_struct(pynvml.c_nvmlTemperature_v1_t)


class FieldRequest:
    """The nvmlDeviceGetFieldValues request of one GPU (the fields it still supports), allocated once.

    pynvml's nvmlDeviceGetFieldValues builds a new array on every call and sets each entry's ids
    through its structs' __setattr__ hook, which with a quick driver costs more than the call
    itself (docs/design-figures.md).
    NVML writes only an entry's outputs (status, type, value, timestamp, latency), so the ids set
    here once stay; the answers are unpacked in one go (see answer_layout). The temperature request
    (TemperatureRequest) is kept the same way.
    """

    def __init__(self, fields: tuple[Field, ...]):
        self.fields = fields
        self.plan = tuple((f, f.metric, f.label, f.scale) for f in fields)
        self._entries = (PlainFieldValue * len(fields))()
        for entry, field in zip(self._entries, fields):
            entry.fieldId, entry.scopeId = field.field_id, field.scope
        self._count = ctypes.c_int32(len(fields))
        self._unpack = struct.Struct("<" + FIELD_ANSWER * len(fields)).unpack_from

    def fetch(self, handle: Any) -> tuple[int, ...]:
        """(value type, status, the value's raw 8 bytes) of each field, flat; raises NVMLError."""
        call_nvml("nvmlDeviceGetFieldValues", handle, self._count, self._entries)
        return self._unpack(self._entries)


class TemperatureRequest:
    """The nvmlDeviceGetTemperatureV request of one GPU, allocated once (see FieldRequest): pynvml's
    wrapper builds it and sets its version and sensor through the __setattr__ hook on every call,
    which made the call half as dear again as the other single-struct getters."""

    def __init__(self) -> None:
        self._request = PlainTemperature(version=pynvml.nvmlTemperature_v1, sensorType=pynvml.NVML_TEMPERATURE_GPU)
        self._pointer = ctypes.pointer(self._request)

    def fetch(self, handle: Any) -> int:
        """The GPU's temperature in °C; raises NVMLError."""
        call_nvml("nvmlDeviceGetTemperatureV", handle, self._pointer)
        return self._request.temperature
