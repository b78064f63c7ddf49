"""The phase accountant: per-GPU samples + phase windows -> cumulative per-(GPU, service, phase) totals.

Why it is built this way (docs/phases.md has the full method):

* Spans arrive late (the request must finish, then the sender batches for ~5 s), so samples and
  windows wait in a per-GPU buffer and only time older than `now - settle` is finalised. Once
  finalised, time is never revisited: counters only grow, and a window that would change finalised
  time is refused (`too_late`) instead of silently rewriting history.
* Time is split exactly at window boundaries (interval arithmetic on the union of windows), never
  rounded to sampling ticks, so a 37 ms decode step counts 37 ms.
* NVML's GPM ratios and the energy counter describe a whole sampling interval, so each interval's
  activity and energy are shared among the phases by the phases' share of that interval.
* The GPU's phase comes from the union of all services' windows on it. Where two services share a
  GPU, time in which both are active is split equally between them and idle time is split equally
  among all services tied to the GPU, so `sum by (gpu)` equals the GPU's wall time and energy.
* Held windows are not kept as objects. Their time goes into one union of intervals per
  (service, phase), which is all the timeline needs; their tokens and de-duplication keys go into
  packed arrays filed by when the window ends, which is when its tokens count. Under continuous
  batching hundreds of windows overlap, so the unions stay short, and a held window costs ~30
  bytes instead of the ~300 of an object with its key (2,000 spans/s held for a 60 s settle).
* They are held once per placement (_WindowStore): a tensor-parallel group's GPUs all get every
  window of its service, so the group shares one store and each GPU only keeps its own progress
  through it. A TP-8 service costs one placement per window, not eight.

All inputs carry explicit wall-clock times; nothing here reads the clock, so tests drive time.
"""

from __future__ import annotations

import math
import threading
from array import array
from bisect import bisect_left, bisect_right, insort
from collections import Counter, deque
from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple, Sequence

from agent.snapshot import GpuSample
from agent.spans.windows import DECODE, PREFILL, WORK_PHASES, PhaseWindow
from agent.view import PHASES, PhaseSeries

GpuKey = tuple[int, str]  # (index, uuid)

MIXED = "mixed"
IDLE = "idle"
OTHER_SERVICE = "other"

SM_ACTIVE = "gpu_sm_active_ratio"
TENSOR_ACTIVE = "gpu_tensor_active_ratio"
DRAM_ACTIVE = "gpu_dram_active_ratio"
ENERGY = "gpu_energy_joules_total"
POWER = "gpu_power_watts"

# Rejection reasons (added by the lead to gpu_spans_rejected_total{reason}).
INVALID_WINDOW = "invalid_window"  # unknown phase, non-finite times, end before start
TOO_OLD = "too_old"  # ended before now - retention
TOO_NEW = "too_new"  # starts after now + retention (sender clock far ahead)
DUPLICATE = "duplicate"  # same key already held on this GPU (once counted, a repeat is too_late)
TOO_LATE = "too_late"  # lies entirely inside time already finalised on this GPU
BUFFER_FULL = "buffer_full"  # the GPU already holds max_windows_per_gpu pending windows

# Held windows per GPU: a TP-8 service at 2,000 spans/s holds ~250,000 on each GPU for a 60 s
# settle. A held window takes ~30 bytes when windows overlap (the usual case) and ~100 when none
# does, so a hostile flood of disjoint windows holds ~30 MiB per GPU at most.
DEFAULT_MAX_WINDOWS_PER_GPU = 300_000
_INF, _NEG_INF = math.inf, -math.inf
# The shortest sampling interval the config allows; sizes the per-GPU sample buffer.
_MIN_SAMPLE_INTERVAL = 0.1


def phase_of(prefill_active: bool, decode_active: bool) -> str:
    """design.md §5: prefill only, decode only, both (mixed), or neither (idle)."""
    if prefill_active and decode_active:
        return MIXED
    if prefill_active:
        return PREFILL
    if decode_active:
        return DECODE
    return IDLE


class Interval(NamedTuple):
    """Time in which some window of `service` was in `phase`: the timeline's input."""

    start: float
    end: float
    phase: str
    service: str


@dataclass(frozen=True)
class Segment:
    """A stretch of time with one GPU phase and one set of active services (empty when idle)."""

    start: float
    end: float
    phase: str
    services: tuple[str, ...]


