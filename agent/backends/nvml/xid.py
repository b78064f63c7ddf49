"""XID errors as NVML events, counted per (GPU, XID) so that no burst between two ticks is lost."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import pynvml

from gpuphase.agent.backends.nvml.common import handle_address, text

if TYPE_CHECKING:
    from gpuphase.agent.backends.nvml.device import GpuDevice

log = logging.getLogger(__name__)

# An XID storm (a failing GPU can raise hundreds a second) must not become a log storm: the first
# XID of each kind per GPU is logged at once, later ones as one summary line at most this often.
# gpu_xid_errors_total counts every one regardless.
XID_LOG_INTERVAL = 60.0


class XidWatcher:
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

    def start(self, gpus: list[GpuDevice]) -> None:
        try:
            self._event_set = pynvml.nvmlEventSetCreate()
        except pynvml.NVMLError as err:
            log.warning("XID events unavailable (nvmlEventSetCreate: %s); gpu_xid_errors_total is left out", err)
            return
        for gpu in gpus:
            self.register(gpu)
        self._thread = threading.Thread(target=self._run, name="nvml-xid-events", daemon=True)
        self._thread.start()

    def register(self, gpu: GpuDevice) -> None:
        """Watch one GPU (again, after a recovery). A GPU that refuses events is just not watched."""
        if self._event_set is None:
            return
        try:
            pynvml.nvmlDeviceRegisterEvents(gpu.handle, pynvml.nvmlEventTypeXidCriticalError, self._event_set)
        except pynvml.NVMLError as err:
            log.warning("GPU %d: XID events unavailable (%s)", gpu.index, err)
            return
        with self._lock:
            self._by_address[handle_address(gpu.handle)] = gpu.index
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
            index = self._by_address.get(handle_address(device))
        if index is None:  # a handle we did not hand out: find the GPU by UUID
            try:
                index = self._by_uuid.get(text(pynvml.nvmlDeviceGetUUID(device)))
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
