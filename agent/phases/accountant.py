"""PhaseAccountant: the thread-safe front of the ledgers, the window stores and the service bound."""

from __future__ import annotations

import math
import threading
from collections import Counter, deque
from typing import Iterable, Sequence

from gpuphase.agent.phases.ledger import GpuLedger, Reading
from gpuphase.agent.phases.services import OTHER_SERVICE, ServiceLabels
from gpuphase.agent.phases.store import INVALID_WINDOW, TOO_NEW, TOO_OLD, WindowStore
from gpuphase.model.durations import MIN_SAMPLE_INTERVAL
from gpuphase.model.phase import WORK_PHASES, GpuKey, PhaseWindow
from gpuphase.model.snapshot import GpuSample
from gpuphase.model.view import PhaseSeries

__all__ = ["DEFAULT_MAX_WINDOWS_PER_GPU", "DEFAULT_SERVICE_TTL", "OTHER_SERVICE", "PhaseAccountant"]

# Held windows per GPU: enough for a tensor-parallel service at thousands of spans a second over
# the default settle, small enough that a flood of disjoint windows stays within tens of MiB per
# GPU (docs/design-figures.md).
DEFAULT_MAX_WINDOWS_PER_GPU = 300_000
# A service label slot unused this long (no window ending later) may be given to another service;
# never less than retention + settle, after which all of a service's windows are counted.
DEFAULT_SERVICE_TTL = 3600.0
_INF, _NEG_INF = math.inf, -math.inf


