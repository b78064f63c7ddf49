"""The held windows of one placement: their time as interval unions, their tokens and keys packed."""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left, bisect_right, insort
from typing import TYPE_CHECKING, Iterator

from gpuphase.agent.phases.intervals import Interval, Lane
from gpuphase.model.phase import GpuKey, PhaseWindow

if TYPE_CHECKING:
    from gpuphase.agent.phases.ledger import GpuLedger

# Why a window is refused: the reason label of gpu_spans_rejected_total.
INVALID_WINDOW = "invalid_window"  # unknown phase, non-finite times, end before start
TOO_OLD = "too_old"  # ended before now - retention
TOO_NEW = "too_new"  # starts after now + retention (sender clock far ahead)
DUPLICATE = "duplicate"  # same key already held on this GPU (once counted, a repeat is too_late)
TOO_LATE = "too_late"  # lies entirely inside time already finalised on this GPU
BUFFER_FULL = "buffer_full"  # the GPU already holds max_windows_per_gpu pending windows


BUCKETS_PER_SECOND = 4


class EndBucket:
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


class WindowStore:
    """The held windows of one placement: the GPUs the mapper put a run of windows on.

    One GPU, or a tensor-parallel group whose GPUs all get every window of its service. The
    held windows are the same for every member, so they are held once: the union intervals, the
    tokens and the keys. Only the members' progress differs: each finalises its own time from the
    shared lanes and counts the tokens of the windows that ended up to its own boundary
    (`counted`); the store forgets what every member is past. A TP-8 service so costs one
    placement per window, not eight, in time and in memory.
    """

    def __init__(self, members: tuple["GpuLedger", ...]) -> None:
        self.members = members
        self.lanes: dict[tuple[str, str], Lane] = {}
        self.lane_list: list[Lane] = []  # by Lane.index
        self.buckets: dict[int, EndBucket] = {}
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
        bucket_key = math.floor(end * BUCKETS_PER_SECOND)
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
            bucket = self.buckets[bucket_key] = EndBucket()
            insort(self.bucket_keys, bucket_key)
        bucket.insert(place, key_hash, end, tokens, lane.index)
        self.size += 1
        return start

    def _new_lane(self, service: str, phase: str) -> Lane:
        lane = self.lanes[(service, phase)] = Lane(len(self.lane_list), service, phase)
        self.lane_list.append(lane)
        return lane

    def intervals(self, lo: float, hi: float) -> Iterator[Interval]:
        for lane in self.lane_list:
            yield from lane.overlapping(lo, hi)

    def ended(self, member: GpuKey, until: float) -> list[tuple[Lane, float]]:
        """(lane, tokens) of the windows that ended since `member` last counted, up to `until`."""
        after = self.counted[member]
        if not until > after:
            return []
        self.counted[member] = until
        keys, low, high = self.bucket_keys, after * BUCKETS_PER_SECOND, until * BUCKETS_PER_SECOND
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
        keys, floor_key = self.bucket_keys, math.floor(floor * BUCKETS_PER_SECOND)
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
