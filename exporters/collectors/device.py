"""Identity and health of every GPU, plus its utilization, temperatures and clocks."""

from __future__ import annotations

from typing import Iterator

from gpuphase.exporters.collectors.families import Family, gpus, nonempty, reading_families
from gpuphase.model.view import View

# Built from the sample's identity and state rather than read from GpuSample.values.
_IDENTITY_AND_HEALTH = ("gpu_info", "gpu_up", "gpu_last_sample_timestamp_seconds")


def collect(view: View) -> Iterator[Family]:
    info, up, last_sample = (Family(name) for name in _IDENTITY_AND_HEALTH)
    for sample in gpus(view):
        identity = sample.identity
        info.add_gpu(
            sample,
            1,
            identity.name,
            identity.pci_bus_id,
            identity.driver_version,
            identity.cuda_version,
            "true" if identity.gpm_supported else "false",
        )
        # Lost GPUs stay visible: gpu_up 0 is what GpuLost alerts on.
        up.add_gpu(sample, 1 if sample.up else 0)
        if sample.last_success:
            last_sample.add_gpu(sample, sample.last_success)
    yield from nonempty((info, up, last_sample))
    yield from reading_families(view, "device", exclude=_IDENTITY_AND_HEALTH)
