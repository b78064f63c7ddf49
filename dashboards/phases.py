"""Serving phases: how the GPUs' time splits into prefill, decode, mixed and idle, how busy each
phase keeps SMs, tensor cores and DRAM, and what a token costs in energy in each phase."""

from __future__ import annotations

from gpuphase.dashboards import grafana
from gpuphase.dashboards.common import GPU, gpu_variable, instance_variable, sel
from gpuphase.dashboards.grafana import Dashboard, Query, row, timeseries

PHASES = 'instance=~"$instance", gpu=~"$gpu", service=~"$service"'
_RATE = "[$__rate_interval]"
TOKEN_PHASES = 'phase=~"prefill|decode"'


def _phase_rate(metric: str, by: str = "phase", extra: str = "") -> str:
    return f"sum by ({by}) (rate({sel(metric, PHASES, extra)}{_RATE}))"


def _per_phase_average(numerator: str) -> str:
    """The phase's average of an activity: rate of its integral over rate of the time in the phase."""
    return f"{_phase_rate(numerator)}\n/\n({_phase_rate('gpu_phase_seconds_total')} > 0)"


def _activity(title: str, metric: str, description: str) -> object:
    return timeseries(title, Query(_per_phase_average(metric), "{{phase}}"), unit="percentunit", min=0, max=1,
                      width=8, description=description)


def build() -> Dashboard:
    time_share = (
        f"{_phase_rate('gpu_phase_seconds_total')}\n/ ignoring (phase) group_left\n"
        f"sum(rate({sel('gpu_phase_seconds_total', PHASES)}{_RATE}))"
    )
    time_row = row(
        "Where the time goes",
        timeseries("Time share per phase", Query(time_share, "{{phase}}"), unit="percentunit", min=0, max=1,
                   stacked=True, description="Share of the selected GPUs' time in each phase."),
        timeseries("Busy GPUs per phase and service",
                   Query(_phase_rate("gpu_phase_seconds_total", "service, phase", 'phase!="idle"'),
                         "{{service}} {{phase}}"),
                   unit="none", min=0, stacked=True,
                   description="GPU-seconds per second: 2 means two GPUs' worth of time in that phase."),
    )
    activity_row = row(
        "Activity per phase",
        _activity("SM active by phase", "gpu_phase_sm_active_seconds_total", "GPM SM activity averaged within each phase."),
        _activity("Tensor active by phase", "gpu_phase_tensor_active_seconds_total",
                  "Prefill keeps the tensor cores busy; decode leaves them waiting."),
        _activity("DRAM bandwidth by phase", "gpu_phase_dram_active_seconds_total",
                  "Decode near the top means the memory wall: more bandwidth (or fewer bytes) buys tokens."),
    )
    energy_per_token = (
        f"{_phase_rate('gpu_phase_energy_joules_total', extra=TOKEN_PHASES)}\n/\n"
        f"({_phase_rate('gpu_phase_tokens_total', extra=TOKEN_PHASES)} > 0)"
    )
    energy_row = row(
        "Tokens and energy",
        timeseries("Tokens/s by phase and service",
                   Query(_phase_rate("gpu_phase_tokens_total", "service, phase"), "{{service}} {{phase}}"),
                   unit="short", min=0, description="Prompt tokens in prefill, output tokens in decode."),
        timeseries("Energy per token by phase", Query(energy_per_token, "{{phase}}"), unit="joule", min=0,
                   description="Energy attributed to the phase over its tokens."),
        timeseries("Average power by phase",
                   Query(f"{_phase_rate('gpu_phase_energy_joules_total')}\n/\n"
                         f"({_phase_rate('gpu_phase_seconds_total')} > 0)", "{{phase}}"),
                   unit="watt", min=0, description="Energy in the phase over the time in it, per GPU."),
        timeseries("Span recency",
                   Query(f"time() - {sel('gpu_phase_last_span_timestamp_seconds', PHASES)}",
                         "{{instance}} gpu {{gpu}} {{service}}"),
                   unit="s", min=0, description="Age of the newest span per GPU; GpuPhaseSpansMissing watches it."),
    )
    return Dashboard(
        uid="gpuphase-phases",
        title="gpuphase / Serving phases",
        description="Prefill, decode, mixed and idle time, activity and energy per token of LLM-serving GPUs.",
        rows=(time_row, activity_row, energy_row),
        variables=(instance_variable(), gpu_variable(),
                   grafana.query_variable("service", "Service",
                                          f"label_values({sel('gpu_phase_seconds_total', GPU)}, service)")),
        time_from="now-3h",
    )