def timeline(intervals: Iterable[Interval], start: float, end: float) -> list[Segment]:
    """Cut [start, end] into contiguous segments of constant phase and constant active services.

    A sweep over the interval edges clipped to [start, end]. The result depends only on the set of
    intervals, never on their order, so out-of-order arrival cannot change the accounting; and
    only on their union per (service, phase), so the ledger can keep just that.
    """
    events: list[tuple[float, int, str, str]] = []
    for w_start, w_end, phase, service in intervals:
        lo, hi = max(w_start, start), min(w_end, end)
        if lo < hi:
            events.append((lo, 1, phase, service))
            events.append((hi, -1, phase, service))
    events.sort(key=lambda event: event[0])

    active_by_phase = {PREFILL: 0, DECODE: 0}
    active_by_service: Counter[str] = Counter()
    segments: list[Segment] = []

    def emit(lo: float, hi: float) -> None:
        phase = phase_of(active_by_phase[PREFILL] > 0, active_by_phase[DECODE] > 0)
        services = tuple(sorted(s for s, n in active_by_service.items() if n > 0))
        if segments and segments[-1].phase == phase and segments[-1].services == services:
            segments[-1] = Segment(segments[-1].start, hi, phase, services)
        else:
            segments.append(Segment(lo, hi, phase, services))

    cursor, i = start, 0
    while i < len(events):
        instant = events[i][0]
        if instant > cursor:
            emit(cursor, instant)
            cursor = instant
        while i < len(events) and events[i][0] == instant:
            _, delta, phase, service = events[i]
            active_by_phase[phase] += delta
            active_by_service[service] += delta
            i += 1
    if cursor < end:
        emit(cursor, end)
    return segments


class _Reading(NamedTuple):
    """The few numbers of one GpuSample the accountant needs."""

    ts: float
    sm: float | None
    tensor: float | None
    dram: float | None
    energy: float | None
    power: float | None

    @classmethod
    def of(cls, sample: GpuSample) -> "_Reading":
        get = sample.values.get
        return cls(sample.timestamp, get(SM_ACTIVE), get(TENSOR_ACTIVE), get(DRAM_ACTIVE), get(ENERGY), get(POWER))


def interval_energy(prev: _Reading, cur: _Reading) -> float | None:
    """Joules spent in (prev, cur]: the energy counter's increase, else mean power x duration.

    A counter that went down was reset (driver reload): like Prometheus' increase(), count the
    new value as the energy since the reset.
    """
    if prev.energy is not None and cur.energy is not None:
        return cur.energy - prev.energy if cur.energy >= prev.energy else cur.energy
    powers = [p for p in (prev.power, cur.power) if p is not None]
    if powers:
        return sum(powers) / len(powers) * (cur.ts - prev.ts)
    return None


class _Totals:
    """Running totals of one (GPU, service, phase); integrals stay 0 until the GPU reports them."""

    __slots__ = ("seconds", "tokens", "energy", "sm", "tensor", "dram")

    def __init__(self) -> None:
        self.seconds = self.tokens = self.energy = self.sm = self.tensor = self.dram = 0.0


_QUANTITIES = ("energy", "sm", "tensor", "dram")


class _Lane:
    """The union of one (service, phase)'s held windows in one store: sorted, disjoint intervals.

    The timeline only asks, at each instant, whether some window of a service and phase is
    active; the union answers exactly that. Windows that touch or overlap merge, so continuous
    batching (hundreds of requests in flight) keeps this to a handful of intervals.
    """

    __slots__ = ("index", "service", "phase", "starts", "ends")

    def __init__(self, index: int, service: str, phase: str) -> None:
        self.index = index
        self.service = service
        self.phase = phase
        self.starts: list[float] = []
        self.ends: list[float] = []

    def add(self, start: float, end: float) -> None:
        starts, ends = self.starts, self.ends
        if starts and starts[-1] <= start <= ends[-1]:  # the usual case: it extends the newest one
            if end > ends[-1]:
                ends[-1] = end
            return
        i = bisect_left(ends, start)  # intervals before i end before `start`
        j = bisect_right(starts, end, i)  # intervals from j on start after `end`
        if i == j:
            starts.insert(i, start)
            ends.insert(i, end)
        else:  # [i, j) overlap or touch the new one: merge them into one
            merged_start, merged_end = min(start, starts[i]), max(end, ends[j - 1])
            starts[i:j] = (merged_start,)
            ends[i:j] = (merged_end,)

    def overlapping(self, lo: float, hi: float) -> Iterable[Interval]:
        i = bisect_right(self.ends, lo)
        j = bisect_left(self.starts, hi, i)
        return (Interval(s, e, self.phase, self.service) for s, e in zip(self.starts[i:j], self.ends[i:j]))

    def forget_until(self, until: float) -> None:
        """Drop the intervals that end at or before `until`: that time is final."""
        k = bisect_right(self.ends, until)
        if k:
            del self.starts[:k]
            del self.ends[:k]


