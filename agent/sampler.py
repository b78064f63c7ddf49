"""The sampling loop: reads every GPU each tick and publishes an immutable Snapshot.

Why the GPUs are read one after another on one reader thread: a thread hand-off costs about as
much CPU as reading a GPU through NVML, so there is one per tick rather than one per GPU; and
readers running at once mostly fight over the GIL, which each ctypes call releases and takes back
(figures in docs/design-figures.md).

Why a slow reading moves the other GPUs to another thread: NVML calls can hang (a GPU falling off
the bus, a driver in trouble). When the reading in progress has run longer than OVERRUN_WAIT, the
tick leaves that reader blocked in NVML and hands the GPUs still queued to another reader (an idle
one, or a new thread). A hung GPU so keeps a thread of its own until its call returns; it is not
queued again meanwhile, and once its reading is older than `sample.timeout` it shows `gpu_up 0`.
The reader that was stuck then takes from the queue again or waits with the others, so there are
about as many readers as GPUs ever hung at once, plus one. ctypes releases the GIL during the NVML
call, so a hang costs nothing. A GPU whose last reading overran is read after the others.

Why samples are published on the tick thread: the subscribers (phase accountant, span mapper)
then see one thread only, in tick order. The reader makes each reading into its sample, process
labels included (ProcessResolver is thread-safe), right after reading it, while its objects are
still in the reader's CPU cache.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from queue import Empty, SimpleQueue
from typing import Callable, NamedTuple, Sequence

from gpuphase.agent.backends import Backend, GpuLost
from gpuphase.model.snapshot import GpuIdentity, GpuReading, GpuSample, Snapshot
from gpuphase.model.view import SamplerStats

log = logging.getLogger(__name__)

# A lost GPU is retried after 1, 2, 4 ... seconds, at most once a minute.
BACKOFF_START = 1.0
BACKOFF_MAX = 60.0
# A GPU reading that takes longer than this (seconds; less when the interval is short, see
# Sampler.tick) no longer delays the GPUs queued after it: they move to another reader thread.
OVERRUN_WAIT = 0.05


class _Result(NamedTuple):
    """The newest outcome of one GPU's reading (replaced whole: a tuple, the cheapest to build)."""

    sample: GpuSample | None = None  # the good reading, as published
    error: str = ""  # "lost", "failed", or "" for a good reading
    seq: int = 0  # increments per completed attempt so the tick can tell fresh from stale


class _Gpu:
    """One GPU's reading state; recovers a lost GPU with exponential backoff.

    The tick sets `pending` and queues the GPU; the reader that takes it sets `started`, then
    `result`, `slow`, and clears `started` and `pending`, in that order: the tick reads them
    without a lock (each is one reference) and a result it sees with `pending` clear is the
    newest. `attempt()` so runs on one reader at a time: a GPU is not queued again while pending.
    """

    def __init__(self, backend: Backend, identity: GpuIdentity, clock: Callable[[], float],
                 to_sample: Callable[[GpuIdentity, GpuReading, float], GpuSample]):
        self.identity = identity
        self._backend = backend
        self._clock = clock
        self._to_sample = to_sample
        self.pending = False  # queued or being read
        # Monotonic start of the reading in progress (hang detection must not depend on the wall
        # clock, which can jump).
        self.started: float | None = None
        self.slow = False  # the last reading overran: queue it after the others
        self.result = _Result()
        # The tick's own: the newest result it has taken, and the newest good sample.
        self.seen_seq = 0
        self.last_good: GpuSample | None = None
        self._lost = False
        self._next_recovery = 0.0
        self._backoff = BACKOFF_START

    def read(self) -> None:
        """One attempt, made into its sample (see the module's docstring for why here)."""
        reading, error = self.attempt()
        sample = None
        if reading is not None:
            try:
                sample = self._to_sample(self.identity, reading, self._clock())
            except Exception:  # a bug labelling processes must not kill the reader
                log.exception("making the sample of GPU %d failed", self.identity.index)
                error = "failed"
        self.result = _Result(sample, error, self.result.seq + 1)

    def attempt(self) -> tuple[GpuReading | None, str]:
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
            except Exception:  # a bug or an odd driver state must not kill the reader
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


