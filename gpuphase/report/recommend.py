"""Recommendations: what to do about the waste the figures show, each with its evidence (the
figure and the PromQL behind it) and an estimated monthly saving, sorted by saving.

A saving is the share of the range a GPU was wasted, times its price, over a month (730 h): it
assumes the range is typical. Where no figure supports a money estimate the saving is null and
the option says what it rests on; nothing is claimed without its evidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpuphase.alerts import rules
from gpuphase.model.durations import format_duration
from gpuphase.report.collect import record_name
from gpuphase.report.prices import PriceBook

HOURS_PER_MONTH = 730.0


@dataclass(frozen=True)
class Thresholds:
    unused_share: float = 0.9  # no process this share of the time: reclaim the GPU
    allocated_idle_share: float = 0.5  # held but idle this share: consolidate
    bandwidth_bound_share: float = 0.25  # bound this share of the time: a decode problem
    mixed_share: float = 0.3  # of busy time in mixed batches: consider disaggregation
    min_busy_hours: float = 0.01  # below this a service's mixed share means nothing
    power_cap_energy_saving: float = 0.2  # low end of the 20-40% decode energy published


class Recommender:
    def __init__(self, report_range: float, step: float, matchers: str, prices: PriceBook,
                 thresholds: Thresholds = Thresholds()):
        self.range = format_duration(int(report_range)) if report_range >= 1 else f"{report_range}s"
        self.step = step
        self.matchers = matchers
        self.prices = prices
        self.t = thresholds

    # ---- evidence ----------------------------------------------------------------------------
    def _selector(self, *matchers: str) -> str:
        return "{" + ", ".join(([self.matchers] if self.matchers else []) + list(matchers)) + "}"

    def _gpu_selector(self, gpu: dict[str, Any], *matchers: str) -> str:
        return self._selector(f'instance="{_quote(gpu["instance"])}"', f'gpu="{_quote(gpu["gpu"])}"', *matchers)

    def _hours_evidence(self, name: str, value: float, prefix: str, gpu: dict[str, Any]) -> dict[str, Any]:
        expr = f"sum_over_time({record_name(prefix, self.step)}{self._gpu_selector(gpu)}[{self.range}]) / 3600"
        return {"name": name, "value": round(value, 4), "unit": "h", "promql": expr}

    def _observed(self, gpu: dict[str, Any]) -> dict[str, Any]:
        return self._hours_evidence("hours observed", gpu["hours"], rules.REPORT_OBSERVED, gpu)

    # ---- the recommendations -----------------------------------------------------------------
    def recommend(self, gpus: list[dict[str, Any]], services: list[dict[str, Any]]) -> list[dict[str, Any]]:
        found = []
        for gpu in gpus:
            found += [r for r in (self._unused(gpu), self._idle(gpu), self._bandwidth(gpu)) if r]
        found += [r for r in (self._mixed(service) for service in services) if r]
        order = {"reclaim_unused": 0, "consolidate_idle": 1, "bandwidth_bound_decode": 2,
                 "disaggregate_prefill_decode": 3}
        return sorted(found, key=lambda r: (r["monthly_savings"] is None, -(r["monthly_savings"] or 0.0),
                                            order[r["kind"]]))

    def _monthly(self, share: float, gpu: dict[str, Any]) -> float | None:
        price = gpu["price_per_hour"]
        return round(share * price * HOURS_PER_MONTH, 2) if price is not None else None

    def _unused(self, gpu: dict[str, Any]) -> dict[str, Any] | None:
        hours = gpu["idle_gpu_hours"]["unused"] or 0.0
        share = hours / gpu["hours"]
        if share < self.t.unused_share:
            return None
        return {
            "kind": "reclaim_unused",
            "target": _gpu_target(gpu),
            "summary": f"GPU {gpu['gpu']} on {gpu['instance']} had no process and no work {share:.0%} of "
                       f"{gpu['hours']:.2f} h observed: give it back, or schedule work on it.",
            "evidence": [self._hours_evidence("unused hours", hours, rules.REPORT_UNUSED, gpu), self._observed(gpu)],
            "monthly_savings": self._monthly(share, gpu),
        }

    def _idle(self, gpu: dict[str, Any]) -> dict[str, Any] | None:
        hours = gpu["idle_gpu_hours"]["allocated"] or 0.0
        share = hours / gpu["hours"]
        if share < self.t.allocated_idle_share:
            return None
        held_by = ", ".join(gpu["services"]) or "a process"
        return {
            "kind": "consolidate_idle",
            "target": _gpu_target(gpu, gpu["services"]),
            "summary": f"GPU {gpu['gpu']} on {gpu['instance']} was held by {held_by} but idle {share:.0%} of "
                       f"{gpu['hours']:.2f} h: scale that server down or consolidate it onto busier GPUs.",
            "evidence": [self._hours_evidence("allocated idle hours", hours, rules.REPORT_IDLE_ALLOCATED, gpu),
                         self._observed(gpu)],
            "monthly_savings": self._monthly(share, gpu),
        }

    def _bandwidth(self, gpu: dict[str, Any]) -> dict[str, Any] | None:
        hours = gpu["bandwidth_bound_hours"]
        share = hours / gpu["hours"]
        if share < self.t.bandwidth_bound_share:
            return None
        phases = gpu["phase_hours"]
        decode_hours = phases["decode"] + phases["mixed"] / 2
        decode_share = decode_hours / gpu["hours"]
        evidence = [self._hours_evidence("bandwidth-bound hours", hours, rules.REPORT_BANDWIDTH_BOUND, gpu),
                    self._observed(gpu)]
        for name, prefix, value in (("DRAM active", rules.REPORT_DRAM, gpu["dram_active"]),
                                    ("tensor active", rules.REPORT_TENSOR, gpu["tensor_active"])):
            if value is not None:
                evidence.append({"name": name, "value": round(value, 4), "unit": "ratio",
                                 "promql": f"avg_over_time({record_name(prefix, self.step)}{self._gpu_selector(gpu)}"
                                           f"[{self.range}])"})
        if gpu["services"]:
            seconds = record_name(rules.REPORT_PHASE_SECONDS, self.step)
            decode = self._gpu_selector(gpu, 'phase="decode"')
            evidence.append({"name": "decode hours", "value": round(phases["decode"], 4), "unit": "h",
                             "promql": f"sum(sum_over_time({seconds}{decode}[{self.range}])) / 3600"})
        options = [self._richer_gpu(gpu, decode_share),
                   {"action": "larger decode batches",
                    "detail": f"tensor cores were active {_pct(gpu['tensor_active'])} of the time: each decode step "
                              "reads the weights once for the whole batch, so more concurrent requests per GPU "
                              "(max-num-seqs, KV-cache room) buy tokens at little extra bandwidth",
                    "monthly_savings": None},
                   {"action": "quantize weights or KV cache (FP8)",
                    "detail": "halves the bytes each decoded token reads; the throughput gain depends on the model "
                              "and batch, so it is not priced here",
                    "monthly_savings": None},
                   self._power_cap(gpu, decode_share)]
        money = [o["monthly_savings"] for o in options if o["monthly_savings"] is not None]
        where = " in decode" if gpu["services"] else ""
        return {
            "kind": "bandwidth_bound_decode",
            "target": _gpu_target(gpu, gpu["services"]),
            "summary": f"GPU {gpu['gpu']} on {gpu['instance']} waited on memory bandwidth{where} {share:.0%} of "
                       f"{gpu['hours']:.2f} h (DRAM {_pct(gpu['dram_active'])} busy, tensor cores "
                       f"{_pct(gpu['tensor_active'])}).",
            "evidence": evidence,
            "options": options,
            "monthly_savings": max(money) if money else None,
        }

    def _richer_gpu(self, gpu: dict[str, Any], decode_share: float) -> dict[str, Any]:
        """Decode time scales with memory bandwidth: a model with bandwidth B' at price P' does the
        same decode for (P'/P) x (B/B') of the cost."""
        own_bw, own_price = self.prices.bandwidth_tbps(gpu["model"]), gpu["price_per_hour"]
        option = {"action": "a bandwidth-richer GPU model", "monthly_savings": None}
        if own_bw is None or own_price is None:
            option["detail"] = (f"give {gpu['model'] or 'this model'}'s memory_bandwidth_tbps and gpu_hour in a "
                                "--price.file, with the models you could move to, to compare them")
            return option
        best = None
        for name, entry in self.prices.models.items():
            price = entry.gpu_hour if entry.gpu_hour is not None else self.prices.default.gpu_hour
            if entry.memory_bandwidth_tbps is None or price is None or entry.memory_bandwidth_tbps <= own_bw:
                continue
            factor = (price / own_price) * (own_bw / entry.memory_bandwidth_tbps) if own_price else None
            if factor is not None and (best is None or factor < best[1]):
                best = (name, factor, entry.memory_bandwidth_tbps, price)
        if best is None:
            option["detail"] = "no model in the price file has more memory bandwidth at a known price"
            return option
        name, factor, bandwidth, price = best
        saving = decode_share * own_price * HOURS_PER_MONTH * (1 - factor)
        option["detail"] = (f"{name} ({bandwidth:g} TB/s at {price:g}/h against {own_bw:g} TB/s at "
                            f"{own_price:g}/h): decode costs x{factor:.2f}")
        option["monthly_savings"] = round(saving, 2) if saving > 0 else None
        if saving <= 0:
            option["detail"] += ", no saving"
        return option

    def _power_cap(self, gpu: dict[str, Any], decode_share: float) -> dict[str, Any]:
        decode_kwh = gpu["energy_kwh_by_phase"]["decode"] or gpu["energy_kwh"] * decode_share
        kwh = decode_kwh / gpu["hours"] * HOURS_PER_MONTH * self.t.power_cap_energy_saving
        money = None if self.prices.energy_kwh is None else round(kwh * self.prices.energy_kwh, 2)
        return {"action": "cap decode power (nvidia-smi -pl, or a decode-only power limit)",
                "detail": "published measurements: decode energy falls 20-40% under a power cap at little latency "
                          f"cost; {self.t.power_cap_energy_saving:.0%} of this GPU's decode energy is "
                          f"{kwh:.1f} kWh a month" + ("" if money is not None else
                                                       " (give energy_kwh in a --price.file to price it)"),
                "monthly_savings": money, "monthly_kwh_saved": round(kwh, 3)}

    def _mixed(self, service: dict[str, Any]) -> dict[str, Any] | None:
        share = service["mixed_share"]
        busy = service["gpu_hours"] - service["phase_hours"]["idle"]
        if share is None or busy < self.t.min_busy_hours or share < self.t.mixed_share:
            return None
        seconds = record_name(rules.REPORT_PHASE_SECONDS, self.step)
        mixed = self._selector(f'service="{_quote(service["service"])}"', 'phase="mixed"')
        working = self._selector(f'service="{_quote(service["service"])}"', 'phase!="idle"')
        return {
            "kind": "disaggregate_prefill_decode",
            "target": {"service": service["service"]},
            "summary": f"{service['service']} spent {share:.0%} of its busy GPU time in mixed prefill+decode "
                       "batches, where prompts stall running decodes: consider separate prefill and decode "
                       "pools (disaggregated serving) or chunked prefill limits.",
            "evidence": [{"name": "mixed share of busy time", "value": round(share, 4), "unit": "ratio",
                          "promql": f"sum(sum_over_time({seconds}{mixed}[{self.range}]))\n/\n"
                                    f"sum(sum_over_time({seconds}{working}[{self.range}]))"},
                         {"name": "busy GPU-hours", "value": round(busy, 4), "unit": "h",
                          "promql": f"sum(sum_over_time({seconds}{working}[{self.range}])) / 3600"}],
            "monthly_savings": None,
        }


def _gpu_target(gpu: dict[str, Any], services: list[str] = ()) -> dict[str, str]:
    target = {"instance": gpu["instance"], "gpu": gpu["gpu"], "uuid": gpu["uuid"]}
    if len(services) == 1:
        target["service"] = services[0]
    return target


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


