"""GPU backends behind one small interface.

A backend discovers GPUs once and reads one GPU per call. The sampler owns timing, threads,
retries and error isolation; a backend only turns hardware (or a simulation) into GpuReadings.
"""

from __future__ import annotations

from typing import Protocol

from gpuphase.model.snapshot import GpuIdentity, GpuReading


class BackendUnavailable(RuntimeError):
    """The backend cannot start at all (no driver, no library). The message is shown to the user."""


class GpuLost(RuntimeError):
    """This GPU stopped answering (fell off the bus, reset, lost). Other GPUs are unaffected."""


class Backend(Protocol):
    name: str

    def discover(self) -> list[GpuIdentity]:
        """Return every GPU on the host. Raises BackendUnavailable."""

    def read(self, index: int) -> GpuReading:
        """Read one GPU now. Raises GpuLost when the GPU does not answer."""

    def recover(self, index: int) -> GpuIdentity:
        """Try to bring a lost GPU back (re-acquire handles, re-init). Raises GpuLost if still gone."""

    def close(self) -> None:
        """Release the library and stop any background thread."""


def create_backend(config) -> Backend:
    """Build the backend the config asks for. `auto` means NVML: it never falls back to simulated data."""
    kind = config.backend
    if kind in ("auto", "nvml"):
        from gpuphase.agent.backends.nvml import NvmlBackend

        return NvmlBackend()
    if kind == "sim":
        from gpuphase.agent.backends.sim import SimBackend

        return SimBackend.from_config(config)
    raise BackendUnavailable(f"unknown backend {kind!r}; use auto, nvml or sim")
