"""Loads gpuphase/model/metrics.yaml, the one place metric names, types, units, help and labels are declared."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import yaml


@dataclass(frozen=True)
class MetricDef:
    name: str
    type: str
    unit: str
    collector: str
    labels: tuple[str, ...]
    help: str

    @property
    def extra_labels(self) -> tuple[str, ...]:
        """Labels beyond the per-GPU gpu/uuid pair."""
        return tuple(label for label in self.labels if label not in ("gpu", "uuid"))

    @property
    def family_name(self) -> str:
        """The name prometheus_client wants for a family (counters without _total)."""
        if self.type == "counter" and self.name.endswith("_total"):
            return self.name[: -len("_total")]
        return self.name


@lru_cache(maxsize=1)
def load() -> dict[str, MetricDef]:
    text = resources.files(__package__).joinpath("metrics.yaml").read_text(encoding="utf-8")
    out: dict[str, MetricDef] = {}
    for raw in yaml.safe_load(text)["metrics"]:
        definition = MetricDef(
            name=raw["name"],
            type=raw["type"],
            unit=raw.get("unit", ""),
            collector=raw["collector"],
            labels=tuple(raw.get("labels", [])),
            help=raw["help"],
        )
        if definition.name in out:
            raise ValueError(f"metrics.yaml declares {definition.name} twice")
        out[definition.name] = definition
    return out


def by_collector(collector: str) -> list[MetricDef]:
    return [d for d in load().values() if d.collector == collector]


def collectors() -> list[str]:
    """Every collector name, in declaration order."""
    seen: dict[str, None] = {}
    for definition in load().values():
        seen.setdefault(definition.collector, None)
    return list(seen)
