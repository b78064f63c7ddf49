"""NvmlBackend: discovery, one reading per GPU, recovery of lost GPUs, shutdown."""

from __future__ import annotations

import logging
from typing import Any, Callable

import pynvml

from gpuphase.agent.backends import BackendUnavailable, GpuLost
from gpuphase.agent.backends.nvml.common import LOST_ERRORS, decode_cuda_version, text
from gpuphase.agent.backends.nvml.device import GpuDevice
from gpuphase.agent.backends.nvml.gpm import Gpm
from gpuphase.agent.backends.nvml.mig import MIG_REFRESH_INTERVAL
from gpuphase.agent.backends.nvml.xid import XidWatcher
from gpuphase.model.snapshot import GpuIdentity, GpuReading

log = logging.getLogger(__name__)

SIM_HINT = "on hosts without NVIDIA GPUs run with --backend sim"


class NvmlBackend:
    """Backend over NVML. Cheap to construct; `discover()` initialises the library."""

    name = "nvml"

    def __init__(self, *, event_wait_ms: int = 500, mig_refresh_interval: float = MIG_REFRESH_INTERVAL):
        self._mig_refresh_interval = mig_refresh_interval
        self._gpus: dict[int, GpuDevice] = {}
        self._event_wait_ms = event_wait_ms
        self._xids = XidWatcher(event_wait_ms)
        self._initialized = False
        self._system = ("", "")  # driver version, CUDA version: the same for every GPU

    # --- Backend protocol -----------------------------------------------------------------------

    def discover(self) -> list[GpuIdentity]:
        self._init_library()
        try:
            count = pynvml.nvmlDeviceGetCount()
            driver_version = text(pynvml.nvmlSystemGetDriverVersion())
            cuda_version = self._optional(lambda: decode_cuda_version(pynvml.nvmlSystemGetCudaDriverVersion_v2()))
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
        self._xids = XidWatcher(self._event_wait_ms)  # a later discover() starts a fresh one
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

    def _open(self, index: int, get_handle: Callable[[Any], Any], key: Any, unsupported: set[str] | None) -> GpuDevice:
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
            return GpuDevice(index, None, identity, None, unsupported)
        return GpuDevice(index, handle, identity, gpm, unsupported, self._mig_refresh_interval)

    def _identify(self, index: int, handle: Any) -> tuple[GpuIdentity, Gpm | None]:
        driver_version, cuda_version = self._system
        uuid = text(pynvml.nvmlDeviceGetUUID(handle))
        gpm = self._open_gpm(index, handle)
        identity = GpuIdentity(
            index=index,
            uuid=uuid,
            name=text(pynvml.nvmlDeviceGetName(handle)),
            pci_bus_id=self._optional(lambda: text(pynvml.nvmlDeviceGetPciInfo(handle).busId)),
            driver_version=driver_version,
            cuda_version=cuda_version,
            serial=self._optional(lambda: text(pynvml.nvmlDeviceGetSerial(handle))),
            gpm_supported=gpm is not None,
        )
        return identity, gpm

    def _open_gpm(self, index: int, handle: Any) -> Gpm | None:
        """GPM state when the GPU supports it (Hopper and newer); ArgumentVersionMismatch = no."""
        try:
            if not pynvml.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice:
                return None
            return Gpm(handle)
        except pynvml.NVMLError as err:
            if err.value in LOST_ERRORS:
                raise
            log.info("GPU %d: GPM unavailable (%s)", index, err)
            return None

    @staticmethod
    def _optional(getter: Callable[[], Any], default: Any = "") -> Any:
        """An identity detail some GPUs or drivers do not have (serial, PCI info): default when missing."""
        try:
            return getter()
        except pynvml.NVMLError as err:
            if err.value in LOST_ERRORS:
                raise
            return default
