"""agent.podresources against a fake kubelet: a real gRPC server on a unix socket.

The fake encodes its responses by hand (protobuf wire format, upstream field numbers, including
fields the agent does not declare such as topology and cpu_ids), so these tests check the agent's
message schema against the protocol rather than against itself.
"""

from __future__ import annotations

import logging
import time
from concurrent import futures

import grpc
import pytest

from gpuphase.agent import _podresources_pb as pb
from gpuphase.agent.podresources import PodRef, PodResourcesWatcher, device_map
from tests.wire import field, varint

# --- protobuf wire encoding, by hand (tests/wire.py) ---------------------------------------------


def _devices(resource: str, *ids: str, numa: int | None = 0) -> bytes:
    # ContainerDevices{resource_name=1, device_ids=2, topology=3{nodes=1{ID=1}}}
    topology = b"" if numa is None else field(3, field(1, varint(1 << 3) + varint(numa)))
    return field(1, resource) + b"".join(field(2, i) for i in ids) + topology


def _container(name: str, *devices: bytes) -> bytes:
    # ContainerResources{name=1, devices=2, cpu_ids=3 (packed int64, unknown to the agent)}
    return field(1, name) + b"".join(field(2, d) for d in devices) + field(3, varint(4) + varint(5))


def _pod(name: str, namespace: str, *containers: bytes) -> bytes:
    return field(1, name) + field(2, namespace) + b"".join(field(3, c) for c in containers)


def _response(*pods: bytes) -> bytes:
    return b"".join(field(1, p) for p in pods)


# --- the fake kubelet ---------------------------------------------------------------------------