class _Readers:
    """The reader threads and the queue of GPUs they read, one GPU at a time each.

    Normally one reader is awake per tick and reads every queued GPU. The tick itself watches for
    overruns (it waits with a timeout; readers do not report each GPU), so a tick in which nothing
    is slow costs one wake-up of a reader and one of the tick. There is no lock: the queue and the
    idle list are deques, whose appends and pops are atomic, wake-ups go through SimpleQueues (in
    C, one lock each), and a reader owns a GPU's fields while it is taken (see _Gpu). A race costs
    at most a wasted wake-up or one more reader thread, never a GPU read twice at once or a lost
    GPU. Not threading.Condition: its woken side wakes again for the lock the waker still holds.
    """

    def __init__(self) -> None:
        self._queue: deque[_Gpu] = deque()
        self._gpus: Sequence[_Gpu] = ()
        self._idle: deque[SimpleQueue[None]] = deque()  # the wake-up queues of readers with nothing to do
        self._woken_at: float | None = None  # when a reader was last woken or started, until one takes a GPU
        self._threads = 0
        self._overrun_wait = OVERRUN_WAIT
        self._stopped = False
        self._done: SimpleQueue[None] = SimpleQueue()  # "the queue may be read": the tick looks again

    def read(self, gpus: Sequence[_Gpu], deadline: float, overrun_wait: float) -> int:
        """Queue every GPU not still pending from an earlier tick (those that last overran at the end)
        and wait until the queue is read or the monotonic deadline. Returns how many GPUs were still
        pending. Called by one thread at a time (the tick).

        Kept short: it runs first after the tick's sleep, when every line costs several times what
        it costs warm."""
        if not self._done.empty():  # left by a reader that finished after the previous tick
            while not self._done.empty():
                self._done.get_nowait()
        self._gpus, self._overrun_wait = gpus, overrun_wait
        requested = [gpu for gpu in gpus if not gpu.pending]
        if len(requested) < len(gpus) or any(gpu.slow for gpu in requested):
            requested.sort(key=_slow_last)
        for gpu in requested:
            gpu.pending = True
        self._queue.extend(requested)
        self._wait(requested, deadline, in_flight=len(requested) < len(gpus))
        return len(gpus) - len(requested)

    def stop(self) -> None:
        self._stopped = True
        while self._idle:
            self._idle.popleft().put(None)
        self._done.put(None)

    def _wait(self, requested: Sequence[_Gpu], deadline: float, in_flight: bool) -> None:
        """Until the queue is empty and the requested GPUs are read, stop(), or the deadline; hands
        the queue to another reader whenever no reader is moving it on: none started a GPU, or was
        woken, in the last overrun wait. `in_flight`: some GPU may be being read."""
        wait = self._overrun_wait
        while not self._stopped:
            queued = bool(self._queue)
            if not queued and not any(gpu.pending for gpu in requested):
                return
            now = time.monotonic()
            if now >= deadline:
                return
            wake, wake_reader = deadline, False
            if queued:
                last = self._woken_at
                if in_flight and (last is None or now - last >= wait):
                    starts = [started for started in (gpu.started for gpu in self._gpus) if started is not None]
                    if starts and (last is None or max(starts) > last):
                        last = max(starts)
                if last is None or now - last >= wait:
                    wake_reader, last = True, now
                wake = min(wake, last + wait)
            in_flight = True
            if wake_reader:  # just before get(), where this thread lets go of the GIL the reader needs
                self._wake_reader(now)
            try:
                self._done.get(timeout=wake - now)
            except Empty:
                pass

    def _wake_reader(self, now: float) -> None:
        self._woken_at = now
        try:
            self._idle.pop().put(None)  # the reader idle for the shortest time: its memory is warmest
        except IndexError:
            self._threads += 1
            threading.Thread(target=self._run, name=f"gpu-reader-{self._threads}", daemon=True).start()

    def _run(self) -> None:
        wake_up: SimpleQueue[None] = SimpleQueue()
        queue = self._queue
        has_read = False  # since it last waited
        while not self._stopped:
            try:
                gpu = queue.popleft()
            except IndexError:
                # Idle before the tick hears that the queue is read: a tick that follows at once
                # then finds this reader idle instead of starting another.
                self._idle.append(wake_up)
                self._woken_at = None  # whoever was woken for the queue will find it read
                if self._stopped:  # stop() may have woken the idle readers before this one was one
                    return
                if has_read:
                    has_read = False
                    # Perhaps the last GPU the tick waits for. Told just before this thread lets
                    # go of the GIL (in get()), which the woken tick then needs.
                    self._done.put(None)
                wake_up.get()  # a wake-up is only a hint to look at the queue again
                continue
            gpu.started = started = time.monotonic()
            self._woken_at = None
            gpu.read()
            gpu.slow = time.monotonic() - started > self._overrun_wait
            gpu.started = None
            gpu.pending = False
            has_read = True


