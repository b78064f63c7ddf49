"""Fleet overview: what every GPU is doing (by serving phase), what the idle ones cost, which ones
are short of memory or bandwidth, and which are failing."""

from __future__ import annotations

from gpuphase.alerts import rules
from gpuphase.dashboards.common import HOST, RULES, application_xids, instance_variable, matcher, sel
from gpuphase.dashboards.grafana import Dashboard, Query, Threshold, row, stat, textbox_variable, timeseries
from gpuphase.model.durations import format_duration

STATES = ("idle", "prefill", "decode", "mixed", "unknown")
_STATE_COLORS = {"idle": "orange", "prefill": "blue", "decode": "purple", "mixed": "green", "unknown": "text"}
_WINDOW = f"[{format_duration(RULES.activity_window)}]"
_IDLE_RATIO = f"{rules.IDLE_RATIO}{format_duration(RULES.rate_window)}"
_STATE = f"{rules.GPU_STATE}{format_duration(RULES.state_window)}"


def _state_stat(state: str) -> object:
    return stat(
        f"{state.capitalize()} GPUs",
        Query(f"count({sel(_STATE, HOST, matcher('state', '=', state))}) or vector(0)"),
        unit="none", base_color=_STATE_COLORS[state],
        description=f"GPUs whose largest phase over the last minute is {state}"
        + (" (no service mapped, so no phase accounting)." if state == "unknown" else "."),
    )


def _bandwidth_bound() -> str:
    return (
        f"avg_over_time({sel('gpu_dram_active_ratio', HOST)}{_WINDOW}) >= {RULES.bandwidth_dram_min:g}\n"
        f"and\navg_over_time({sel('gpu_tensor_active_ratio', HOST)}{_WINDOW}) <= {RULES.bandwidth_tensor_max:g}"
    )


def _memory_share() -> str:
    return f"{sel('gpu_memory_used_bytes', HOST)} / {sel('gpu_memory_total_bytes', HOST)}"


def build() -> Dashboard:
    idle_hours = f"sum(avg_over_time({sel(_IDLE_RATIO, HOST)}[$__range])) * $__range_s / 3600"
    states = row(
        "GPUs by state",
        stat("GPUs", Query(f"count({sel('gpu_up', HOST)})"), unit="none", description="GPUs the agents report."),
        *(_state_stat(s) for s in STATES),
        timeseries(
            "GPUs by state", Query(f"count by (state) ({sel(_STATE, HOST)})", "{{state}}"),
            unit="none", min=0, stacked=True, width=24,
            description="Each GPU counted in the phase holding the largest share of its last minute.",
        ),
    )
    cost = row(
        "Idle GPUs and their cost",
        stat("Idle GPUs now", Query(f"sum({sel(_IDLE_RATIO, HOST)})"), unit="none", width=6,
             thresholds=(Threshold(1, "orange"),),
             description="Sum of every GPU's idle share over the last 5 minutes: the idle GPU-hours accrued per hour."),
        stat("Idle GPU-hours (time range)", Query(idle_hours), unit="h", width=6,
             thresholds=(Threshold(1, "orange"),),
             description="Idle GPU time within the dashboard's time range: phase 'idle' where a service is "
                         f"mapped, activity below {RULES.idle_threshold:.0%} elsewhere."),
        stat("Cost of idle GPU-hours (time range)", Query(f"{idle_hours} * $gpu_hour_price"), unit="currencyUSD",
             width=6, thresholds=(Threshold(100, "orange"), Threshold(1000, "red")),
             description="Idle GPU-hours times the price per GPU-hour set in the dashboard variable."),
        stat("Idle share of fleet", Query(f"avg({sel(_IDLE_RATIO, HOST)})"), unit="percentunit", width=6,
             min=0, max=1, thresholds=(Threshold(0.3, "orange"), Threshold(0.6, "red"))),
        timeseries("Idle GPUs by host", Query(f"sum by (instance) ({sel(_IDLE_RATIO, HOST)})", "{{instance}}"),
                   unit="none", min=0, stacked=True, width=24),
    )
    memory = row(
        "Under-memoried GPUs",
        stat("Bandwidth-bound GPUs", Query(f"count(\n{_bandwidth_bound()}\n) or vector(0)"), unit="none",
             thresholds=(Threshold(1, "orange"),), width=6,
             description=f"DRAM bandwidth use at least {RULES.bandwidth_dram_min:.0%} while tensor activity is at "
                         f"most {RULES.bandwidth_tensor_max:.0%} (5-minute averages): compute waiting on memory."),
        stat("GPUs with VRAM nearly full", Query(f"count({_memory_share()} >= {RULES.memory_full_ratio:g}) or vector(0)"),
             unit="none", thresholds=(Threshold(1, "orange"),), width=6),
        stat("Fleet energy per decode token",
             Query('phase:gpu_phase_energy_per_token_joules:ratio_rate5m{phase="decode"}'),
             unit="joule", width=6, description="All hosts: decode energy over output tokens, last 5 minutes."),
        stat("Fleet energy per prefill token",
             Query('phase:gpu_phase_energy_per_token_joules:ratio_rate5m{phase="prefill"}'),
             unit="joule", width=6, description="All hosts: prefill energy over prompt tokens, last 5 minutes."),
        timeseries("DRAM bandwidth use", Query(f"avg_over_time({sel('gpu_dram_active_ratio', HOST)}{_WINDOW})",
                                               "{{instance}} gpu {{gpu}}"),
                   unit="percentunit", min=0, max=1, thresholds=(Threshold(RULES.bandwidth_dram_min, "red"),),
                   description="High while tensor activity is low means decode waits on HBM bandwidth."),
        timeseries("VRAM used", Query(_memory_share(), "{{instance}} gpu {{gpu}}"),
                   unit="percentunit", min=0, max=1, thresholds=(Threshold(RULES.memory_full_ratio, "red"),)),
    )
    errors = row(
        "Errors",
        stat("Lost GPUs", Query(f"count({sel('gpu_up', HOST)} == 0) or vector(0)"), unit="none", width=6,
             thresholds=(Threshold(1, "red"),)),
        stat("Hardware XIDs (time range)",
             Query(f"sum(increase({sel('gpu_xid_errors_total', HOST, matcher('xid', '!~', application_xids()))}[$__range]))"
                   " or vector(0)"),
             unit="none", width=6, thresholds=(Threshold(1, "red"),),
             description="XIDs other than the usual application errors (13, 31, 43, 45, 68)."),
        stat("Uncorrectable ECC errors",
             Query(f"sum({sel('gpu_ecc_errors_total', HOST, matcher('type', '=', 'uncorrectable'))}) or vector(0)"),
             unit="none", width=6, thresholds=(Threshold(1, "red"),)),
        stat("Thermally throttled GPUs",
             Query(f"count(max without (reason) ({sel('gpu_clock_event_active', HOST, _thermal())}) == 1)"
                   " or vector(0)"),
             unit="none", width=6, thresholds=(Threshold(1, "orange"),)),
    )
    return Dashboard(
        uid="gpuphase-fleet",
        title="gpuphase / Fleet overview",
        description="What the GPUs do by serving phase, what idle ones cost, memory pressure and errors.",
        rows=(states, cost, memory, errors),
        variables=(instance_variable(),
                   textbox_variable("gpu_hour_price", "Price per GPU-hour (USD)", "2.50")),
        time_from="now-24h",
    )


def _thermal() -> str:
    return matcher("reason", "=~", "|".join(RULES.thermal_reasons))