# Held windows' tokens and keys are filed in buckets of this fraction of a second by when the
# window ends: counting a bucket touches only windows that end in it.
_BUCKETS_PER_SECOND = 4


class _EndBucket:
    """The held windows that end in one bucket: packed columns, kept sorted by key hash.

    Sorted by hash so that a repeat of a window (same key, same end: the same bucket) is found by
    bisection. The hash is Python's keyed SipHash of the key: a sender cannot make two windows
    collide on purpose, and a chance collision (a new window taken for a repeat) is expected about
    once in 10^5 years at 2,000 spans/s.
    """

    __slots__ = ("hashes", "ends", "tokens", "lanes")

    def __init__(self) -> None:
        self.hashes = array("q")
        self.ends = array("d")
        self.tokens = array("d")
        self.lanes = array("I")

    def __len__(self) -> int:
        return len(self.hashes)

    def place(self, key_hash: int) -> int:
        """Where a window with this key hash goes; -1 when the bucket already holds it."""
        hashes = self.hashes
        i = bisect_left(hashes, key_hash)
        return -1 if i < len(hashes) and hashes[i] == key_hash else i

    def insert(self, i: int, key_hash: int, end: float, tokens: float, lane: int) -> None:
        self.hashes.insert(i, key_hash)
        self.ends.insert(i, end)
        self.tokens.insert(i, tokens)
        self.lanes.insert(i, lane)

    def ended_between(self, after: float, until: float) -> list[tuple[int, float]]:
        """(lane, tokens) of the windows that end in (after, until]."""
        return [(lane, tokens) for end, tokens, lane in zip(self.ends, self.tokens, self.lanes)
                if after < end <= until]

    def drop_ended(self, until: float) -> int:
        """Forget the windows that end at or before `until` (keeping the hash order); how many."""
        kept = [entry for entry in zip(self.hashes, self.ends, self.tokens, self.lanes) if entry[1] > until]
        dropped = len(self.hashes) - len(kept)
        if dropped:
            columns = zip(*kept) if kept else ((), (), (), ())
            self.hashes, self.ends, self.tokens, self.lanes = (
                array(column.typecode, values) for column, values in
                zip((self.hashes, self.ends, self.tokens, self.lanes), columns))
        return dropped


