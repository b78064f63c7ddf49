"""Immutable sample data shared by the sampler, the collectors and the phase accountant.

Everything here is frozen: the sampler builds a new Snapshot every tick and swaps a single
reference, so a scrape or the accountant can never see a half-written sample (no torn reads
such as used + free != total).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True)
class GpuIdentity:
    """Static facts about one GPU; they only ever appear on `gpu_info`."""

    index: int
    uuid: str
    name: str
    pci_bus_id: str = ""
    driver_version: str = ""
    cuda_version: str = ""
    serial: str = ""
    gpm_supported: bool = False

    @property
    def labels(self) -> dict[str, str]:
        """The two labels every per-GPU series carries."""
        return {"gpu": str(self.index), "uuid": self.uuid}


@dataclass(frozen=True)
class ProcessReading:
    """One compute process as the backend sees it (host PID, raw numbers)."""

    pid: int
    memory_used_bytes: float | None = None
    sm_active_ratio: float | None = None


@dataclass(frozen=True)
class ProcessSample:
    """A ProcessReading enriched with who it is (name, container, pod); built off the scrape path."""

    pid: int
    process_name: str = ""
    container: str = ""
    pod: str = ""
    namespace: str = ""
    memory_used_bytes: float | None = None
    sm_active_ratio: float | None = None


@dataclass(frozen=True)
class MigReading:
    """One MIG GPU instance: memory and GPM figures of that slice alone."""

    gpu_instance_id: int
    profile: str
    values: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GpuReading:
    """What a backend returns for one GPU and one tick.

    `values` maps a metric name of gpuphase/model/metrics.yaml to its value for the metrics with no
    label beyond gpu/uuid; `labelled` maps a metric name to {value of its one extra label: value}
    (clock -> Hz, reason -> 0/1, type -> count, xid -> count). A metric the GPU does not
    support is simply absent: absent is not zero.
    """

    values: Mapping[str, float] = field(default_factory=dict)
    labelled: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    processes: tuple[ProcessReading, ...] = ()
    mig: tuple[MigReading, ...] = ()


@dataclass(frozen=True)
class GpuSample:
    """One GPU at one tick, as exported. `up` False means the GPU did not answer this tick."""

    identity: GpuIdentity
    up: bool
    timestamp: float  # wall clock (time.time()) when the reading completed
    values: Mapping[str, float] = field(default_factory=dict)
    labelled: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    processes: tuple[ProcessSample, ...] = ()
    mig: tuple[MigReading, ...] = ()
    last_success: float = 0.0  # wall clock of the last good reading, 0 if never


@dataclass(frozen=True)
class Snapshot:
    """All GPUs at one tick. `complete` is True once every GPU has been read at least once."""

    timestamp: float
    gpus: tuple[GpuSample, ...]
    complete: bool = False
    tick_duration_seconds: float = 0.0
    errors: Mapping[str, int] = field(default_factory=dict)

    def gpu(self, index: int) -> GpuSample | None:
        for sample in self.gpus:
            if sample.identity.index == index:
                return sample
        return None