def _slow_last(gpu: _Gpu) -> bool:
    return gpu.slow


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
        self._gpus: list[_Gpu] = []
        self._readers = _Readers()
        self._latest: Snapshot | None = None
        self._ticks = 0
        self._overruns = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, run_loop: bool = True) -> list[GpuIdentity]:
        """Discover GPUs (raises BackendUnavailable) and start sampling in the background.

        run_loop=False only discovers: the caller drives `tick()` itself (golden files and
        benchmarks, where time must be under the caller's control).
        """
        identities = self._backend.discover()
        self._gpus = [_Gpu(self._backend, identity, self._clock, self._to_sample) for identity in identities]
        if run_loop:
            self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)
            self._thread.start()
        return identities

    def stop(self) -> None:
        self._stop.set()
        self._readers.stop()
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
        """One round: read every GPU that is not still busy, within 80% of the interval, and publish."""
        started = time.monotonic()
        budget = self._interval * 0.8
        # However many GPUs are slow, each of them starts within the budget.
        overrun_wait = min(OVERRUN_WAIT, budget / max(1, len(self._gpus)))
        if self._readers.read(self._gpus, started + budget, overrun_wait):
            self._overruns += 1
        now, now_monotonic = self._clock(), time.monotonic()
        samples = []
        # Complete once every GPU has answered or been given up on: a GPU hung at start-up must
        # not keep the agent unready forever (it shows as gpu_up 0 instead).
        complete = True
        for gpu in self._gpus:
            reading_started = gpu.started  # read before the result, which may then be newer
            busy_for = 0.0 if reading_started is None else now_monotonic - reading_started
            samples.append(self._sample_for(gpu, busy_for, now))
            if complete and not gpu.seen_seq and busy_for <= self._timeout:
                complete = False
        snapshot = Snapshot(now, tuple(samples), complete, time.monotonic() - started)
        self._latest = snapshot
        self._ticks += 1
        if complete and not self._ready.is_set():
            self._ready.set()
        _notify(self._on_snapshot, snapshot)
        return snapshot

    def _sample_for(self, gpu: _Gpu, busy_for: float, now: float) -> GpuSample:
        result = gpu.result
        if result.seq != gpu.seen_seq:  # a fresh result
            gpu.seen_seq = result.seq
            sample = result.sample
            if sample is not None:
                gpu.last_good = sample
                if self._on_sample:
                    _notify(self._on_sample, sample)
                return sample
        last_good = gpu.last_good
        if result.error or busy_for > self._timeout or last_good is None:
            return GpuSample(gpu.identity, up=False, timestamp=now,
                             last_success=last_good.last_success if last_good else 0.0)
        return last_good  # slow but within sample.timeout: the previous reading stands

    def _to_sample(self, identity: GpuIdentity, reading: GpuReading, completed_at: float) -> GpuSample:
        """A good reading as published; runs on a reader (see _Gpu.read)."""
        processes = self._resolve(identity, reading.processes) if self._resolve and reading.processes else ()
        return GpuSample(identity, True, completed_at, reading.values, reading.labelled, processes, reading.mig,
                         completed_at)
