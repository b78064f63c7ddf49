"""agent.sdnotify against real AF_UNIX datagram sockets, as systemd's manager would hold them."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from gpuphase.agent import sdnotify


@pytest.fixture
def path_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


@pytest.fixture
def abstract_socket():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"gpuphase-test-{uuid.uuid4().hex}"
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5)
    yield sock, "@" + name
    sock.close()


def test_ready_reaches_a_filesystem_socket(path_socket):
    sock, path = path_socket
    assert sdnotify.ready(environ={"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"READY=1"


def test_ready_with_status_sends_both_lines_in_one_datagram(path_socket):
    sock, path = path_socket
    assert sdnotify.ready("2 GPUs", environ={"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"READY=1\nSTATUS=2 GPUs"


def test_abstract_socket_address_is_the_name_after_a_nul_byte(abstract_socket):
    sock, name = abstract_socket
    assert sdnotify.watchdog(environ={"NOTIFY_SOCKET": name})
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_status_and_stopping_messages(path_socket):
    sock, path = path_socket
    env = {"NOTIFY_SOCKET": path}
    assert sdnotify.status("sampling\n4 GPUs", environ=env)
    assert sdnotify.stopping(environ=env)
    assert sock.recv(4096) == b"STATUS=sampling 4 GPUs"
    assert sock.recv(4096) == b"STOPPING=1"


def test_reads_os_environ_by_default(path_socket, monkeypatch):
    sock, path = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sdnotify.ready()
    assert sock.recv(4096) == b"READY=1"


def test_no_op_outside_systemd():
    assert sdnotify.ready(environ={}) is False
    assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": ""}) is False


@pytest.mark.parametrize("bad", ["relative/path", "@", "vsock:2:1234"])
def test_unusable_address_is_refused_with_a_warning(bad, caplog):
    assert sdnotify.ready(environ={"NOTIFY_SOCKET": bad}) is False
    assert "not a unix socket address" in caplog.text


def test_missing_socket_is_logged_not_raised(tmp_path, caplog):
    assert sdnotify.ready(environ={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False
    assert "could not notify systemd" in caplog.text


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "500000"}, 0.5),  # no PID given: the watchdog is ours
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),  # a parent's
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env, expected):
    assert sdnotify.watchdog_interval(env) == expected
