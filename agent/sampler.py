"""The sampling loop: reads every GPU each tick and publishes an immutable Snapshot.

Why one worker thread per GPU: NVML calls can hang (a GPU falling off the bus, a driver in
trouble). With a thread per GPU a hung call stalls only that GPU; the tick still publishes on
time with the other GPUs' fresh readings, and the hung GPU turns `gpu_up 0` once its reading is
older than `sample.timeout`. ctypes releases the GIL during the NVML call, so a hang costs nothing.
The workers are started one after another rather than all at once (HANDOFF_WAIT): readers running
together mostly fight over the GIL, which each ctypes call releases and takes back (measured by
benchmarks/sampling.py, see docs/performance.md).

Why readings are resolved and published on the tick thread: process-label resolution and the
subscribers (phase accountant, span mapper) then see one thread only, in tick order.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from agent.backends import Backend, GpuLost
from agent.snapshot import GpuIdentity, GpuReading, GpuSample, Snapshot
from agent.view import SamplerStats

log = logging.getLogger(__name__)

# A lost GPU is retried after 1, 2, 4 ... seconds, at most once a minute.
BACKOFF_START = 1.0
BACKOFF_MAX = 60.0
# The tick starts the GPUs' readings one after another; a reading that takes longer than this
# (seconds) no longer delays the next GPU's (see Sampler.tick).
HANDOFF_WAIT = 0.05


@dataclass
class _Result:
    """The newest outcome of one GPU's worker (mutable, owned by the worker; read under the lock)."""

    reading: GpuReading | None = None
    completed_at: float = 0.0  # wall clock when the reading finished
    error: str = ""  # "lost", "failed", or "" for a good reading
    seq: int = 0  # increments per completed attempt so the tick can tell fresh from stale