class _WindowStore:
    """The held windows of one placement: the GPUs the mapper put a run of windows on.

    One GPU, or a tensor-parallel group whose GPUs all get every window of its service. The
    held windows are the same for every member, so they are held once: the union intervals, the
    tokens and the keys. Only the members' progress differs: each finalises its own time from the
    shared lanes and counts the tokens of the windows that ended up to its own boundary
    (`counted`); the store forgets what every member is past. A TP-8 service so costs one
    placement per window, not eight, in time and in memory.
    """

    def __init__(self, members: tuple["_GpuLedger", ...]) -> None:
        self.members = members
        self.lanes: dict[tuple[str, str], _Lane] = {}
        self.lane_list: list[_Lane] = []  # by _Lane.index
        self.buckets: dict[int, _EndBucket] = {}
        self.bucket_keys: list[int] = []  # the keys of `buckets`, sorted
        self.size = 0  # windows held
        self.counted = {member.key: -math.inf for member in members}  # tokens counted up to, per GPU

    def boundary(self) -> float:
        """Windows are judged against the newest finalised time of the group: one that ends
        before it is refused for all members, not counted on some and silently lost on others."""
        return max(member.finalised_until for member in self.members)

    def hold(self, window: PhaseWindow, service: str, boundary: float, has_room: bool) -> float | str:
        """Hold a window: the start of the part held, or the reason it cannot be held.

        A window reaching back into finalised time keeps only its open part, with its tokens
        prorated to that part: finalised totals are never rewritten, but a long request whose
        span could only be sent when it ended still counts for the time not yet final.
        """
        # Only held windows need their keys: a repeat of a window already counted lies wholly in
        # finalised time (it was counted because it ended there), so it is refused as too_late.
        key_hash, start, end = hash(window.key), window.start, window.end
        bucket_key = math.floor(end * _BUCKETS_PER_SECOND)
        bucket = self.buckets.get(bucket_key)
        place = 0 if bucket is None else bucket.place(key_hash)
        if place < 0:
            return DUPLICATE
        if not end > boundary:  # wholly in finalised time (a zero-length window at the boundary too)
            return TOO_LATE
        if not has_room:
            return BUFFER_FULL
        tokens = float(window.tokens)
        if start < boundary:  # clipped: the open part keeps its share of the tokens
            tokens *= (end - boundary) / (end - start)
            start = boundary
        lane = self.lanes.get((service, window.phase)) or self._new_lane(service, window.phase)
        if end > start:
            lane.add(start, end)
        if bucket is None:
            bucket = self.buckets[bucket_key] = _EndBucket()
            insort(self.bucket_keys, bucket_key)
        bucket.insert(place, key_hash, end, tokens, lane.index)
        self.size += 1
        return start

    def _new_lane(self, service: str, phase: str) -> _Lane:
        lane = self.lanes[(service, phase)] = _Lane(len(self.lane_list), service, phase)
        self.lane_list.append(lane)
        return lane

    def intervals(self, lo: float, hi: float) -> Iterator[Interval]:
        for lane in self.lane_list:
            yield from lane.overlapping(lo, hi)

    def ended(self, member: GpuKey, until: float) -> list[tuple[_Lane, float]]:
        """(lane, tokens) of the windows that ended since `member` last counted, up to `until`."""
        after = self.counted[member]
        if not until > after:
            return []
        self.counted[member] = until
        keys, low, high = self.bucket_keys, after * _BUCKETS_PER_SECOND, until * _BUCKETS_PER_SECOND
        found: list[tuple[int, float]] = []
        for i in range(0 if after == -math.inf else bisect_left(keys, math.floor(low)), len(keys)):
            key = keys[i]
            if key > high:
                break
            bucket = self.buckets[key]
            if key > low and key + 1 <= high:  # the whole bucket ends in (after, until]
                found.extend(zip(bucket.lanes, bucket.tokens))
            else:
                found.extend(bucket.ended_between(after, until))
        return [(self.lane_list[lane], tokens) for lane, tokens in found]

    def forget(self) -> None:
        """Drop the windows and the time that every member has finalised and counted."""
        floor = min(self.counted.values())
        if floor == -math.inf:
            return
        # Buckets whose every window ends before the floor (key + 1 <= floor * buckets per second),
        # then the windows of the bucket the floor falls in that end at or before it.
        keys, floor_key = self.bucket_keys, math.floor(floor * _BUCKETS_PER_SECOND)
        gone = bisect_right(keys, floor_key - 1)
        for key in keys[:gone]:
            self.size -= len(self.buckets.pop(key))
        del keys[:gone]
        if keys and keys[0] == floor_key:
            bucket = self.buckets[floor_key]
            self.size -= bucket.drop_ended(floor)
            if not bucket:
                del self.buckets[keys.pop(0)]
        for lane in self.lane_list:
            lane.forget_until(floor)

    def empty(self) -> bool:
        return self.size == 0 and not any(lane.starts for lane in self.lane_list)


