"""The collectors: one per collector name of gpuphase/model/metrics.yaml.

A collector is `collect(view) -> Iterable[Family]`: a pure function of one View, with no state,
no threads and no NVML, so a scrape only formats what the sampler already read. Most collectors
are a table: every metric of theirs is read from the GPU sample under its own name
(families.reading_families), so they are listed in TABLE_COLLECTORS and have no code of their own.
The others have a module of the same name here. COLLECTORS maps every collector name to its
function in metrics.yaml order; a name that is neither fails at import rather than silently
exporting nothing.
"""

from __future__ import annotations

import importlib
from typing import Callable, Iterable, Mapping

from gpuphase.exporters.collectors.families import Family, table_collector
from gpuphase.model import metricdefs
from gpuphase.model.view import View

CollectFn = Callable[[View], Iterable[Family]]

TABLE_COLLECTORS = ("gpm", "memory", "power", "interconnect", "errors")


def _load() -> dict[str, CollectFn]:
    return {
        name: table_collector(name) if name in TABLE_COLLECTORS
        else importlib.import_module(f"{__name__}.{name}").collect
        for name in metricdefs.collectors()
    }


COLLECTORS: Mapping[str, CollectFn] = _load()
