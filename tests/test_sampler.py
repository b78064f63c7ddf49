"""The sampler against a scripted backend and the fake NVML: isolation of lost and hung GPUs,
which thread reads what, readiness, staleness."""

from __future__ import annotations

import random
import threading
import time

import pytest

from gpuphase.agent.backends import GpuLost
from gpuphase.agent.backends.nvml import NvmlBackend
from gpuphase.agent.sampler import Sampler
from gpuphase.model.snapshot import GpuIdentity, GpuReading, ProcessReading
from tests.fakenvml import FakeNvml


class ScriptedBackend:
    name = "scripted"

    def __init__(self, gpus: int = 3):
        self.identities = [GpuIdentity(i, f"GPU-{i}", "Test GPU") for i in range(gpus)]
        self.lost: set[int] = set()
        self.hang: dict[int, threading.Event] = {}
        self.reads = [0] * gpus
        self.recover_calls = [0] * gpus
        self.calls: list[tuple[int, str]] = []  # (GPU, reading thread) of every read, in call order

    def discover(self):
        return list(self.identities)

    def read(self, index):
        self.calls.append((index, threading.current_thread().name))
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


def ticks_reading(sampler, backend, ticks):
    """Drive `ticks` ticks by hand; the (GPU, thread) of each read each one made."""
    rounds = []
    for _ in range(ticks):
        before = len(backend.calls)
        sampler.tick()
        rounds.append(backend.calls[before:])
    return rounds


def test_one_reader_thread_reads_every_gpu_in_turn():
    backend = ScriptedBackend(4)
    sampler = make(backend, interval=1.0, timeout=5.0)
    sampler.start(run_loop=False)
    try:
        rounds = ticks_reading(sampler, backend, 5)
    finally:
        sampler.stop()
    assert all([index for index, _thread in calls] == [0, 1, 2, 3] for calls in rounds), rounds
    threads = {thread for calls in rounds for _index, thread in calls}
    assert len(threads) == 1 and threading.current_thread().name not in threads, threads


def test_gpus_queued_behind_a_hung_one_move_to_another_reader_and_it_is_read_last_after():
    backend = ScriptedBackend(4)
    release = threading.Event()
    backend.hang[1] = release
    sampler = make(backend, interval=1.0, timeout=2.0)
    sampler.start(run_loop=False)
    try:
        first = ticks_reading(sampler, backend, 1)[0]
        assert [index for index, _thread in first] == [0, 1, 2, 3]
        stuck = first[1][1]
        assert first[0][1] == stuck and {thread for _index, thread in first[2:]} - {stuck}, first
        snapshot = sampler.latest()
        assert [s.up for s in snapshot.gpus] == [True, False, True, True]

        # While GPU 1 is stuck in its call it is not queued again; the others are read every tick.
        for _ in range(3):
            previous = sampler.latest()
            [calls] = ticks_reading(sampler, backend, 1)
            assert [index for index, _thread in calls] == [0, 2, 3]
            assert all(sampler.latest().gpu(index).timestamp > previous.gpu(index).timestamp for index in (0, 2, 3))
        assert sampler.stats().overruns == 3

        del backend.hang[1]
        release.set()
        assert wait_for(lambda: backend.reads[1] == 1)  # the hung call returned on its own thread
        after = ticks_reading(sampler, backend, 2)
        assert [index for index, _thread in after[0]] == [0, 2, 3, 1], "the GPU that overran goes last"
        assert [index for index, _thread in after[1]] == [0, 1, 2, 3], "and back in turn once it is quick"
        assert sampler.latest().gpu(1).up
        # The reader that was stuck serves again: no thread was started after the hang.
        readers = {thread for _index, thread in backend.calls}
        assert len(readers) == 2, readers
    finally:
        release.set()
        sampler.stop()


@pytest.fixture
def fake(fake_nvml_library, tmp_path):
    with FakeNvml(fake_nvml_library, tmp_path).activate() as fake:
        fake.control(gpus=4)
        yield fake


def test_gpu_hung_in_nvml_leaves_the_others_fresh_every_tick_and_comes_back(fake):
    backend = NvmlBackend(event_wait_ms=50)
    sampler = Sampler(backend, interval=0.5, timeout=1.0)
    sampler.start(run_loop=False)
    healthy = (0, 2, 3)
    try:
        sampler.tick()
        fake.control({"gpu1.hang.nvmlDeviceGetFieldValues": 300})  # far longer than the test
        calls = fake.call_count("nvmlDeviceGetFieldValues")
        previous = sampler.tick()
        assert fake.call_count("nvmlDeviceGetFieldValues") == calls + 4  # GPU 1 is inside its call
        ticks, give_up = 0, time.monotonic() + 60
        while previous.gpu(1).up:  # until its reading is older than sample.timeout
            assert time.monotonic() < give_up, "the hung GPU never turned down"
            time.sleep(0.05)
            snapshot = sampler.tick()
            for index in healthy:
                assert snapshot.gpu(index).up and snapshot.gpu(index).timestamp > previous.gpu(index).timestamp
            previous = snapshot
            ticks += 1
        assert previous.gpu(1).values == {} and previous.complete
        # Still inside the first call: it was never asked again.
        assert fake.call_count("nvmlDeviceGetFieldValues") == calls + 4 + 3 * ticks

        fake.control({"gpu1.hang.nvmlDeviceGetFieldValues": None})
        assert wait_for(lambda: sampler.tick().gpu(1).up)
        assert all(sampler.latest().gpu(index).up for index in healthy)
    finally:
        fake.control({"gpu1.hang.nvmlDeviceGetFieldValues": None})
        sampler.stop()
        backend.close()


class RandomlySlowBackend(ScriptedBackend):
    """Each read sleeps a random 0-30 ms, sometimes 100 ms or more (an overrun); records any GPU read
    by two threads at once."""

    def __init__(self, gpus, seed):
        super().__init__(gpus)
        self.random = random.Random(seed)
        self.inside: set[int] = set()
        self.overlaps: list[int] = []
        self.guard = threading.Lock()

    def read(self, index):
        with self.guard:
            if index in self.inside:
                self.overlaps.append(index)
            self.inside.add(index)
            delay = self.random.choice([0.0, 0.0, 0.001, 0.005, 0.03, 0.12, 0.25])
        try:
            time.sleep(delay)
            return super().read(index)
        finally:
            with self.guard:
                self.inside.discard(index)


def test_overrunning_readings_never_overlap_on_one_gpu_and_readers_stay_few():
    backend = RandomlySlowBackend(4, seed=7)
    sampler = make(backend, interval=0.1, timeout=0.5)
    sampler.start(run_loop=False)
    try:
        for _ in range(60):
            sampler.tick()
        readers = {thread for _index, thread in backend.calls}
        backend.random = random.Random(0)
        backend.random.choice = lambda options: 0.0  # quick from now on
        assert wait_for(lambda: all(s.up for s in sampler.tick().gpus))
    finally:
        sampler.stop()
    assert backend.overlaps == []
    assert sampler.stats().overruns > 0  # the test did make readings overrun
    # One reader per GPU stuck at once, plus one; a reader slow to wake on a busy machine can add
    # one more now and then. A thread per overrun (60 ticks of them) would be far more.
    assert 1 < len(readers) <= 2 * len(backend.identities), readers
