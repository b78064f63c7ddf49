"""The bounded `service` label: who gets a value of their own, who shares `other`, and when a value is freed.

Span senders choose their service names, so the label must be bounded, and a flood of junk names
must not cost a real service its label (docs/phases.md, "Which service gets the time";
docs/security.md). Three kinds of service:

* **configured** (`--phase.map`, told through PhaseAccountant.set_mapping): always their own value,
  never counted against the cap, never freed. The operator bounds how many there are.
* **mapped**: placed by entitlement (their pid or pod was found on the GPU), as the mapper tells
  PhaseAccountant.mark_mapped.
* **unmapped**: placed only by a GPU claim the agent was told to trust (`trust_span_gpus`), or by a
  caller that does not say (tests, tools).

Mapped and unmapped services share `max_services` slots. A new service takes a free slot; when
none is free it takes the least recently used slot that has not been used for `ttl` (either kind),
and a mapped service may also take the least recently used *unmapped* slot, however fresh. An
unmapped service never displaces a mapped one. A service that gets no slot is `other`.

A service whose slot expired has had nothing held for so long (ttl is at least retention + settle
past its last window's end) that all its windows are counted: its series go at once. One displaced
while fresh may still have windows held, so its series stay until that much time has passed after
its last window; until then it counts towards the label values too. So at most
configured + 2 x max_services + 1 (`other`) values exist at any time.
"""

from __future__ import annotations

import math

OTHER_SERVICE = "other"


class _Slot:
    __slots__ = ("mapped", "last_used")

    def __init__(self, mapped: bool, last_used: float) -> None:
        self.mapped = mapped
        self.last_used = last_used  # end of the newest accepted window (sender time)


class ServiceLabels:
    """Label slots for the PhaseAccountant (called under its lock; nothing here reads the clock)."""

    def __init__(self, max_services: int, ttl: float) -> None:
        if max_services < 1:
            raise ValueError("max_services must be at least 1")
        self.max_services = max_services
        self.ttl = ttl
        self.configured: set[str] = set()
        self.slots: dict[str, _Slot] = {}
        self.retiring: dict[str, float] = {}  # displaced service -> end of its last window
        self.entitled: frozenset[str] = frozenset()  # mapped services of the batch being placed

    def configure(self, service: str) -> None:
        self.configured.add(service)
        self.slots.pop(service, None)
        self.retiring.pop(service, None)

    def is_mapped(self, service: str) -> bool:
        slot = self.slots.get(service)
        return service in self.configured or (slot is not None and slot.mapped)

    def label(self, service: str, now: float) -> str:
        """The label a window of `service` gets if it is accepted now (use() then takes the slot)."""
        if service in self.slots or service in self.configured or service == OTHER_SERVICE:
            return service
        if len(self.slots) < self.max_services or self._victim(service in self.entitled, now) is not None:
            return service
        return OTHER_SERVICE

    def use(self, label: str, end: float, now: float) -> tuple[str, bool] | None:
        """A window under `label` (from label()) was accepted. Returns the service whose slot it
        took, if any, and whether that service's series go now (True: its slot had expired) or
        once it has nothing held (False: displaced; see retire_due())."""
        slot = self.slots.get(label)
        if slot is not None:
            if end > slot.last_used:
                slot.last_used = end
            if not slot.mapped and label in self.entitled:
                slot.mapped = True  # first placed by a trusted claim, now by its pid
            return None
        if label in self.configured or label == OTHER_SERVICE:
            return None
        mapped = label in self.entitled
        evicted = None
        if len(self.slots) >= self.max_services:
            evicted = self._victim(mapped, now)
            if evicted is None:  # label() said there was room; nothing changed since
                return None
            victim, expired = evicted
            last_used = self.slots.pop(victim).last_used
            if not expired:
                self.retiring[victim] = last_used
        self.retiring.pop(label, None)  # back before its old series went: they continue
        self.slots[label] = _Slot(mapped, end)
        return evicted

    def retire_due(self, now: float, hold: float) -> list[str]:
        """Displaced services whose last window ended more than `hold` before now: their series go."""
        due = [service for service, last in self.retiring.items() if now - last > hold]
        for service in due:
            del self.retiring[service]
        return due

    def _victim(self, mapped: bool, now: float) -> tuple[str, bool] | None:
        """The slot a new service may take: (service holding it, whether it had expired)."""
        stale, stale_at = None, math.inf
        oldest_unmapped, unmapped_at = None, math.inf
        for service, slot in self.slots.items():
            if now - slot.last_used > self.ttl and slot.last_used < stale_at:
                stale, stale_at = service, slot.last_used
            if not slot.mapped and slot.last_used < unmapped_at:
                oldest_unmapped, unmapped_at = service, slot.last_used
        if stale is not None:
            return stale, True
        if mapped and oldest_unmapped is not None:
            return oldest_unmapped, False
        return None
