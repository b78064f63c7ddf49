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
  batching hundreds of windows overlap, so the unions stay short, and a held window costs a
  tenth of an object with its key (sizes in docs/design-figures.md).
* They are held once per placement (store.py): a tensor-parallel group's GPUs all get every
  window of its service, so the group shares one store and each GPU only keeps its own progress
  through it. A TP-8 service costs one placement per window, not eight.

All inputs carry explicit wall-clock times; nothing here reads the clock, so tests drive time.

    intervals.py   interval unions and the timeline sweep (pure functions of the windows)
    store.py       the windows held for one placement, and why a window is refused
    ledger.py      one GPU: pending samples, finalisation, totals
    services.py    the bounded service label: configured, mapped and unmapped services' slots
    accountant.py  PhaseAccountant, the one object the rest of the agent talks to
"""

from gpuphase.agent.phases.accountant import (DEFAULT_MAX_WINDOWS_PER_GPU, DEFAULT_SERVICE_TTL, OTHER_SERVICE,
                                              PhaseAccountant)
from gpuphase.agent.phases.intervals import Interval, Segment, timeline

__all__ = ["DEFAULT_MAX_WINDOWS_PER_GPU", "DEFAULT_SERVICE_TTL", "OTHER_SERVICE", "Interval", "PhaseAccountant",
           "Segment", "timeline"]