class PhaseAccountant:
    """Cumulative phase totals per (GPU, service, phase), fed by the sampler and the span worker.

    Threads: the sampler calls add_sample() (which never waits for the lock), the accounting
    thread set_mapping()/advance(), the span worker place(), scrapes series()/last_span()/
    rejected(). One lock, held for bounded work; series() returns a tuple rebuilt only when totals
    changed, so a scrape never recomputes history.
    """

    def __init__(self, settle: float, retention: float, max_services: int,
                 max_windows_per_gpu: int = DEFAULT_MAX_WINDOWS_PER_GPU,
                 service_ttl: float = DEFAULT_SERVICE_TTL) -> None:
        if retention <= settle:
            raise ValueError("retention must be longer than settle")
        if max_services < 1:
            raise ValueError("max_services must be at least 1")
        self._settle = settle
        self._retention = retention
        # After retention + settle past its last window's end, a service has nothing held (see
        # ServiceLabels): its series can go without being made again by a late count.
        self._service_hold = retention + settle
        self._labels = ServiceLabels(max_services, max(service_ttl, self._service_hold))
        self._max_windows = max_windows_per_gpu
        self._max_samples = int(retention / MIN_SAMPLE_INTERVAL) + 2
        self._lock = threading.Lock()
        self._incoming: deque[tuple[GpuKey, Reading]] = deque()  # see add_sample()
        self._ledgers: dict[GpuKey, GpuLedger] = {}
        self._stores: dict[tuple[GpuKey, ...], WindowStore] = {}  # by placement (see WindowStore)
        self._now = -math.inf
        self._rejected: Counter[str] = Counter()
        self._clipped = 0
        self._last_span: dict[tuple[int, str, str], float] = {}
        self._series: tuple[PhaseSeries, ...] = ()
        self._dirty = False

    # --- inputs --------------------------------------------------------------------------------

    def add_sample(self, sample: GpuSample) -> None:
        """One GPU's reading of one tick. Readings of a GPU that did not answer are skipped: the
        next good reading's interval then spans the gap (its energy delta covers it exactly)."""
        if not sample.up:
            return
        # Queued without taking the lock: the tick thread calls this and must never wait behind
        # a long place() or advance(). advance() files the queue first; so does the next
        # add_sample() when the lock happens to be free, which keeps the queue short.
        self._incoming.append(((sample.identity.index, sample.identity.uuid), Reading.of(sample)))
        if self._lock.acquire(blocking=False):
            try:
                self._file_incoming()
            finally:
                self._lock.release()

    def set_mapping(self, gpu_key: GpuKey, services: Iterable[str]) -> None:
        """The services configured for a GPU (phase.map); its idle time is theirs. Configured
        services always keep their own label value (they take none of the max_services slots)."""
        with self._lock:
            ledger = self._ledger(gpu_key)
            ledger.configured_services = tuple(dict.fromkeys(services))
            for service in ledger.configured_services:
                self._labels.configure(service)
                self._dirty |= ledger.ensure_series(service)

    def mark_mapped(self, services: Iterable[str]) -> None:
        """The services the mapper placed by entitlement (phase.map, pid, pod) in the batch about to
        be placed: their label slots have priority over those of services placed on a trusted GPU
        claim only. SpanMapper's on_mapped; each call replaces the last."""
        with self._lock:
            self._labels.entitled = frozenset(services)

    def place(self, gpus: Sequence[GpuKey], windows: Iterable[PhaseWindow]) -> None:
        """Windows the mapper put on these GPUs (one, or a tensor-parallel group: each GPU gets
        every window). Refusals are counted by reason and per GPU (see rejected())."""
        with self._lock:
            store = self._store(tuple(dict.fromkeys(gpus)))
            members = store.members
            boundary = store.boundary()
            room = self._max_windows - max(member.held() for member in members)
            earliest: dict[str, float] = {}  # service -> start of its earliest window held now
            newest: dict[str, float] = {}  # service -> end of its newest window held now
            # The bounds a window must lie within (see _screen); before the first advance() there
            # is no "now" to compare with.
            oldest_end = self._now - self._retention if self._now > -math.inf else -math.inf
            latest_start = self._now + self._retention if self._now > -math.inf else math.inf
            labels, now = self._labels, self._now
            for window in windows:
                service = labels.label(window.service, now)
                start, end = window.start, window.end
                # One chained comparison for the usual window (NaN fails it too); _screen says why not.
                if _NEG_INF < start <= end < _INF and oldest_end <= end and start <= latest_start \
                        and window.phase in WORK_PHASES:
                    held_from = store.hold(window, service, boundary, room > 0)
                else:
                    held_from = self._screen(window)
                if isinstance(held_from, str):
                    self._rejected[held_from] += len(members)
                    continue
                room -= 1
                evicted = labels.use(service, window.end, now)
                if evicted is not None and evicted[1]:  # an expired slot: nothing of it is held
                    self._drop_service(evicted[0])
                if held_from > window.start:
                    self._clipped += len(members)
                if held_from < earliest.get(service, math.inf):
                    earliest[service] = held_from
                if window.end > newest.get(service, -math.inf):
                    newest[service] = window.end
            for member in members:
                index, uuid = member.key
                for service, since in earliest.items():
                    if member.learn(service, since):
                        self._dirty |= member.ensure_series(service)
                for service, end in newest.items():
                    label = (index, uuid, service)
                    self._last_span[label] = max(self._last_span.get(label, -math.inf), end)

    def add_windows(self, gpu_key: GpuKey, windows: Iterable[PhaseWindow]) -> None:
        """Windows the mapper tied to one GPU: place() with a group of one."""
        self.place((gpu_key,), windows)

    def advance(self, now: float) -> None:
        """Finalise everything older than now - settle. A clock that steps back is held, not followed."""
        with self._lock:
            self._file_incoming()
            self._now = max(self._now, now)
            cutoff = self._now - self._settle
            for ledger in self._ledgers.values():
                self._dirty |= ledger.finalise(cutoff, self._now, self._retention)
            for service in self._labels.retire_due(self._now, self._service_hold):
                self._drop_service(service)
            for gpus, store in list(self._stores.items()):
                store.forget()
                if store.empty():  # placements come and go (pids); an empty one costs nothing to remake
                    del self._stores[gpus]
                    for member in store.members:
                        member.stores.remove(store)

    # --- outputs -------------------------------------------------------------------------------

    def series(self) -> tuple[PhaseSeries, ...]:
        with self._lock:
            if self._dirty:
                self._series = tuple(s for key in sorted(self._ledgers) for s in self._ledgers[key].series())
                self._dirty = False
            return self._series

    def last_span(self) -> dict[tuple[int, str, str], float]:
        """(gpu, uuid, service) -> unix end time of the newest window accepted there."""
        with self._lock:
            return dict(self._last_span)

    def rejected(self) -> dict[str, int]:
        """Windows refused so far, by reason; each (window, GPU) placement counts once."""
        with self._lock:
            return dict(self._rejected)

    def clipped(self) -> int:
        """Windows accepted only in part because they began in time already finalised."""
        with self._lock:
            return self._clipped

    # --- helpers -------------------------------------------------------------------------------

    def _file_incoming(self) -> None:
        """Readings queued by add_sample() into their ledgers (under the lock)."""
        while self._incoming:
            key, reading = self._incoming.popleft()
            self._ledger(key).add_reading(reading)

    def _ledger(self, key: GpuKey) -> GpuLedger:
        ledger = self._ledgers.get(key)
        if ledger is None:
            ledger = self._ledgers[key] = GpuLedger(key, self._max_samples)
        return ledger

    def _store(self, gpus: tuple[GpuKey, ...]) -> WindowStore:
        store = self._stores.get(gpus)
        if store is None:
            store = self._stores[gpus] = WindowStore(tuple(self._ledger(key) for key in gpus))
            for member in store.members:
                member.stores.append(store)
        return store

    def services(self) -> dict[str, str]:
        """service -> 'configured', 'mapped' or 'unmapped' for every service with its own label slot."""
        with self._lock:
            out = dict.fromkeys(self._labels.configured, "configured")
            for service, slot in self._labels.slots.items():
                out[service] = "mapped" if slot.mapped else "unmapped"
            return out

    def _drop_service(self, service: str) -> None:
        """A service lost its label slot and has nothing held: its series, ties and last span go."""
        for ledger in self._ledgers.values():
            self._dirty |= ledger.forget_service(service)
        for label in [label for label in self._last_span if label[2] == service]:
            del self._last_span[label]

    def _screen(self, window: PhaseWindow) -> str:
        """Why a window that fails place()'s bounds is refused (none of it depends on the GPU)."""
        if window.phase not in WORK_PHASES or not (math.isfinite(window.start) and math.isfinite(window.end)) \
                or window.end < window.start:
            return INVALID_WINDOW
        return TOO_OLD if window.end < self._now - self._retention else TOO_NEW
