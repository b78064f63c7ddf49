"""MIG GPU instances: memory and GPM activity of each slice, labelled by instance and profile.

Table-driven like the device collectors: every mig metric in gpuphase/model/metrics.yaml is read from
MigReading.values under its own name, and left out where the slice does not report it.
"""

from __future__ import annotations

from typing import Iterator

from gpuphase.exporters.collectors.families import Family, live_gpus, nonempty
from gpuphase.model import metricdefs
from gpuphase.model.view import View


def collect(view: View) -> Iterator[Family]:
    families = [Family(d.name) for d in metricdefs.by_collector("mig")]
    for sample in live_gpus(view):
        for instance in sample.mig:
            for family in families:
                value = instance.values.get(family.definition.name)
                if value is not None:
                    family.add_gpu(sample, value, instance.gpu_instance_id, instance.profile)
    return nonempty(families)
