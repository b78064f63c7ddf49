"""The agent itself: build information, the sampler's health and its HTTP listeners' counters.

gpu_scrape_collector_success / _duration_seconds (also declared under this collector) are
written by exporters.registry, which times every collector, this one included.
"""

from __future__ import annotations

import platform
from typing import Iterator

from gpuphase import __version__
from gpuphase.exporters.collectors.families import Family, nonempty
from gpuphase.model.view import View


def collect(view: View) -> Iterator[Family]:
    build_info = Family("gpuphase_build_info")
    build_info.add((__version__, view.backend, platform.python_version()), 1)
    ticks = Family("gpu_sampler_ticks_total")
    ticks.add((), view.sampler.ticks)
    overruns = Family("gpu_sampler_overruns_total")
    overruns.add((), view.sampler.overruns)
    tick_duration = Family("gpu_sampler_tick_duration_seconds")
    tick_duration.add((), view.sampler.last_tick_duration_seconds)
    connections = Family("gpu_http_open_connections")
    rejected = Family("gpu_http_rejected_total")
    for listener, stats in sorted(view.listeners.items()):
        connections.add((listener,), stats.open_connections)
        for reason, count in sorted(stats.rejected.items()):
            rejected.add((listener, reason), count)
    return nonempty((build_info, ticks, overruns, tick_duration, connections, rejected))
