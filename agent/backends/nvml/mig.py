"""MIG: the GPU instances of one GPU, each with its own memory and GPM ratios.

The mode and the instance list are read on the first tick after discovery or recovery, then
every MIG_REFRESH_INTERVAL and on the tick after any failing MIG call (instances can be created
and destroyed while the agent runs), never every tick. A GPU whose driver answers NotSupported to
the MIG mode query (pre-Ampere, consumer boards) has no MIG. Processes are reported per GPU, not
per MIG instance.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import pynvml

from gpuphase.agent.backends.nvml.common import CAPABILITY_ERRORS, text
from gpuphase.agent.backends.nvml.gpm import MIG_GPM_METRICS, Gpm, GpmRequest
from gpuphase.model.snapshot import MigReading

if TYPE_CHECKING:
    from gpuphase.agent.backends.nvml.device import GpuDevice

log = logging.getLogger(__name__)

# MIG instances are re-listed this often (seconds): reconfiguring MIG is rare, listing costs a few
# NVML calls per possible instance, and a failing MIG call triggers a re-listing at once anyway.
MIG_REFRESH_INTERVAL = 30.0


MIG_PROFILE = re.compile(r" MIG (?:\d+c\.)?(\S+)$")


def mig_profile(device_name: str) -> str:
    """The GPU instance profile in a MIG device's name: "NVIDIA H100 80GB HBM3 MIG 3g.40gb" -> "3g.40gb".

    A MIG device that is one of several compute instances of a GPU instance is named
    "... MIG 1c.3g.40gb"; the label is the GPU instance's profile, so the "1c." is dropped.
    """
    match = MIG_PROFILE.search(device_name)
    return match.group(1) if match else "unknown"


@dataclass
class MigInstance:
    """One MIG GPU instance as last listed."""

    gpu_instance_id: int
    profile: str
    handle: Any  # a MIG device handle inside this GPU instance: the instance's memory is read on it
    gpm: Gpm | None  # samples of the instance, taken on the parent GPU

    def close(self) -> None:
        if self.gpm is not None:
            self.gpm.free()
            self.gpm = None


class MigInstances:
    """The MIG GPU instances of one GPU and their per-tick readings.

    Errors go through the GPU's own rules (`GpuDevice.fail`): lost -> GpuLost, NotSupported & co. ->
    that MIG query is never asked again. Any other failure (typically: an instance was destroyed
    since it was listed, so its handle or id is stale) makes the next tick re-list the instances.
    """

    def __init__(self, gpu: GpuDevice, refresh_interval: float):
        self._gpu = gpu
        self._refresh_interval = refresh_interval
        self._refresh_at = 0.0  # monotonic time of the next listing; 0 = on the next tick
        self._instances: dict[int, MigInstance] = {}  # by GPU instance id
        self._gpm_request: GpmRequest | None = None  # shared by the instances' GPM samples

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
            if err.value not in CAPABILITY_ERRORS:
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
                name = text(pynvml.nvmlDeviceGetName(mig_handle))
            except pynvml.NVMLError as err:
                if err.value == pynvml.NVML_ERROR_NOT_FOUND:  # no MIG device in this slot
                    continue
                self._gpu.fail("mig_devices", err)
                if err.value in CAPABILITY_ERRORS:
                    return {}
                self._refresh_at = 0.0
                return None
            found[gpu_instance_id] = (mig_profile(name), mig_handle)
        return found

    def _replace(self, listed: dict[int, tuple[str, Any]]) -> None:
        """Take a new listing; an instance that is still there keeps its GPM samples (no gap in ratios)."""
        before = [(i.gpu_instance_id, i.profile) for i in self._instances.values()]
        old = dict(self._instances)
        instances: dict[int, MigInstance] = {}
        for gpu_instance_id, (profile, mig_handle) in sorted(listed.items()):
            previous = old.pop(gpu_instance_id, None)
            if previous is not None and previous.profile == profile:
                gpm = previous.gpm
            else:
                if previous is not None:
                    previous.close()
                gpm = self._open_gpm(gpu_instance_id)
            instances[gpu_instance_id] = MigInstance(gpu_instance_id, profile, mig_handle, gpm)
        for gone in old.values():
            gone.close()
        if [(i.gpu_instance_id, i.profile) for i in instances.values()] != before:
            log.info("GPU %d: MIG GPU instances: %s", self._gpu.index,
                     ", ".join(f"{i.gpu_instance_id} ({i.profile})" for i in instances.values()) or "none")
        self._instances = instances

    def _open_gpm(self, gpu_instance_id: int) -> Gpm | None:
        if not self._gpu.identity.gpm_supported:
            return None
        if self._gpm_request is None:
            self._gpm_request = GpmRequest(MIG_GPM_METRICS)
        return self._call("mig_gpm", Gpm, self._gpu.handle, self._gpm_request, gpu_instance_id)

    # --- one tick -------------------------------------------------------------------------------

    def _read_instance(self, instance: MigInstance) -> MigReading:
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
