"""The collectors, one module per collector name of agent/metrics.yaml.

Each module exposes `collect(view) -> Iterable[Family]`: a pure function of one View, with no
state, no threads and no NVML, so a scrape only formats what the sampler already read.
COLLECTORS maps every collector name to its function in metrics.yaml order; a name without a
module fails at import rather than silently exporting nothing.
"""

from __future__ import annotations

import importlib
from typing import Callable, Iterable, Mapping

from agent import metricdefs
from agent.view import View
from exporters.collectors._families import Family

CollectFn = Callable[[View], Iterable[Family]]


def _load() -> dict[str, CollectFn]:
    return {
        name: importlib.import_module(f"{__name__}.{name}").collect
        for name in metricdefs.collectors()
    }


COLLECTORS: Mapping[str, CollectFn] = _load()