class _GpuLedger:
    """One GPU's buffer (samples not yet final, the window stores it is a member of) and its totals."""

    def __init__(self, key: GpuKey, max_samples: int) -> None:
        self.key = key
        self.anchor: _Reading | None = None  # the newest finalised sample: start of the next interval
        self.pending_samples: deque[_Reading] = deque()
        self.max_samples = max_samples
        self.finalised_until = -math.inf
        self.stores: list[_WindowStore] = []  # held windows placed on this GPU, by placement
        self.configured_services: tuple[str, ...] = ()
        # service -> start of its earliest window here: it owns idle time from then on
        self.learned_services: dict[str, float] = {}
        self.totals: dict[tuple[str, str], _Totals] = {}
        self.reported = dict.fromkeys(_QUANTITIES, False)  # which integrals this GPU ever had

    def held(self) -> int:
        return sum(store.size for store in self.stores)

    # --- services ------------------------------------------------------------------------------

    def learn(self, service: str, since: float) -> bool:
        """Tie a service to this GPU from `since` on; True when the service is new here.

        Only windows in time not yet finalised are accepted, so `since` can only move within
        open time: which service owns finalised idle time never depends on arrival order.
        """
        known = self.learned_services.get(service)
        if known is None or since < known:
            self.learned_services[service] = since
        return known is None

    def idle_owners(self, start: float, end: float) -> list[tuple[float, float, tuple[str, ...]]]:
        """Split idle time [start, end] by who owns it: configured services always, learned ones
        from their first window on. Stretches owned by nobody are unknown, not idle."""
        cuts = sorted({t for t in self.learned_services.values() if start < t < end})
        pieces = []
        for lo, hi in zip([start] + cuts, cuts + [end]):
            owners = tuple(dict.fromkeys(self.configured_services + tuple(
                s for s, since in self.learned_services.items() if since <= lo)))
            if owners:
                pieces.append((lo, hi, owners))
        return pieces

    def ensure_series(self, service: str) -> bool:
        """Create the four phase totals of a service; True when they are new."""
        if (service, IDLE) in self.totals:
            return False
        for phase in PHASES:
            self.totals[(service, phase)] = _Totals()
        return True

    # --- intake --------------------------------------------------------------------------------

    def add_reading(self, reading: _Reading) -> None:
        newest = self.pending_samples[-1].ts if self.pending_samples else self.finalised_until
        if self.anchor is not None:
            newest = max(newest, self.anchor.ts)
        if not reading.ts > newest:  # repeated or out-of-order sample: the interval is already covered
            return
        if len(self.pending_samples) >= self.max_samples:
            # advance() is not being called. Dropping a reading that is not the start of the
            # stretch merges two intervals into one: coarser, but no wall time or energy is lost.
            del self.pending_samples[0 if self.anchor is not None else 1]
        self.pending_samples.append(reading)

    # --- finalisation --------------------------------------------------------------------------

    def finalise(self, cutoff: float, now: float, retention: float) -> bool:
        """Account every sample interval ending at or before `cutoff`; True if totals changed."""
        ready: list[_Reading] = []
        while self.pending_samples and self.pending_samples[0].ts <= cutoff:
            ready.append(self.pending_samples.popleft())
        changed = False
        if ready:
            intervals = []
            prev = self.anchor
            for reading in ready:
                if prev is not None:
                    intervals.append((prev, reading))
                prev = reading
            self.anchor = prev
            self.finalised_until = max(self.finalised_until, prev.ts)
            if intervals:
                changed |= self._credit_intervals(intervals)
        elif not self.pending_samples and (self.anchor is None or self.anchor.ts < now - retention):
            # No readings at all, or none for longer than retention (GPU lost): that time is
            # unknown, not idle. Move the boundary on so held windows are counted and freed.
            self.anchor = None
            self.finalised_until = max(self.finalised_until, cutoff)
        changed |= self._count_ended_windows()
        return changed

    def _credit_intervals(self, intervals: list[tuple[_Reading, _Reading]]) -> bool:
        first, last = intervals[0][0].ts, intervals[-1][1].ts
        segments = timeline([i for store in self.stores for i in store.intervals(first, last)], first, last)
        j = 0
        for prev, cur in intervals:
            a, b = prev.ts, cur.ts
            energy = interval_energy(prev, cur)
            ratios = {"sm": cur.sm, "tensor": cur.tensor, "dram": cur.dram, "energy": energy}
            for name, value in ratios.items():
                if value is not None:
                    self.reported[name] = True
            while j < len(segments) and segments[j].end <= a:
                j += 1
            k = j
            while k < len(segments) and segments[k].start < b:
                segment = segments[k]
                lo, hi = max(segment.start, a), min(segment.end, b)
                if hi > lo and segment.services:
                    self._credit(segment.services, segment.phase, hi - lo, b - a, ratios)
                elif hi > lo:
                    for idle_lo, idle_hi, owners in self.idle_owners(lo, hi):
                        self._credit(owners, IDLE, idle_hi - idle_lo, b - a, ratios)
                k += 1
        return True

    def _credit(self, services: tuple[str, ...], phase: str, seconds: float, interval: float,
                per_interval: dict[str, float | None]) -> None:
        share = seconds / len(services)
        for service in services:
            self.ensure_series(service)
            totals = self.totals[(service, phase)]
            totals.seconds += share
            if per_interval["energy"] is not None:
                totals.energy += per_interval["energy"] * share / interval
            if per_interval["sm"] is not None:
                totals.sm += per_interval["sm"] * share
            if per_interval["tensor"] is not None:
                totals.tensor += per_interval["tensor"] * share
            if per_interval["dram"] is not None:
                totals.dram += per_interval["dram"] * share

    def _count_ended_windows(self) -> bool:
        """Count the tokens of the held windows that have ended in finalised time."""
        changed = False
        for store in self.stores:
            for lane, tokens in store.ended(self.key, self.finalised_until):
                self.ensure_series(lane.service)
                self.totals[(lane.service, lane.phase)].tokens += tokens
                changed = True
        return changed

    def series(self) -> list[PhaseSeries]:
        index, uuid = self.key
        out = []
        for service in sorted({service for service, _ in self.totals}):
            for phase in PHASES:
                t = self.totals[(service, phase)]
                out.append(PhaseSeries(
                    gpu=index, uuid=uuid, service=service, phase=phase, seconds=t.seconds, tokens=t.tokens,
                    energy_joules=t.energy if self.reported["energy"] else None,
                    sm_active_seconds=t.sm if self.reported["sm"] else None,
                    tensor_active_seconds=t.tensor if self.reported["tensor"] else None,
                    dram_active_seconds=t.dram if self.reported["dram"] else None,
                ))
        return out


