"""Builders shared by the phase accountant tests: GPU samples and phase windows with few words."""

from __future__ import annotations

import itertools

from gpuphase.model.phase import DECODE, PREFILL, PhaseWindow
from gpuphase.model.snapshot import GpuIdentity, GpuSample

GPU0 = GpuIdentity(index=0, uuid="GPU-aaaa", name="NVIDIA H100 80GB HBM3", gpm_supported=True)
GPU1 = GpuIdentity(index=1, uuid="GPU-bbbb", name="NVIDIA H100 80GB HBM3", gpm_supported=True)
KEY0 = (GPU0.index, GPU0.uuid)
KEY1 = (GPU1.index, GPU1.uuid)

_serial = itertools.count()


def sample(ts: float, identity: GpuIdentity = GPU0, up: bool = True, **values: float) -> GpuSample:
    """A reading at `ts`; keyword names are short metric names: sm, tensor, dram, energy, power."""
    names = {"sm": "gpu_sm_active_ratio", "tensor": "gpu_tensor_active_ratio", "dram": "gpu_dram_active_ratio",
             "energy": "gpu_energy_joules_total", "power": "gpu_power_watts"}
    return GpuSample(identity=identity, up=up, timestamp=ts, values={names[k]: v for k, v in values.items()})


def window(phase: str, start: float, end: float, service: str = "llm", tokens: int = 0,
           key: bytes | None = None, pid: int | None = None, gpu_ids: tuple[str, ...] = ()) -> PhaseWindow:
    return PhaseWindow(phase=phase, start=start, end=end, service=service, decoder="generic",
                       key=key if key is not None else b"w%d" % next(_serial), tokens=tokens,
                       pid=pid, gpu_ids=gpu_ids)


def prefill(start: float, end: float, **kw) -> PhaseWindow:
    return window(PREFILL, start, end, **kw)


def decode(start: float, end: float, **kw) -> PhaseWindow:
    return window(DECODE, start, end, **kw)


def totals(accountant, gpu: int = 0, service: str = "llm") -> dict[str, object]:
    """{phase: PhaseSeries} of one GPU and service."""
    return {s.phase: s for s in accountant.series() if s.gpu == gpu and s.service == service}
