"""The sampler against a scripted backend: isolation of lost and hung GPUs, readiness, staleness."""

from __future__ import annotations

import threading
import time

import pytest

from agent.backends import GpuLost
from agent.sampler import Sampler
from agent.snapshot import GpuIdentity, GpuReading, ProcessReading


class ScriptedBackend:
    name = "scripted"

    def __init__(self, gpus: int = 3):
        self.identities = [GpuIdentity(i, f"GPU-{i}", "Test GPU") for i in range(gpus)]
        self.lost: set[int] = set()
        self.hang: dict[int, threading.Event] = {}
        self.reads = [0] * gpus
        self.recover_calls = [0] * gpus

    def discover(self):
        return list(self.identities)

    def read(self, index):
        if index in self.hang:
            self.hang[index].wait()
        if index in self.lost:
            raise GpuLost("gone")
        self.reads[index] += 1
        return GpuReading(
            values={"gpu_memory_used_bytes": 1.0 * self.reads[index], "gpu_memory_total_bytes": 10.0},
            processes=(ProcessReading(pid=100 + index, memory_used_bytes=5.0),),
        )

    def recover(self, index):
        self.recover_calls[index] += 1
        if index in self.lost:
            raise GpuLost("still gone")
        return self.identities[index]

    def close(self):
        pass


def make(backend, **kw):
    sampler = Sampler(backend, interval=kw.pop("interval", 0.1), timeout=kw.pop("timeout", 0.3), **kw)
    sampler._workers = []  # started explicitly in each test through start()
    return sampler


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_snapshot_holds_every_gpu_and_becomes_ready():
    backend = ScriptedBackend(3)
    sampler = make(backend)
    sampler.start()
    try:
        assert sampler.wait_ready(5)
        snapshot = sampler.latest()
        assert [s.identity.index for s in snapshot.gpus] == [0, 1, 2]
        assert all(s.up for s in snapshot.gpus)
        assert snapshot.complete
    finally:
        sampler.stop()


def test_lost_gpu_is_down_while_others_report_and_it_recovers_with_backoff():
    backend = ScriptedBackend(3)
    sampler = make(backend)
    sampler.start()
    try:
        assert sampler.wait_ready(5)
        backend.lost.add(1)
        assert wait_for(lambda: not sampler.latest().gpu(1).up)
        reads_before = list(backend.reads)
        assert wait_for(lambda: backend.reads[0] > reads_before[0] + 3)
        snapshot = sampler.latest()
        assert snapshot.gpu(0).up and snapshot.gpu(2).up
        assert snapshot.gpu(1).values == {}  # no stale numbers for a lost GPU
        assert snapshot.gpu(1).last_success > 0
        # Backoff: far fewer recovery attempts than ticks.
        time.sleep(0.5)
        assert backend.recover_calls[1] < 4
        backend.lost.discard(1)
        assert wait_for(lambda: sampler.latest().gpu(1).up, timeout=10)
    finally:
        sampler.stop()


def test_hung_gpu_does_not_stall_the_others_and_turns_down_after_timeout():
    backend = ScriptedBackend(2)
    sampler = make(backend, interval=0.1, timeout=0.3)
    sampler.start()
    try:
        assert sampler.wait_ready(5)
        release = threading.Event()
        backend.hang[1] = release
        assert wait_for(lambda: not sampler.latest().gpu(1).up)
        before = backend.reads[0]
        assert wait_for(lambda: backend.reads[0] > before + 3)
        assert sampler.latest().gpu(0).up
        assert sampler.stats().overruns > 0
        del backend.hang[1]
        release.set()
        assert wait_for(lambda: sampler.latest().gpu(1).up)
    finally:
        release.set()
        sampler.stop()


def test_gpu_hung_from_the_start_does_not_block_readiness():
    backend = ScriptedBackend(2)
    release = threading.Event()
    backend.hang[0] = release
    sampler = make(backend, interval=0.1, timeout=0.3)
    sampler.start()
    try:
        assert sampler.wait_ready(5)
        snapshot = sampler.latest()
        assert not snapshot.gpu(0).up and snapshot.gpu(1).up
    finally:
        release.set()
        sampler.stop()


def test_listeners_get_each_fresh_sample_once_and_processes_are_resolved():
    backend = ScriptedBackend(1)
    seen = []
    resolved = []

    def resolve(identity, readings):
        resolved.append((identity.index, readings))
        return ("resolved",)

    sampler = make(backend, on_sample=[seen.append], resolve_processes=resolve)
    sampler.start()
    try:
        assert wait_for(lambda: len(seen) >= 3)
    finally:
        sampler.stop()
    timestamps = [s.timestamp for s in seen]
    assert timestamps == sorted(set(timestamps))  # strictly increasing: no sample delivered twice
    assert seen[0].processes == ("resolved",)


def test_a_bug_in_a_listener_does_not_stop_sampling():
    backend = ScriptedBackend(1)

    def broken(_sample):
        raise RuntimeError("listener bug")

    sampler = make(backend, on_sample=[broken])
    sampler.start()
    try:
        assert wait_for(lambda: sampler.stats().ticks >= 3)
    finally:
        sampler.stop()


@pytest.mark.parametrize("exc", [RuntimeError("driver said something odd")])
def test_unexpected_read_error_marks_down_but_worker_survives(exc):
    backend = ScriptedBackend(1)
    calls = {"n": 0}
    original = backend.read

    def flaky(index):
        calls["n"] += 1
        if calls["n"] == 3:
            raise exc
        return original(index)

    backend.read = flaky
    sampler = make(backend)
    sampler.start()
    try:
        assert wait_for(lambda: calls["n"] >= 6)
        assert wait_for(lambda: sampler.latest().gpu(0).up)
    finally:
        sampler.stop()
