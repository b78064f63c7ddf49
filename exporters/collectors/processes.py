"""Compute processes per GPU: how many hold it, and each one's memory and SM share.

Per-process series are labelled with who the process is (pid, name, container, pod,
namespace), resolved by the agent off the scrape path. The sampler already caps how many
processes a GPU carries (--process.max-series), which bounds the cardinality here.
"""

from __future__ import annotations

from typing import Iterator

from gpuphase.exporters.collectors.families import Family, add_series, live_gpus, nonempty
from gpuphase.model.view import View


def collect(view: View) -> Iterator[Family]:
    count = Family("gpu_processes")
    memory = Family("gpu_process_memory_used_bytes")
    sm_active = Family("gpu_process_sm_active_ratio")
    for sample in live_gpus(view):
        # The backend's count, not len(processes): the sampler caps the per-process series
        # (--process.max-series), and a GPU whose processes cannot be listed (NoPermission) has no
        # count at all rather than a misleading 0 ("free").
        if "gpu_processes" in sample.values:
            count.add_gpu(sample, sample.values["gpu_processes"])
        identity = sample.identity
        for process in sample.processes:
            who = (identity.index, identity.uuid, process.pid, process.process_name, process.container, process.pod,
                   process.namespace)
            # None means NVML did not report it (e.g. no utilization sample yet): left out.
            add_series(who, (memory, process.memory_used_bytes), (sm_active, process.sm_active_ratio))
    return nonempty((count, memory, sm_active))
