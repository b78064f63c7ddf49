"""Which Kubernetes pod owns each GPU, from the kubelet's pod-resources API.

The kubelet serves `v1.PodResourcesLister/List` on a unix socket
(/var/lib/kubelet/pod-resources/kubelet.sock; the DaemonSet mounts the directory read-only). It
lists, for every pod on the node, the device ids each container was given by device plugins.
With the NVIDIA device plugin (default DEVICE_ID_STRATEGY=uuid) those ids are what NVML reports:

    nvidia.com/gpu            GPU-<uuid>               whole GPUs (and MIG slices, strategy "single")
    nvidia.com/mig-<profile>  MIG-<uuid>               MIG slices, strategy "mixed"
    nvidia.com/gpu(.shared)   GPU-<uuid>::<replica>    time-slicing replicas: one GPU, several pods

Replica suffixes are stripped, so a time-sliced GPU has several owners; `lookup` answers only
when there is exactly one (a label naming one of several tenants would be a lie), `owners` gives
them all. With DEVICE_ID_STRATEGY=index the ids are "0", "1", ...: look those up by index string.
GPUs given out by Dynamic Resource Allocation (ResourceClaims) are not mapped here; their
pod-resources entries name CDI devices, not GPU UUIDs.

How the agent should combine this with agent/processes.py (pid -> cgroup -> pod UID, container id):
  - per-GPU labels come from here (lookup by the GPU's UUID, MIG UUID for MIG slices);
  - this API names pods but never gives their UIDs, and the cgroup gives UIDs but never names, so a
    process takes (pod, namespace, container) from its GPU's single owner here, provided the
    process's cgroup says it runs in some pod at all (a host process such as a DCGM daemon on a
    pod's GPU must not inherit the pod's name). On a shared GPU the process keeps the pod UID /
    container id its cgroup gave and no pod name.

The List call runs on a background thread every `interval` seconds, never on the scrape path;
lookups read an immutable mapping swapped in one assignment, so they take no lock.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import replace
from types import MappingProxyType
from typing import Callable, Mapping, NamedTuple

import grpc

from gpuphase.agent import _podresources_pb as pb
from gpuphase.model.snapshot import ProcessSample

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
# The kubelet's own limit on this API's responses (podresources.DefaultPodResourcesMaxSize).
MAX_RESPONSE_BYTES = 16 * 1024 * 1024


class PodRef(NamedTuple):
    pod: str
    namespace: str
    container: str


DeviceMap = Mapping[str, tuple[PodRef, ...]]
_EMPTY: DeviceMap = MappingProxyType({})


def is_gpu_resource(resource_name: str) -> bool:
    """nvidia.com/gpu, nvidia.com/gpu.shared (time-slicing renamed) and nvidia.com/mig-* slices."""
    return resource_name == "nvidia.com/gpu" or resource_name.startswith(("nvidia.com/gpu.", "nvidia.com/mig-"))


def device_map(response, is_gpu: Callable[[str], bool] = is_gpu_resource) -> DeviceMap:
    """ListPodResourcesResponse -> {device id: owners}, owners sorted for stable output."""
    owners: dict[str, set[PodRef]] = {}
    for pod in response.pod_resources:
        for container in pod.containers:
            ref = PodRef(pod.name, pod.namespace, container.name)
            for devices in container.devices:
                if not is_gpu(devices.resource_name):
                    continue
                for device_id in devices.device_ids:
                    owners.setdefault(device_id.split("::", 1)[0], set()).add(ref)
    return MappingProxyType({device: tuple(sorted(refs)) for device, refs in owners.items()})


class PodResourcesWatcher:
    """Keeps a device id -> pod mapping fresh from the kubelet; see the module docstring.

    Failure policy: no socket (not on Kubernetes, or the directory not mounted) means no pod
    labels, logged once at debug level. A failing List keeps the last good mapping (pods rarely
    move, and a kubelet restart must not make labels flap), counts an error and logs a warning once
    per failure streak; mappings older than `stale_after` are dropped so labels of a long-gone
    kubelet do not live forever.
    """

    def __init__(
        self,
        socket_path: str = DEFAULT_SOCKET,
        interval: float = 10.0,
        timeout: float = 5.0,
        stale_after: float = 300.0,
        is_gpu: Callable[[str], bool] = is_gpu_resource,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.socket_path = socket_path
        self.interval = interval
        self.timeout = timeout
        self.stale_after = stale_after
        self._is_gpu = is_gpu
        self._clock = clock
        self._devices: DeviceMap = _EMPTY
        self._refreshed_at: float | None = None
        self._errors = 0
        self._failing = False
        self._socket_seen: bool | None = None
        self._channel: grpc.Channel | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- reading (any thread) -------------------------------------------------------------------

    @property
    def errors_total(self) -> int:
        """List calls that failed while the socket existed (for a collector-health counter)."""
        return self._errors

    def devices(self) -> DeviceMap:
        """The current mapping; empty when never refreshed or stale."""
        refreshed_at = self._refreshed_at
        if refreshed_at is None or self._clock() - refreshed_at > self.stale_after:
            return _EMPTY
        return self._devices

    def owners(self, device_id: str) -> tuple[PodRef, ...]:
        return self.devices().get(device_id, ())

    def lookup(self, device_id: str) -> PodRef | None:
        """The one container holding this GPU (UUID, MIG UUID or index string), else None."""
        owners = self.owners(device_id)
        return owners[0] if len(owners) == 1 else None

    # --- refreshing (the background thread, or a test) ------------------------------------------

    def refresh(self) -> bool:
        """One List call; True when the mapping was replaced."""
        if not os.path.exists(self.socket_path):
            if self._socket_seen is not False:
                log.debug("kubelet pod-resources socket %s not found: GPUs get no pod labels "
                          "(not on Kubernetes, or /var/lib/kubelet/pod-resources is not mounted)",
                          self.socket_path)
            self._socket_seen = False
            return False
        self._socket_seen = True
        try:
            response = self._list()
        except grpc.RpcError as err:
            self._errors += 1
            self._close_channel()  # a fresh channel next time: no reconnect backoff after a kubelet restart
            if not self._failing:
                log.warning("kubelet pod-resources List failed (%s: %s); keeping the last known pods",
                            err.code().name if hasattr(err, "code") else "error",
                            err.details() if hasattr(err, "details") else err)
            self._failing = True
            return False
        self._devices = device_map(response, self._is_gpu)
        self._refreshed_at = self._clock()
        if self._failing:
            log.info("kubelet pod-resources List works again")
        self._failing = False
        return True

    def _list(self):
        if self._channel is None:
            self._channel = grpc.insecure_channel(
                "unix:" + os.path.abspath(self.socket_path),
                options=[("grpc.max_receive_message_length", MAX_RESPONSE_BYTES)],
            )
        call = self._channel.unary_unary(
            pb.LIST_METHOD,
            request_serializer=pb.ListPodResourcesRequest.SerializeToString,
            response_deserializer=pb.ListPodResourcesResponse.FromString,
        )
        return call(pb.ListPodResourcesRequest(), timeout=self.timeout)

    def start(self) -> None:
        """Refresh now and then every `interval` seconds on a daemon thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="podresources", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + 1)
            self._thread = None
        self._close_channel()

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception:  # a bug here must not kill the thread and freeze the labels silently
                self._errors += 1
                log.exception("kubelet pod-resources refresh crashed")
            self._stop.wait(self.interval)


def label_with_owner(samples: tuple[ProcessSample, ...], owner: PodRef | None) -> tuple[ProcessSample, ...]:
    """Give the GPU's owning pod's name, namespace and container to its processes that run in a pod.

    The cgroup path (agent/processes.py) tells that a process is in *some* pod (by UID); this API
    names the pod that holds the GPU. A process outside any pod (a host process using the GPU)
    keeps empty labels, and a shared GPU (no single owner) keeps the cgroup-derived labels.
    """
    if owner is None:
        return samples
    return tuple(replace(s, pod=owner.pod, namespace=owner.namespace, container=owner.container) if s.pod else s
                 for s in samples)
