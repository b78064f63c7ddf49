"""What a GPU-hour costs: one flat price (--price.gpu-hour) or a price file per GPU model.

The price file is YAML (docs/report.md):

    currency: USD
    gpu_hour: 2.50            # models not listed below (optional)
    energy_kwh: 0.12          # optional: turns energy savings into money
    models:
      NVIDIA H100 80GB HBM3: {gpu_hour: 2.50, memory_bandwidth_tbps: 3.35}
      NVIDIA H200:           {gpu_hour: 3.50, memory_bandwidth_tbps: 4.8}

Models are matched to gpu_info's `name` exactly, else case-insensitively. `memory_bandwidth_tbps`
lets the report compare bandwidth-richer models for memory-bound decode. Every mistake stops the
report with `FILE:LINE: reason`, as the agent's own config files do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import yaml

from gpuphase.model.files import ConfigFileError, compose_yaml, construct_yaml, read_config_text


class PriceFileError(ValueError):
    """A price file that cannot be used; the message is one line starting with FILE:LINE."""


@dataclass(frozen=True)
class ModelPrice:
    gpu_hour: float | None
    memory_bandwidth_tbps: float | None = None


@dataclass(frozen=True)
class PriceBook:
    currency: str = "USD"
    default: ModelPrice = ModelPrice(None)
    energy_kwh: float | None = None
    models: dict[str, ModelPrice] = field(default_factory=dict)

    def for_model(self, name: str) -> ModelPrice:
        """The model's entry, else the default (whose price may be None: cost unknown)."""
        if name in self.models:
            return self.models[name]
        folded = name.casefold()
        for model, price in self.models.items():
            if model.casefold() == folded:
                return price
        return self.default

    def gpu_hour(self, name: str) -> float | None:
        price = self.for_model(name).gpu_hour
        return self.default.gpu_hour if price is None else price

    def bandwidth_tbps(self, name: str) -> float | None:
        return self.for_model(name).memory_bandwidth_tbps


def flat(price: float | None, currency: str = "USD") -> PriceBook:
    return PriceBook(currency=currency, default=ModelPrice(price))


_TOP_KEYS = {"currency", "gpu_hour", "energy_kwh", "models"}
_MODEL_KEYS = {"gpu_hour", "memory_bandwidth_tbps"}


def load(path: str) -> PriceBook:
    """The price file at path; PriceFileError naming file and line for anything wrong with it."""
    try:
        loader, root = compose_yaml(read_config_text(path))
    except ConfigFileError as err:
        raise PriceFileError(f"{err.where(path)}: {err.reason}") from None
    try:
        return _book(path, loader, root)
    finally:
        loader.dispose()


def _book(path: str, loader: yaml.SafeLoader, root: yaml.Node | None) -> PriceBook:
    if root is None:
        raise PriceFileError(f"{path}: empty price file (expected gpu_hour or models)")
    top = _mapping(path, root, _TOP_KEYS, "the price file")
    currency = _text(path, loader, top["currency"]) if "currency" in top else "USD"
    default = ModelPrice(_number(path, loader, top["gpu_hour"]) if "gpu_hour" in top else None)
    energy = _number(path, loader, top["energy_kwh"]) if "energy_kwh" in top else None
    models: dict[str, ModelPrice] = {}
    if "models" in top:
        for name_node, spec in _pairs(path, top["models"], "models"):
            name = _text(path, loader, name_node)
            entry = _mapping(path, spec, _MODEL_KEYS, f"model {name!r}")
            models[name] = ModelPrice(
                _number(path, loader, entry["gpu_hour"]) if "gpu_hour" in entry else None,
                _number(path, loader, entry["memory_bandwidth_tbps"], positive=True)
                if "memory_bandwidth_tbps" in entry else None,
            )
    if default.gpu_hour is None and not any(m.gpu_hour is not None for m in models.values()):
        raise PriceFileError(f"{path}:{root.start_mark.line + 1}: no price: set gpu_hour, or gpu_hour under a model")
    return PriceBook(currency=currency, default=default, energy_kwh=energy, models=models)


def _pairs(path: str, node: yaml.Node, what: str) -> list[tuple[yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise PriceFileError(f"{path}:{node.start_mark.line + 1}: {what} must be a mapping")
    return list(node.value)


def _mapping(path: str, node: yaml.Node, allowed: set[str], what: str) -> dict[str, yaml.Node]:
    out: dict[str, yaml.Node] = {}
    for key, value in _pairs(path, node, what):
        line = key.start_mark.line + 1
        if not isinstance(key, yaml.ScalarNode) or key.value not in allowed:
            raise PriceFileError(f"{path}:{line}: unknown key {getattr(key, 'value', '?')!r} in {what} "
                                 f"(expected one of {', '.join(sorted(allowed))})")
        if key.value in out:
            raise PriceFileError(f"{path}:{line}: {key.value!r} given twice in {what}")
        out[key.value] = value
    return out


def _construct(path: str, loader: yaml.SafeLoader, node: yaml.Node):
    try:
        return construct_yaml(loader, node)
    except ConfigFileError as err:
        raise PriceFileError(f"{err.where(path)}: {err.reason}") from None


def _text(path: str, loader: yaml.SafeLoader, node: yaml.Node) -> str:
    value = _construct(path, loader, node)
    if not isinstance(value, str) or not value.strip():
        raise PriceFileError(f"{path}:{node.start_mark.line + 1}: expected a non-empty string, got {value!r}")
    return value


def _number(path: str, loader: yaml.SafeLoader, node: yaml.Node, positive: bool = False) -> float:
    value = _construct(path, loader, node)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        bound = "a positive" if positive else "a non-negative"
        raise PriceFileError(f"{path}:{node.start_mark.line + 1}: expected {bound} number, got {value!r}")
    return float(value)
