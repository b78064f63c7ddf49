"""The agent's own process: memory, CPU time, start time and file descriptors (process_*).

The names, types and help texts are those of prometheus_client's ProcessCollector (and of every
Go exporter), so panels and alerts written for other exporters work on the agent. The figures
are read the way ProcessCollector reads them, from /proc/self/stat and /proc/self/fd, by
`read_self()`: the agent's ViewSource calls it when it builds a scrape's View (about 50 µs),
and `collect` renders only what the View holds, like every other collector. A
View built by hand has no process figures, so fixtures and golden files stay reproducible.

Without /proc (a developer's macOS), psutil supplies the same figures. A figure that cannot be
read is left out, not reported as 0.
"""

from __future__ import annotations

import os
import resource
from functools import lru_cache
from typing import Iterator

from gpuphase.exporters.collectors.families import Family
from gpuphase.model import metricdefs
from gpuphase.model.view import ProcessStats, View

PROC = "/proc"
_PAGE_SIZE = resource.getpagesize()


def _clock_ticks() -> float:
    try:
        return float(os.sysconf("SC_CLK_TCK"))
    except (ValueError, OSError, AttributeError):
        return 100.0


_TICKS = _clock_ticks()


def field_name(metric_name: str) -> str:
    """process_cpu_seconds_total -> cpu_seconds: the ProcessStats field a metric is read from."""
    return metric_name.removeprefix("process_").removesuffix("_total")


def collect(view: View) -> Iterator[Family]:
    stats = view.process
    if stats is None:
        return
    for definition in metricdefs.by_collector("process"):
        value = getattr(stats, field_name(definition.name))
        if value is not None:
            family = Family(definition)
            family.add((), value)
            yield family


@lru_cache(maxsize=4)
def _boot_time(proc: str) -> float | None:
    """btime of /proc/stat: the unix time the kernel's jiffies count from (fixed until reboot)."""
    try:
        with open(os.path.join(proc, "stat"), "rb") as stat:
            for line in stat:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def read_self(proc: str = PROC) -> ProcessStats:
    """This process's figures now: /proc/self as prometheus_client reads it, else psutil."""
    boot = _boot_time(proc)
    if boot is None:
        return _read_psutil()
    values: dict[str, float] = {}
    try:
        with open(os.path.join(proc, "self", "stat"), "rb") as stat:
            # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
            parts = stat.read().rpartition(b")")[2].split()
        values["virtual_memory_bytes"] = float(parts[20])  # vsize, bytes
        values["resident_memory_bytes"] = float(parts[21]) * _PAGE_SIZE  # rss, pages
        values["start_time_seconds"] = float(parts[19]) / _TICKS + boot  # starttime, ticks since boot
        # utime + stime, each in ticks; divided one by one as prometheus_client does (same float)
        values["cpu_seconds"] = float(parts[11]) / _TICKS + float(parts[12]) / _TICKS
    except (OSError, ValueError, IndexError):
        values.clear()
    try:
        values["open_fds"] = float(len(os.listdir(os.path.join(proc, "self", "fd"))))
    except OSError:
        pass
    max_fds = _max_fds()
    if max_fds is not None:
        values["max_fds"] = max_fds
    return ProcessStats(**values)


def _max_fds() -> float | None:
    """The soft RLIMIT_NOFILE: what /proc/self/limits shows as "Max open files" (left out if unlimited)."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else float(soft)


def _read_psutil() -> ProcessStats:
    import psutil

    values: dict[str, float] = {}
    try:
        process = psutil.Process()
        with process.oneshot():
            memory = process.memory_info()
            values["virtual_memory_bytes"] = float(memory.vms)
            values["resident_memory_bytes"] = float(memory.rss)
            values["start_time_seconds"] = float(process.create_time())
            times = process.cpu_times()
            values["cpu_seconds"] = float(times.user + times.system)
            if hasattr(process, "num_fds"):  # POSIX only
                values["open_fds"] = float(process.num_fds())
    except (psutil.Error, OSError):
        pass
    max_fds = _max_fds()
    if max_fds is not None:
        values["max_fds"] = max_fds
    return ProcessStats(**values)
