"""From collected figures to the report's GPUs, services and fleet (the JSON contract,
gpuphase/report/schema.json; docs/report.md says what each figure means).

Conventions: hours are GPU-hours; a cost is hours x the GPU model's price per hour, null where no
price is known; energy per token is joules over tokens of the same phase, null without tokens.
Tensor parallelism: the agent counts a request's tokens on every GPU of its group, so per service
the GPUs of one host whose token counts are identical are one group and count once.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from gpuphase.report.collect import WEIGHT, Collected, Gpu
from gpuphase.report.prices import PriceBook

PHASES = ("prefill", "decode", "mixed", "idle")
TOKEN_PHASES = ("prefill", "decode")
IDLE_KINDS = ("allocated", "unused", "total")
JOULES_PER_KWH = 3.6e6
# Token counts of one tensor-parallel group agree to float rounding; two replicas' almost never.
SAME_GROUP_TOLERANCE = 1e-6


def _hours(seconds: float) -> float:
    return seconds / 3600.0


def _ratio(part: float | None, whole: float | None) -> float | None:
    return part / whole if part is not None and whole else None


def _times(value: float | None, factor: float | None) -> float | None:
    return value * factor if value is not None and factor is not None else None


def _sum_known(values) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _phases(values: dict[str, float], unknown: float | None = None) -> dict[str, float]:
    out = {phase: values.get(phase, 0.0) for phase in PHASES}
    if unknown is not None:
        out["unknown"] = unknown
    return out


def _split(allocated: float | None, unused: float | None) -> dict[str, float | None]:
    return {"allocated": allocated, "unused": unused, "total": _sum_known((allocated, unused))}


class Analysis:
    """The report's figures, computed once from what was collected."""

    def __init__(self, data: Collected, prices: PriceBook):
        self.data = data
        self.prices = prices
        self.gpus = [self._gpu(gpu) for gpu in data.gpus]
        self.gpus = [g for g in self.gpus if g["hours"] > 0]
        self.services = self._services()
        self.fleet = self._fleet()

    # ---- per GPU -----------------------------------------------------------------------------
    def _total(self, kind: str, key: tuple) -> dict[tuple, float]:
        return self.data.totals.get(kind, {}).get(key, {})

    def _scalar(self, kind: str, key: tuple) -> float | None:
        return self._total(kind, key).get(())

    def _by_phase(self, kind: str, key: tuple) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for (phase, _service), value in self._total(kind, key).items():
            out[phase] += value
        return out

    def _timeline(self, key: tuple) -> tuple[float, dict[str, float], list]:
        observed_buckets = self.data.buckets.get("observed", {}).get(key)
        phase_buckets = self.data.buckets.get("phase_seconds", {}).get(key)
        observed, phases, series = 0.0, defaultdict(float), []
        for index, window in enumerate(self.data.timeline):
            seen = observed_buckets[index].get((), 0.0) if observed_buckets else 0.0
            bucket = defaultdict(float)
            for (phase, _service), value in (phase_buckets[index].items() if phase_buckets else ()):
                bucket[phase] += value
            observed += seen
            for phase, value in bucket.items():
                phases[phase] += value
            accounted = sum(bucket[p] for p in PHASES)
            series.append([window.end, _phases({p: _hours(v) for p, v in bucket.items()},
                                               _hours(max(0.0, seen - accounted)))])
        return observed, phases, series

    def _gpu(self, gpu: Gpu) -> dict[str, Any]:
        key = (gpu.instance, gpu.gpu, gpu.uuid)
        observed, phase_seconds, series = self._timeline(key)
        hours = _hours(observed)
        phase_hours = {p: _hours(phase_seconds.get(p, 0.0)) for p in PHASES}
        unknown = max(0.0, hours - sum(phase_hours.values()))
        price = self.prices.gpu_hour(gpu.model)
        allocated = _hours(self._scalar("idle_allocated", key) or 0.0)
        unused = _hours(self._scalar("unused", key) or 0.0)
        energy_j = self._scalar("energy", key)
        phase_energy = self._by_phase("phase_energy", key)
        tokens = self._by_phase("tokens", key)
        has_tokens = bool(self._total("tokens", key))
        total_bytes, used_bytes = self._scalar("memory_total", key), self._scalar("memory_used", key)
        headroom = total_bytes - used_bytes if total_bytes is not None and used_bytes is not None else None
        services = sorted({service for (_phase, service) in self._total("phase_energy", key)}
                          | {s for b in self.data.buckets.get("phase_seconds", {}).get(key, []) for (_p, s) in b})
        energy_kwh = (energy_j or 0.0) / JOULES_PER_KWH
        accounted_energy = sum(phase_energy.get(p, 0.0) for p in PHASES) / JOULES_PER_KWH
        return {
            "instance": gpu.instance, "gpu": gpu.gpu, "uuid": gpu.uuid, "model": gpu.model,
            "services": services,
            "price_per_hour": price,
            "hours": hours,
            "cost": _times(hours, price),
            "phase_hours": {**phase_hours, "unknown": unknown},
            "idle_gpu_hours": _split(allocated, unused),
            "idle_cost": _split(_times(allocated, price), _times(unused, price)),
            "bandwidth_bound_hours": _hours(self._scalar("bandwidth_bound", key) or 0.0),
            "dram_active": _ratio(self._scalar("dram", key), self._scalar("dram" + WEIGHT, key)),
            "tensor_active": _ratio(self._scalar("tensor", key), self._scalar("tensor" + WEIGHT, key)),
            "vram": {"total_bytes": total_bytes, "peak_used_bytes": used_bytes, "headroom_bytes": headroom,
                     "headroom_ratio": _ratio(headroom, total_bytes)},
            "energy_kwh": energy_kwh,
            "energy_kwh_by_phase": _phases({p: phase_energy.get(p, 0.0) / JOULES_PER_KWH for p in PHASES},
                                           max(0.0, energy_kwh - accounted_energy)),
            "tokens": {p: tokens.get(p, 0.0) if has_tokens else None for p in TOKEN_PHASES},
            "energy_per_token_joules": {p: _ratio(phase_energy.get(p), tokens.get(p)) for p in TOKEN_PHASES},
            "phase_share_series": series,
        }

    # ---- per service -------------------------------------------------------------------------
    def _services(self) -> list[dict[str, Any]]:
        seconds: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        cost: dict[str, list[float | None]] = defaultdict(list)
        energy: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        gpus: dict[str, set] = defaultdict(set)
        # tokens[service][(instance, phase)] -> the per-GPU counts, to find tensor-parallel groups
        tokens: dict[str, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
        price_of = {(g["instance"], g["gpu"], g["uuid"]): g["price_per_hour"] for g in self.gpus}
        for key, price in price_of.items():
            for bucket in self.data.buckets.get("phase_seconds", {}).get(key, []):
                for (phase, service), value in bucket.items():
                    seconds[service][phase] += value
                    gpus[service].add(key)
                    cost[service].append(_times(_hours(value), price))
            for (phase, service), value in self._total("phase_energy", key).items():
                energy[service][phase] += value
            for (phase, service), value in self._total("tokens", key).items():
                tokens[service][(key[0], phase)].append(value)
        out = []
        for service in sorted(seconds):
            phase_hours = {p: _hours(seconds[service].get(p, 0.0)) for p in PHASES}
            gpu_hours = sum(phase_hours.values())
            service_tokens = _group_tokens(tokens.get(service, {}))
            total_cost = _sum_known(cost[service]) if all(c is not None for c in cost[service]) else None
            busy = gpu_hours - phase_hours["idle"]
            out.append({
                "service": service,
                "gpus": len(gpus[service]),
                "hosts": len({key[0] for key in gpus[service]}),
                "gpu_hours": gpu_hours,
                "phase_hours": phase_hours,
                "tokens": service_tokens,
                "cost": total_cost,
                "cost_per_million_tokens": _cost_per_million(total_cost, phase_hours, service_tokens),
                "energy_kwh": sum(energy[service].values()) / JOULES_PER_KWH,
                "energy_per_token_joules": {p: _ratio(energy[service].get(p), service_tokens[p]) for p in TOKEN_PHASES},
                "busy_share": _ratio(busy, gpu_hours),
                "mixed_share": _ratio(phase_hours["mixed"], busy),
            })
        return out

    # ---- fleet -------------------------------------------------------------------------------
    def _fleet(self) -> dict[str, Any]:
        gpus = self.gpus
        by_host: dict[str, list[float | None]] = defaultdict(list)
        for g in gpus:
            by_host[g["instance"]].append(g["idle_cost"]["total"])

        return {
            "hosts": len({g["instance"] for g in gpus}),
            "gpus": len(gpus),
            "gpu_hours": sum(g["hours"] for g in gpus),
            "phase_hours": {p: sum(g["phase_hours"][p] for g in gpus) for p in (*PHASES, "unknown")},
            "idle_gpu_hours": {k: _sum_known(g["idle_gpu_hours"][k] for g in gpus) or 0.0 for k in IDLE_KINDS},
            "idle_cost": {k: _sum_known(g["idle_cost"][k] for g in gpus) for k in IDLE_KINDS},
            "cost": _sum_known(g["cost"] for g in gpus),
            "energy_kwh": sum(g["energy_kwh"] for g in gpus),
            "bandwidth_bound_hours": sum(g["bandwidth_bound_hours"] for g in gpus),
            "tokens": {p: _sum_known(s["tokens"][p] for s in self.services) for p in TOKEN_PHASES},
            "monthly_savings": None,  # filled in once the recommendations are made
            "idle_cost_by_host": {host: _sum_known(costs) for host, costs in sorted(by_host.items())},
        }


def _group_tokens(per_host_phase: dict[tuple, list[float]]) -> dict[str, float | None]:
    """A service's tokens by phase: per host, GPUs with identical counts are one tensor-parallel
    group (the agent counts a request on each GPU of its group) and count once; distinct counts
    are separate replicas and add up."""
    if not per_host_phase:
        return {p: None for p in TOKEN_PHASES}
    out = {p: 0.0 for p in TOKEN_PHASES}
    for (_instance, phase), counts in per_host_phase.items():
        groups: list[float] = []
        for count in sorted(counts):
            if not groups or abs(count - groups[-1]) > SAME_GROUP_TOLERANCE * max(abs(count), 1.0):
                groups.append(count)
        out[phase] = out.get(phase, 0.0) + sum(groups)
    return out


def _cost_per_million(cost: float | None, hours: dict[str, float], tokens: dict[str, float | None]) -> dict:
    """The service's whole cost (idle included: that is what its tokens really cost) split
    between prefill and decode by their busy time, mixed time halved between them."""
    busy = {p: hours[p] + hours["mixed"] / 2 for p in TOKEN_PHASES}
    whole = sum(busy.values())
    out = {}
    for phase in TOKEN_PHASES:
        share = _ratio(busy[phase], whole)
        phase_cost = _times(cost, share)
        count = tokens.get(phase)
        out[phase] = phase_cost / count * 1e6 if phase_cost is not None and count else None
    return out