class _GpuWorker:
    """Reads one GPU whenever the tick asks; recovers a lost GPU with exponential backoff."""

    def __init__(self, backend: Backend, identity: GpuIdentity, clock: Callable[[], float],
                 finished: threading.Condition):
        self.identity = identity
        self._finished = finished  # notified after every attempt, so the tick waits without polling
        self._backend = backend
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._busy_since: float | None = None
        self._result = _Result()
        self._lost = False
        self._next_recovery = 0.0
        self._backoff = BACKOFF_START
        self._thread = threading.Thread(target=self._run, name=f"gpu{identity.index}-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def request(self) -> bool:
        """Ask for a reading. False if the previous one is still running (an overrun)."""
        with self._lock:
            if self._busy_since is not None:
                return False
            self._busy_since = time.monotonic()
        self._wake.set()
        return True

    def busy(self) -> bool:
        with self._lock:
            return self._busy_since is not None

    def busy_for(self) -> float:
        """Seconds the current reading has been running (monotonic: hang detection must not depend
        on the wall clock, which can jump); 0 when idle."""
        with self._lock:
            return 0.0 if self._busy_since is None else time.monotonic() - self._busy_since

    def result(self) -> _Result:
        with self._lock:
            return self._result

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                return
            reading, error = self._attempt()
            with self._lock:
                self._result = _Result(reading, self._clock(), error, self._result.seq + 1)
                self._busy_since = None
            with self._finished:
                self._finished.notify_all()

    def _attempt(self) -> tuple[GpuReading | None, str]:
        index = self.identity.index
        if self._lost:
            if self._clock() < self._next_recovery:
                return None, "lost"
            try:
                self.identity = self._backend.recover(index)
            except GpuLost:
                self._next_recovery = self._clock() + self._backoff
                self._backoff = min(self._backoff * 2, BACKOFF_MAX)
                return None, "lost"
            except Exception:  # a bug or an odd driver state must not kill the worker
                log.exception("recovering GPU %d failed", index)
                return None, "lost"
            log.warning("GPU %d (%s) is back", index, self.identity.uuid)
            self._lost = False
            self._backoff = BACKOFF_START
        try:
            return self._backend.read(index), ""
        except GpuLost as err:
            log.error("GPU %d (%s) lost: %s; retrying with backoff", index, self.identity.uuid, err)
            self._lost = True
            self._next_recovery = self._clock() + self._backoff
            return None, "lost"
        except Exception:
            log.exception("reading GPU %d failed", index)
            return None, "failed"


def _notify(listeners, item) -> None:
    """Call each listener; one that raises is logged and the others (and the tick) go on."""
    for listener in listeners:
        try:
            listener(item)
        except Exception:
            log.exception("sample listener %r failed", listener)


SampleListener = Callable[[GpuSample], None]
SnapshotListener = Callable[[Snapshot], None]


class Sampler:
    """Owns the tick. `latest()` is what a scrape renders; listeners get every fresh sample."""

    def __init__(
        self,
        backend: Backend,
        interval: float,
        timeout: float,
        resolve_processes: Callable[[GpuIdentity, Sequence], tuple] | None = None,
        on_sample: Sequence[SampleListener] = (),
        on_snapshot: Sequence[SnapshotListener] = (),
        clock: Callable[[], float] = time.time,
    ):
        self._backend = backend
        self._interval = interval
        self._timeout = timeout
        self._resolve = resolve_processes
        self._on_sample = list(on_sample)
        self._on_snapshot = list(on_snapshot)
        self._clock = clock
        self._workers: list[_GpuWorker] = []
        self._seen_seq: dict[int, int] = {}
        self._last_good: dict[int, GpuSample] = {}
        self._latest: Snapshot | None = None
        self._ticks = 0
        self._overruns = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._finished = threading.Condition()

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, run_loop: bool = True) -> list[GpuIdentity]:
        """Discover GPUs (raises BackendUnavailable) and start sampling in the background.

        run_loop=False starts only the GPU workers: the caller drives `tick()` itself (golden files
        and benchmarks, where time must be under the caller's control).
        """
        identities = self._backend.discover()
        self._workers = [_GpuWorker(self._backend, identity, self._clock, self._finished) for identity in identities]
        for worker in self._workers:
            worker.start()
        if run_loop:
            self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)
            self._thread.start()
        return identities

    def stop(self) -> None:
        self._stop.set()
        with self._finished:
            self._finished.notify_all()
        for worker in self._workers:
            worker.stop()
        if self._thread:
            self._thread.join(timeout=self._interval + 1)

    # -- reads -----------------------------------------------------------------------------------
    def latest(self) -> Snapshot | None:
        return self._latest

    def ready(self) -> bool:
        """True once every GPU has been read (or found lost) at least once."""
        return self._ready.is_set()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def stats(self) -> SamplerStats:
        latest = self._latest
        return SamplerStats(self._ticks, self._overruns, latest.tick_duration_seconds if latest else 0.0)

    # -- the tick --------------------------------------------------------------------------------
    def _loop(self) -> None:
        next_tick = time.monotonic()
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the loop must survive anything a listener does
                log.exception("sampling tick failed")
            # Fixed-rate schedule: no drift; after a long stall, skip missed ticks instead of bursting.
            next_tick += self._interval
            now = time.monotonic()
            if next_tick < now:
                next_tick = now + self._interval
            self._stop.wait(next_tick - now)

    def tick(self) -> Snapshot:
        """One round: ask every idle worker for a reading, wait for them within the interval, publish."""
        started = time.monotonic()
        deadline = started + self._interval * 0.8
        handoff = min(HANDOFF_WAIT, self._interval * 0.8 / max(1, len(self._workers)))
        requested = []
        for worker in self._workers:
            if not worker.request():
                continue
            requested.append(worker)
            # One GPU at a time: eight workers in NVML at once contend for the GIL at every ctypes
            # call, which cost more CPU than the readings themselves. A GPU slower than the hand-off
            # wait (a hung one) no longer holds up the next: from then on they overlap.
            self._wait_for(lambda: not worker.busy(), min(deadline, time.monotonic() + handoff))
        if len(requested) < len(self._workers):
            self._overruns += 1
        self._wait_for(lambda: not any(w.busy() for w in requested), deadline)
        now = self._clock()
        samples = tuple(self._sample_for(worker, now) for worker in self._workers)
        # Complete once every GPU has answered or been given up on: a GPU hung at start-up must
        # not keep the agent unready forever (it shows as gpu_up 0 instead).
        complete = all(
            worker.identity.index in self._seen_seq or worker.busy_for() > self._timeout
            for worker in self._workers
        )
        snapshot = Snapshot(now, samples, complete, time.monotonic() - started)
        self._latest = snapshot
        self._ticks += 1
        if complete:
            self._ready.set()
        _notify(self._on_snapshot, snapshot)
        return snapshot

    def _wait_for(self, done: Callable[[], bool], deadline: float) -> None:
        """Until done() (checked whenever a worker finishes), stop(), or the monotonic deadline."""
        with self._finished:
            self._finished.wait_for(lambda: self._stop.is_set() or done(),
                                    timeout=max(0.0, deadline - time.monotonic()))

    def _sample_for(self, worker: _GpuWorker, now: float) -> GpuSample:
        index = worker.identity.index
        result = worker.result()
        fresh = result.seq != self._seen_seq.get(index, 0) if result.seq else False
        if fresh:
            self._seen_seq[index] = result.seq
            if result.reading is not None:
                sample = self._to_sample(worker.identity, result)
                self._last_good[index] = sample
                _notify(self._on_sample, sample)
                return sample
        last_good = self._last_good.get(index)
        hung = worker.busy_for() > self._timeout
        if result.error or hung or last_good is None:
            return GpuSample(worker.identity, up=False, timestamp=now,
                             last_success=last_good.last_success if last_good else 0.0)
        return last_good  # slow but within sample.timeout: the previous reading stands

    def _to_sample(self, identity: GpuIdentity, result: _Result) -> GpuSample:
        reading = result.reading
        processes = self._resolve(identity, reading.processes) if self._resolve and reading.processes else ()
        return GpuSample(
            identity=identity,
            up=True,
            timestamp=result.completed_at,
            values=reading.values,
            labelled=reading.labelled,
            processes=processes,
            mig=reading.mig,
            last_success=result.completed_at,
        )