class FakeKubelet:
    """Serves v1.PodResourcesLister/List; `response` is raw bytes, `error` a status code to fail with."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.response = _response()
        self.error: grpc.StatusCode | None = None
        self.calls = 0
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        handler = grpc.unary_unary_rpc_method_handler(
            self._list, request_deserializer=lambda raw: raw, response_serializer=lambda raw: raw
        )
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(pb.SERVICE, {"List": handler}),)
        )
        self._server.add_insecure_port("unix:" + socket_path)

    def _list(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.calls += 1
        assert request == b"", "ListPodResourcesRequest has no fields"
        if self.error is not None:
            context.abort(self.error, "fake kubelet failure")
        return self.response

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop(grace=None)


@pytest.fixture
def kubelet(tmp_path):
    server = FakeKubelet(str(tmp_path / "kubelet.sock"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def watcher(kubelet):
    w = PodResourcesWatcher(kubelet.socket_path, interval=0.02, timeout=5)
    yield w
    w.stop()


VLLM = _pod(
    "vllm-0", "serving",
    _container("vllm", _devices("nvidia.com/gpu", "GPU-aaaa", "GPU-bbbb"), _devices("example.com/nic", "eth1")),
    _container("sidecar"),
)
MIG_POD = _pod("small-0", "batch", _container("worker", _devices("nvidia.com/mig-1g.10gb", "MIG-cccc", numa=None)))


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached")
        time.sleep(0.01)


# --- tests --------------------------------------------------------------------------------------


def test_schema_decodes_upstream_wire_bytes_and_skips_unknown_fields():
    response = pb.ListPodResourcesResponse.FromString(_response(VLLM))
    (pod,) = response.pod_resources
    assert (pod.name, pod.namespace) == ("vllm-0", "serving")
    assert [c.name for c in pod.containers] == ["vllm", "sidecar"]
    gpu_devices = pod.containers[0].devices[0]
    assert gpu_devices.resource_name == "nvidia.com/gpu"
    assert list(gpu_devices.device_ids) == ["GPU-aaaa", "GPU-bbbb"]


def test_schema_encodes_what_the_kubelet_expects():
    message = pb.ListPodResourcesResponse()
    container = message.pod_resources.add(name="p", namespace="n").containers.add(name="c")
    container.devices.add(resource_name="nvidia.com/gpu", device_ids=["GPU-1"])
    expected = _response(field(1, "p") + field(2, "n") + field(3, field(1, "c") + field(
        2, field(1, "nvidia.com/gpu") + field(2, "GPU-1"))))
    assert message.SerializeToString() == expected


def test_device_map_strips_time_slicing_replicas_and_keeps_all_owners():
    shared = _devices("nvidia.com/gpu.shared", "GPU-dddd::0")
    response = pb.ListPodResourcesResponse.FromString(_response(
        _pod("a", "ns", _container("x", shared)),
        _pod("b", "ns", _container("y", _devices("nvidia.com/gpu.shared", "GPU-dddd::1"))),
    ))
    assert device_map(response) == {"GPU-dddd": (PodRef("a", "ns", "x"), PodRef("b", "ns", "y"))}


def test_refresh_maps_gpus_and_mig_slices_to_containers(watcher, kubelet):
    kubelet.response = _response(VLLM, MIG_POD)
    assert watcher.refresh()
    assert watcher.lookup("GPU-aaaa") == PodRef("vllm-0", "serving", "vllm")
    assert watcher.lookup("GPU-bbbb") == ("vllm-0", "serving", "vllm")
    assert watcher.lookup("MIG-cccc") == ("small-0", "batch", "worker")
    assert watcher.lookup("eth1") is None  # not a GPU resource
    assert watcher.lookup("GPU-free") is None


def test_shared_gpu_has_no_single_owner(watcher, kubelet):
    kubelet.response = _response(
        _pod("a", "ns", _container("x", _devices("nvidia.com/gpu", "GPU-dddd::0"))),
        _pod("b", "ns", _container("y", _devices("nvidia.com/gpu", "GPU-dddd::1"))),
    )
    assert watcher.refresh()
    assert watcher.lookup("GPU-dddd") is None
    assert len(watcher.owners("GPU-dddd")) == 2


def test_background_refresh_picks_up_changes(watcher, kubelet):
    kubelet.response = _response(VLLM)
    watcher.start()
    _wait_for(lambda: watcher.lookup("GPU-aaaa") is not None)
    kubelet.response = _response(_pod("vllm-1", "serving", _container("vllm", _devices("nvidia.com/gpu", "GPU-aaaa"))))
    _wait_for(lambda: watcher.lookup("GPU-aaaa") == ("vllm-1", "serving", "vllm"))
    assert watcher.lookup("GPU-bbbb") is None  # released by the pod that went away


def test_missing_socket_means_no_labels_and_one_debug_log(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="gpuphase.agent.podresources")
    w = PodResourcesWatcher(str(tmp_path / "absent.sock"))
    assert not w.refresh()
    assert not w.refresh()
    assert w.lookup("GPU-aaaa") is None
    assert w.errors_total == 0  # not an error: bare metal has no kubelet
    messages = [r.getMessage() for r in caplog.records if "not found" in r.getMessage()]
    assert len(messages) == 1 and "absent.sock" in messages[0]


def test_socket_appearing_later_is_picked_up(tmp_path):
    socket_path = str(tmp_path / "kubelet.sock")
    w = PodResourcesWatcher(socket_path)
    assert not w.refresh()
    server = FakeKubelet(socket_path)
    server.response = _response(VLLM)
    server.start()
    try:
        assert w.refresh()
        assert w.lookup("GPU-aaaa") == ("vllm-0", "serving", "vllm")
    finally:
        w.stop()
        server.stop()


def test_server_error_keeps_last_good_data_and_counts(watcher, kubelet, caplog):
    caplog.set_level(logging.INFO, logger="gpuphase.agent.podresources")
    kubelet.response = _response(VLLM)
    assert watcher.refresh()
    kubelet.error = grpc.StatusCode.RESOURCE_EXHAUSTED  # the kubelet's rate limiter says this
    assert not watcher.refresh()
    assert not watcher.refresh()
    assert watcher.errors_total == 2
    assert watcher.lookup("GPU-aaaa") == ("vllm-0", "serving", "vllm")
    assert [r.levelname for r in caplog.records if "List failed" in r.getMessage()] == ["WARNING"]
    assert "RESOURCE_EXHAUSTED" in caplog.text
    kubelet.error = None
    kubelet.response = _response()
    assert watcher.refresh()
    assert watcher.lookup("GPU-aaaa") is None
    assert "works again" in caplog.text


def test_stale_mapping_is_dropped(kubelet):
    now = [1000.0]
    w = PodResourcesWatcher(kubelet.socket_path, stale_after=60, clock=lambda: now[0])
    kubelet.response = _response(VLLM)
    try:
        assert w.refresh()
        kubelet.error = grpc.StatusCode.UNAVAILABLE
        now[0] += 59
        assert not w.refresh()
        assert w.lookup("GPU-aaaa") is not None
        now[0] += 2
        assert w.lookup("GPU-aaaa") is None
    finally:
        w.stop()


def test_label_with_owner_names_pod_processes_only():
    from gpuphase.agent.podresources import PodRef, label_with_owner
    from gpuphase.model.snapshot import ProcessSample

    in_pod = ProcessSample(pid=1, process_name="python3", container="3f2a9c81d4e7", pod="7d0c7d36-uid")
    on_host = ProcessSample(pid=2, process_name="nvtop")
    owner = PodRef(pod="vllm-0", namespace="serving", container="vllm")
    labelled = label_with_owner((in_pod, on_host), owner)
    assert (labelled[0].pod, labelled[0].namespace, labelled[0].container) == ("vllm-0", "serving", "vllm")
    assert labelled[1] == on_host
    assert label_with_owner((in_pod,), None) == (in_pod,)  # shared or free GPU: cgroup labels stay