class PhaseAccountant:
    """Cumulative phase totals per (GPU, service, phase), fed by the sampler and the span worker.

    Threads: the sampler calls add_sample() (which never waits for the lock), the accounting
    thread set_mapping()/advance(), the span worker place(), scrapes series()/last_span()/
    rejected(). One lock, held for bounded work; series() returns a tuple rebuilt only when totals
    changed, so a scrape never recomputes history.
    """

    def __init__(self, settle: float, retention: float, max_services: int,
                 max_windows_per_gpu: int = DEFAULT_MAX_WINDOWS_PER_GPU) -> None:
        if retention <= settle:
            raise ValueError("retention must be longer than settle")
        if max_services < 1:
            raise ValueError("max_services must be at least 1")
        self._settle = settle
        self._retention = retention
        self._max_services = max_services
        self._max_windows = max_windows_per_gpu
        self._max_samples = int(retention / _MIN_SAMPLE_INTERVAL) + 2
        self._lock = threading.Lock()
        self._incoming: deque[tuple[GpuKey, _Reading]] = deque()  # see add_sample()
        self._ledgers: dict[GpuKey, _GpuLedger] = {}
        self._stores: dict[tuple[GpuKey, ...], _WindowStore] = {}  # by placement (see _WindowStore)
        self._services: set[str] = set()
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
        self._incoming.append(((sample.identity.index, sample.identity.uuid), _Reading.of(sample)))
        if self._lock.acquire(blocking=False):
            try:
                self._file_incoming()
            finally:
                self._lock.release()

    def set_mapping(self, gpu_key: GpuKey, services: Iterable[str]) -> None:
        """The services configured for a GPU (phase.map); its idle time is theirs."""
        with self._lock:
            ledger = self._ledger(gpu_key)
            ledger.configured_services = tuple(dict.fromkeys(self._fold(s, admit=True) for s in services))
            for service in ledger.configured_services:
                self._dirty |= ledger.ensure_series(service)

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
            for window in windows:
                service = self._fold(window.service, admit=False)
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
                if service not in self._services:
                    self._fold(service, admit=True)
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

    def _ledger(self, key: GpuKey) -> _GpuLedger:
        ledger = self._ledgers.get(key)
        if ledger is None:
            ledger = self._ledgers[key] = _GpuLedger(key, self._max_samples)
        return ledger

    def _store(self, gpus: tuple[GpuKey, ...]) -> _WindowStore:
        store = self._stores.get(gpus)
        if store is None:
            store = self._stores[gpus] = _WindowStore(tuple(self._ledger(key) for key in gpus))
            for member in store.members:
                member.stores.append(store)
        return store

    def _fold(self, service: str, admit: bool) -> str:
        """Bound the service label: the first max_services names are kept, later ones become
        'other'. Only accepted windows (admit=True) take up one of the places."""
        if service in self._services or service == OTHER_SERVICE:
            return service
        if len(self._services) < self._max_services:
            if admit:
                self._services.add(service)
            return service
        return OTHER_SERVICE

    def _screen(self, window: PhaseWindow) -> str:
        """Why a window that fails place()'s bounds is refused (none of it depends on the GPU)."""
        if window.phase not in WORK_PHASES or not (math.isfinite(window.start) and math.isfinite(window.end)) \
                or window.end < window.start:
            return INVALID_WINDOW
        return TOO_OLD if window.end < self._now - self._retention else TOO_NEW
