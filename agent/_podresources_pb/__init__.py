"""The kubelet pod-resources API v1 messages we read, built at import from a descriptor.

Wire contract: k8s.io/kubelet/pkg/apis/podresources/v1/api.proto (Kubernetes, Apache-2.0),
service `v1.PodResourcesLister`, method `List`, served on
/var/lib/kubelet/pod-resources/kubelet.sock. Only the subset of fields the agent uses is
declared, with upstream's field numbers; everything else the kubelet sends (cpu_ids, memory,
topology, dynamic_resources, ...) is skipped by protobuf as unknown fields, which is exactly how
protobuf keeps old readers working against newer servers.

    message ListPodResourcesRequest {}
    message ListPodResourcesResponse { repeated PodResources pod_resources = 1; }
    message PodResources       { string name = 1; string namespace = 2; repeated ContainerResources containers = 3; }
    message ContainerResources { string name = 1; repeated ContainerDevices devices = 2; }
    message ContainerDevices   { string resource_name = 1; repeated string device_ids = 2; }

Why a descriptor instead of protoc-generated *_pb2.py: generated modules embed the protobuf
version that generated them and refuse older runtimes, which would pin our users' protobuf to
whatever grpcio-tools we happened to run. A descriptor built here works on every protobuf >= 4.21
and needs nothing at build time. tests/test_podresources.py checks the field numbers against
hand-encoded wire bytes, so a typo here cannot go unnoticed.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

SERVICE = "v1.PodResourcesLister"
LIST_METHOD = f"/{SERVICE}/List"

_STRING = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
_MESSAGE = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
_ONE = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
_MANY = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED

# message name -> [(field name, number, label, type, message type name or "")]
_MESSAGES = {
    "ListPodResourcesRequest": [],
    "ListPodResourcesResponse": [("pod_resources", 1, _MANY, _MESSAGE, "PodResources")],
    "PodResources": [
        ("name", 1, _ONE, _STRING, ""),
        ("namespace", 2, _ONE, _STRING, ""),
        ("containers", 3, _MANY, _MESSAGE, "ContainerResources"),
    ],
    "ContainerResources": [
        ("name", 1, _ONE, _STRING, ""),
        ("devices", 2, _MANY, _MESSAGE, "ContainerDevices"),
    ],
    "ContainerDevices": [
        ("resource_name", 1, _ONE, _STRING, ""),
        ("device_ids", 2, _MANY, _STRING, ""),
    ],
}


def _build_file() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto(
        name="gpuphase/podresources/v1/api.proto", package="v1", syntax="proto3"
    )
    for message_name, message_fields in _MESSAGES.items():
        message = proto.message_type.add(name=message_name)
        for name, number, label, kind, type_name in message_fields:
            field = message.field.add(name=name, number=number, label=label, type=kind)
            if type_name:
                field.type_name = ".v1." + type_name
    return proto


# A private pool: the package name "v1" is generic enough to collide with another library's
# messages in protobuf's default pool.
_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_build_file())


def _message_class(name: str):
    descriptor = _POOL.FindMessageTypeByName("v1." + name)
    if hasattr(message_factory, "GetMessageClass"):  # protobuf >= 4.22
        return message_factory.GetMessageClass(descriptor)
    return message_factory.MessageFactory(_POOL).GetPrototype(descriptor)  # protobuf 4.21


ListPodResourcesRequest = _message_class("ListPodResourcesRequest")
ListPodResourcesResponse = _message_class("ListPodResourcesResponse")
PodResources = _message_class("PodResources")
ContainerResources = _message_class("ContainerResources")
ContainerDevices = _message_class("ContainerDevices")
