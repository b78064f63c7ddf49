"""gpuphase's Prometheus rules as code: one source for every alert and recording rule.

    python -m gpuphase.alerts.rules                       write alerts/gpuphase-rules.yaml
    python -m gpuphase.alerts.rules --check               exit 1 if the committed file is stale (CI)
    python -m gpuphase.alerts.rules --for-scale 0.01 --scrape-interval 1s -o /tmp/fast.yaml
                                                 every alert window 100x shorter (end-to-end tests)
    python -m gpuphase.alerts.rules --set idle_threshold=0.1 --set idle_for=1h -o my-rules.yaml

Thresholds and windows live in `RuleConfig` below (kubernetes-mixin style): change them there or
with --set, never by editing the generated YAML. Windows marked `scaled` shrink with --for-scale;
the rate windows of the recording rules do not, because they exist to hold enough scrapes for a
rate(), which a faster test does not change (set them with --set state_window=... if needed).
The scaled windows that are ranges of a rate() or *_over_time() (`range_`) shrink no further than
RANGE_SCRAPES scrapes of --scrape-interval: a 3 s range over a 5 s scrape holds at most one sample,
and the rule, silently, never fires.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpuphase.model.durations import format_duration, parse_duration

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "gpuphase-rules.yaml"


def window_seconds(text: str) -> int:
    """A rule window in whole seconds ('1h30m' -> 5400): sub-second alert windows mean nothing."""
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 30m, 6h)") from None
    if seconds != int(seconds):
        raise ValueError(f"not a whole number of seconds: {text!r}")
    return int(seconds)


# Prometheus' own advice for rate(): a range of at least four scrape intervals, so that one missed
# scrape still leaves the two samples a rate needs.
RANGE_SCRAPES = 4
DEFAULT_SCRAPE_INTERVAL = window_seconds("15s")


def _duration(default: str, *, scaled: bool = True, range_: bool = False) -> Any:
    """A window in whole seconds, written like Prometheus ("30m"); `scaled` ones follow --for-scale;
    `range_` ones are the range of a rate() or *_over_time() and keep RANGE_SCRAPES scrapes."""
    return field(default=window_seconds(default), metadata={"duration": True, "scaled": scaled, "range": range_})


# --------------------------------------------------------------------------------------------
# Configuration: every threshold and window of the rules. Durations are seconds.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RuleConfig:
    # Where each alert's runbook lives; the anchor is the lower-cased alert name.
    runbook_base: str = "https://github.com/gpuphase/gpuphase/blob/main/docs/runbooks.md"
    # Label matchers selecting the agent's scrape targets in `up` (GpuAgentDown). The default
    # matches a job named gpuphase as well as Prometheus Operator's "<namespace>/gpuphase..." jobs.
    agent_selector: str = 'job=~".*gpuphase.*"'

    # Activity: SM active (GPM) where the GPU has it, NVML utilization.gpu elsewhere, averaged
    # over activity_window so that the gaps between requests of a busy GPU never look idle.
    idle_threshold: float = 0.05
    activity_window: int = _duration("5m", range_=True)
    idle_for: int = _duration("30m")  # GpuIdleAllocated: processes hold an idle GPU this long
    unused_for: int = _duration("6h")  # GpuUnused: no process and no work this long

    # GpuMemoryBandwidthBound: DRAM saturated while the tensor cores wait (the memory wall).
    bandwidth_dram_min: float = 0.8
    bandwidth_tensor_max: float = 0.3
    bandwidth_window: int = _duration("5m", range_=True)
    bandwidth_for: int = _duration("15m")
    # On GPUs with phase accounting, only fire when these phases hold most of the busy time.
    bandwidth_phases: str = "decode"
    bandwidth_phase_share_min: float = 0.5

    memory_full_ratio: float = 0.95
    memory_full_for: int = _duration("15m")

    # XIDs that are usually the application's fault (illegal address, MMU fault, ...), not the GPU's.
    application_xids: tuple[str, ...] = ("13", "31", "43", "45", "68")
    xid_window: int = _duration("5m", range_=True)

    thermal_reasons: tuple[str, ...] = ("sw_thermal_slowdown", "hw_thermal_slowdown")
    thermal_window: int = _duration("10m", range_=True)
    thermal_share_min: float = 0.25  # share of thermal_window spent throttled
    thermal_for: int = _duration("5m")

    lost_for: int = _duration("1m")
    agent_down_for: int = _duration("5m")
    collector_failing_for: int = _duration("10m")

    spans_missing_after: int = _duration("10m")  # newest span older than this on a busy GPU
    spans_missing_for: int = _duration("5m")

    # Recording rules. state_window: the phase a GPU is "in" is its largest phase-time rate here.
    state_window: int = _duration("1m", scaled=False)
    rate_window: int = _duration("5m", scaled=False)

    # Scaling signals: the desired GPU count of a service keeps its busy share at this target.
    scaling_target_busy_share: float = 0.7
    # `gpuphase report`'s pre-aggregation: every report_step, what each GPU did in that step. The
    # report sums these, so a 30-day range reads 8,640 samples a series instead of 172,800 scrapes.
    report_step: int = _duration("5m", scaled=False)

    def scaled(self, factor: float, scrape_interval: int = DEFAULT_SCRAPE_INTERVAL) -> "RuleConfig":
        """The same rules with every scaled window multiplied by factor (at least 1 s; a range at
        least RANGE_SCRAPES x scrape_interval, the scrape interval of the Prometheus that runs them)."""
        if factor <= 0 or scrape_interval <= 0:
            raise ValueError("the scale factor and the scrape interval must be positive")
        changes = {
            f.name: max(RANGE_SCRAPES * scrape_interval if f.metadata.get("range") else 1,
                        round(getattr(self, f.name) * factor))
            for f in dataclasses.fields(self)
            if f.metadata.get("scaled")
        }
        return dataclasses.replace(self, **changes)

    def with_overrides(self, assignments: list[str]) -> "RuleConfig":
        """Apply NAME=VALUE strings; VALUE is parsed by the field's type (durations like 90s)."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        changes: dict[str, Any] = {}
        for assignment in assignments:
            name, sep, raw = assignment.partition("=")
            if not sep or name not in fields:
                raise ValueError(f"--set {assignment!r}: expected NAME=VALUE with NAME one of {sorted(fields)}")
            changes[name] = _parse_value(fields[name], getattr(self, name), raw)
        return dataclasses.replace(self, **changes)


def _parse_value(spec: dataclasses.Field, current: Any, raw: str) -> Any:
    if spec.metadata.get("duration"):
        return window_seconds(raw)
    if isinstance(current, tuple):
        return tuple(item.strip() for item in raw.split(",") if item.strip())
    if isinstance(current, float):
        return float(raw)
    return raw


# --------------------------------------------------------------------------------------------
# Expression building blocks
# --------------------------------------------------------------------------------------------
def activity(window: int) -> str:
    """Average GPU activity over window: GPM SM activity, or utilization.gpu where GPM is absent.

    `or` matches on the full label set, so a GPU with gpu_sm_active_ratio never also takes the
    utilization branch; comparisons go outside the parentheses so a GPM GPU that is busy is not
    replaced by its (possibly low) utilization reading.
    """
    w = format_duration(window)
    return (
        f"(\n  avg_over_time(gpu_sm_active_ratio[{w}])\n  or\n"
        f"  avg_over_time(gpu_utilization_ratio[{w}])\n)"
    )


def bandwidth_bound(c: "RuleConfig", window: int) -> str:
    """GPUs whose DRAM was saturated while the tensor cores waited over window (the memory wall);
    on GPUs with phase accounting only while the memory-bound phases held most of the busy time.
    Value: the DRAM activity. Shared by GpuMemoryBandwidthBound and the report's bound hours."""
    w = format_duration(window)
    phase_busy = (
        f"sum without (phase, service) (rate(gpu_phase_seconds_total{{phase=~\"{c.bandwidth_phases}\"}}[{w}]))\n"
        f"/\nsum without (phase, service) (rate(gpu_phase_seconds_total{{phase!=\"idle\"}}[{w}]))\n"
        f">= {c.bandwidth_phase_share_min:g}"
    )
    return (
        "(\n"
        f"  avg_over_time(gpu_dram_active_ratio[{w}]) >= {c.bandwidth_dram_min:g}\n"
        "  and\n"
        f"  avg_over_time(gpu_tensor_active_ratio[{w}]) <= {c.bandwidth_tensor_max:g}\n"
        ")\n"
        "# GPUs with phase accounting count only while the memory-bound phases dominate.\n"
        "unless\n"
        "(\n"
        "  group without (phase, service) (gpu_phase_seconds_total)\n"
        "  unless\n"
        f"  (\n{_indent(phase_busy, 4)}\n  )\n"
        ")"
    )


def idle_share(c: "RuleConfig", window: int) -> str:
    """Idle share of each GPU over window: the idle phase where phases are accounted, low activity
    (all or nothing) elsewhere. Summed over GPUs it is the number of idle GPUs."""
    return (
        f'sum without (phase, service) (rate(gpu_phase_seconds_total{{phase="idle"}}[{format_duration(window)}]))\n'
        f"or\n{activity(window)} < bool {c.idle_threshold:g}"
    )


def _regex(values: tuple[str, ...]) -> str:
    return "|".join(values)


def _indent(expr: str, spaces: int = 2) -> str:
    return "\n".join(" " * spaces + line for line in expr.splitlines())


def _runbook(config: RuleConfig, alert: str) -> str:
    return f"{config.runbook_base}#{alert.lower()}"


def _pct(ratio: float) -> str:
    return f"{ratio * 100:g}%"


# Fragments of annotation text (Go templates, hence no f-strings around the braces).
_GPU = "GPU {{ $labels.gpu }} ({{ $labels.uuid }}) on {{ $labels.instance }}"
_VALUE_PCT = "{{ $value | humanizePercentage }}"


def _alert(config: RuleConfig, name: str, expr: str, for_: int, severity: str, summary: str,
           description: str) -> dict[str, Any]:
    rule: dict[str, Any] = {"alert": name, "expr": expr}
    if for_:
        rule["for"] = format_duration(for_)
    rule["labels"] = {"severity": severity}
    rule["annotations"] = {
        "summary": summary,
        "description": description,
        "runbook_url": _runbook(config, name),
    }
    return rule


# --------------------------------------------------------------------------------------------
# Alerts. Severity policy (docs/alerts.md): page = hardware is failing or gone, act now;
# warning = degraded or blind, act today; info = cost and efficiency, review in working hours.
# --------------------------------------------------------------------------------------------
def cost_alerts(c: RuleConfig) -> list[dict[str, Any]]:
    act = activity(c.activity_window)
    aw = format_duration(c.activity_window)
    idle_allocated = _alert(
        c, "GpuIdleAllocated",
        f"{act} < {c.idle_threshold:g}\nand\ngpu_processes > 0",
        c.idle_for, "info",
        "GPU is allocated to a process but idle",
        f"{_GPU} is held by a process but its {aw} average activity has stayed below "
        f"{_pct(c.idle_threshold)} for {format_duration(c.idle_for)} (now {_VALUE_PCT}). "
        "A paid-for GPU doing nothing: consolidate, scale down or release it.",
    )
    unused = _alert(
        c, "GpuUnused",
        f"{act} < {c.idle_threshold:g}\nand\nmax_over_time(gpu_processes[{aw}]) == 0",
        c.unused_for, "info",
        "GPU has had no process and no work for a long time",
        f"{_GPU} has had no compute process and activity below {_pct(c.idle_threshold)} for "
        f"{format_duration(c.unused_for)} (activity now {_VALUE_PCT}). Scale the node down or give the GPU "
        "to a workload.",
    )
    bandwidth = _alert(
        c, "GpuMemoryBandwidthBound",
        bandwidth_bound(c, c.bandwidth_window),
        c.bandwidth_for, "info",
        "GPU is bound by memory bandwidth",
        f"{_GPU} has used {_VALUE_PCT} of its DRAM bandwidth while its tensor cores were active at most "
        f"{_pct(c.bandwidth_tensor_max)} of the time, for {format_duration(c.bandwidth_for)}: "
        "it waits on memory (LLM decode). Consider FP8 weights or KV cache, larger batches, "
        "disaggregated prefill/decode or higher-bandwidth GPUs.",
    )
    memory_full = _alert(
        c, "GpuMemoryNearlyFull",
        f"gpu_memory_used_bytes / gpu_memory_total_bytes >= {c.memory_full_ratio:g}",
        c.memory_full_for, "warning",
        "GPU memory is nearly full",
        f"{_GPU} has used {_VALUE_PCT} of its memory for {format_duration(c.memory_full_for)}; "
        "the next allocation may fail with out-of-memory.",
    )
    return [idle_allocated, unused, bandwidth, memory_full]


def health_alerts(c: RuleConfig) -> list[dict[str, Any]]:
    xw = format_duration(c.xid_window)
    xids = f'gpu_xid_errors_total{{xid!~"{_regex(c.application_xids)}"}}'
    xid = _alert(
        c, "GpuXidError",
        f"increase({xids}[{xw}]) > 0\n"
        "# A series that appears already counting (the first XID of its kind) has no increase yet.\n"
        f"or\n({xids} > 0 unless {xids} offset {xw})",
        0, "warning",
        "GPU reported a hardware XID error",
        f"{_GPU} reported XID {{{{ $labels.xid }}}} ({{{{ $value | humanize }}}} in the last {xw}). "
        "This XID usually points at the GPU, driver or board rather than the application.",
    )
    ecc = _alert(
        c, "GpuEccUncorrectable",
        'gpu_ecc_errors_total{type="uncorrectable"} > 0',
        0, "page",
        "GPU has uncorrectable ECC errors",
        f"{_GPU} has counted {{{{ $value | humanize }}}} uncorrectable ECC error(s) since the driver loaded. "
        "Data on it may be corrupt: drain it and reset the GPU; the count clears on reset.",
    )
    tw = format_duration(c.thermal_window)
    thermal = _alert(
        c, "GpuThermalThrottling",
        f'avg_over_time(gpu_clock_event_active{{reason=~"{_regex(c.thermal_reasons)}"}}[{tw}])'
        f" >= {c.thermal_share_min:g}",
        c.thermal_for, "warning",
        "GPU clocks are held down by temperature",
        f"{_GPU} has been throttled by {{{{ $labels.reason }}}} {_VALUE_PCT} of the last {tw}: "
        "it runs slower than it should. Check cooling, fans and airflow.",
    )
    lost = _alert(
        c, "GpuLost",
        "gpu_up == 0",
        c.lost_for, "page",
        "GPU is lost",
        f"{_GPU} has not answered NVML for {format_duration(c.lost_for)} (fell off the bus, hung or "
        "being reset). Workloads on it have failed.",
    )
    return [xid, ecc, thermal, lost]


def agent_alerts(c: RuleConfig) -> list[dict[str, Any]]:
    agent_down = _alert(
        c, "GpuAgentDown",
        f"up{{{c.agent_selector}}} == 0",
        c.agent_down_for, "warning",
        "gpuphase agent is down",
        "Prometheus has failed to scrape the gpuphase agent at {{ $labels.instance }} (job "
        f"{{{{ $labels.job }}}}) for {format_duration(c.agent_down_for)}: the GPUs of this host are unobserved "
        "and none of their alerts can fire.",
    )
    collector = _alert(
        c, "GpuCollectorFailing",
        "gpu_scrape_collector_success == 0",
        c.collector_failing_for, "warning",
        "gpuphase collector is failing",
        "The {{ $labels.collector }} collector of the gpuphase agent at {{ $labels.instance }} has "
        f"failed every scrape for {format_duration(c.collector_failing_for)}; its metrics are missing.",
    )
    act = activity(c.activity_window)
    spans_missing = _alert(
        c, "GpuPhaseSpansMissing",
        "(\n"
        "  time() - max without (service) (gpu_phase_last_span_timestamp_seconds)\n"
        "  # A mapped GPU that never received a span: its age counts from the Unix epoch.\n"
        "  or\n"
        "  time() - 0 * group without (phase, service) (gpu_phase_seconds_total)\n"
        f") > {c.spans_missing_after}\n"
        f"and\n{act} > {c.idle_threshold:g}",
        c.spans_missing_for, "warning",
        "Busy GPU receives no model-server spans",
        f"{_GPU} is busy and mapped to a service, but its newest span is {{{{ $value | humanizeDuration }}}} "
        "old: its phase accounting is wrong (everything counts as idle). Check the model server's "
        "OTLP exporter and the agent's span intake.",
    )
    return [agent_down, collector, spans_missing]


ALERT_GROUPS = (
    ("gpuphase.cost", cost_alerts),
    ("gpuphase.health", health_alerts),
    ("gpuphase.agent", agent_alerts),
)


# --------------------------------------------------------------------------------------------
# Recording rules (used by the dashboards; names follow level:metric:operations)
# --------------------------------------------------------------------------------------------
PHASE_RATE = "instance_gpu_phase:gpu_phase_seconds:rate"
GPU_STATE = "instance_gpu:gpu_phase_state:max_rate"
STATE_COUNT = "state:gpu_phase_state:count"
IDLE_RATIO = "instance_gpu:gpu_idle:ratio_rate"
IDLE_GPUS = "instance:gpu_idle_gpus:sum"
ACTIVITY_FIELDS = ("sm_active", "tensor_active", "dram_active")


def recording_rules(c: RuleConfig) -> list[dict[str, Any]]:
    sw, rw = format_duration(c.state_window), format_duration(c.rate_window)
    phase_rate = f"{PHASE_RATE}{sw}"
    gpu_state = f"{GPU_STATE}{sw}"
    rules: list[dict[str, Any]] = [
        {"record": phase_rate, "expr": f"sum without (service) (rate(gpu_phase_seconds_total[{sw}]))"},
        # The state of a GPU is the phase with the largest share of the last state_window; GPUs
        # without phase series (no service mapped) are "unknown". Value 1, label `state`.
        {"record": gpu_state, "expr": (
            "(\n"
            "  max without (phase) (\n"
            "    label_replace(\n"
            f"      topk without (phase) (1, {phase_rate} > 0),\n"
            '      "state", "$1", "phase", "(.+)"\n'
            "    )\n"
            "  )\n"
            "  or ignoring (state)\n"
            '  label_replace(gpu_up, "state", "unknown", "", "")\n'
            ") * 0 + 1"
        )},
        {"record": STATE_COUNT, "expr": f"count by (state) ({gpu_state})"},
    ]
    for name in ACTIVITY_FIELDS:
        numerator = f"gpu_phase_{name}_seconds_total"
        for level, grouping in (("instance_gpu_phase", "without (service)"), ("phase", "by (phase)")):
            rules.append({
                "record": f"{level}:gpu_phase_{name}:ratio_rate{rw}",
                "expr": f"sum {grouping} (rate({numerator}[{rw}]))\n/\n"
                        f"(sum {grouping} (rate(gpu_phase_seconds_total[{rw}])) > 0)",
            })
    # Idle share of each GPU: the idle phase where phases are accounted, low activity elsewhere.
    # Summed over GPUs it is the number of idle GPUs: idle GPU-hours accrued per hour.
    rules.append({"record": f"{IDLE_RATIO}{rw}", "expr": idle_share(c, c.rate_window)})
    rules.append({"record": IDLE_GPUS, "expr": f"sum without (gpu, uuid) ({IDLE_RATIO}{rw})"})
    tokens_phases = 'phase=~"prefill|decode"'
    for level, grouping in (("instance_gpu_phase", "without (service)"), ("phase", "by (phase)")):
        rules.append({
            "record": f"{level}:gpu_phase_energy_per_token_joules:ratio_rate{rw}",
            "expr": f"sum {grouping} (rate(gpu_phase_energy_joules_total{{{tokens_phases}}}[{rw}]))\n/\n"
                    f"(sum {grouping} (rate(gpu_phase_tokens_total{{{tokens_phases}}}[{rw}])) > 0)",
        })
    return rules


# --------------------------------------------------------------------------------------------
# Scaling signals: per service, what an autoscaler (KEDA, HPA via prometheus-adapter) reads; per GPU,
# how long it has been idle, for spin-down hooks. docs/scaling.md.
# --------------------------------------------------------------------------------------------
SERVICE_GPUS = "gpuphase:service_gpus:count"
SERVICE_BUSY_GPUS = "gpuphase:service_busy_gpus:rate"
SERVICE_PHASE_SHARE = "gpuphase:service_phase_share:rate"
SERVICE_DESIRED_GPUS = "gpuphase:service_desired_gpus:rate"
GPU_LAST_BUSY = "gpuphase:gpu_last_busy:timestamp_seconds"
GPU_IDLE_FOR = "gpuphase:gpu_idle_for:seconds"


def scaling_rules(c: RuleConfig) -> list[dict[str, Any]]:
    rw = format_duration(c.rate_window)
    busy = f"{SERVICE_BUSY_GPUS}{rw}"
    return [
        # Every GPU a service is mapped to exposes its phase series, traffic or not.
        {"record": SERVICE_GPUS,
         "expr": "count by (service) (group by (instance, gpu, uuid, service) (gpu_phase_seconds_total))"},
        # GPU-equivalents doing work: 2 GPUs each busy half the time count 1.
        {"record": busy,
         "expr": f'sum by (service) (rate(gpu_phase_seconds_total{{phase!="idle"}}[{rw}]))'},
        {"record": f"{SERVICE_PHASE_SHARE}{rw}",
         "expr": f"sum by (service, phase) (rate(gpu_phase_seconds_total[{rw}]))\n"
                 f"/ ignoring (phase) group_left ()\n"
                 f"(sum by (service) (rate(gpu_phase_seconds_total[{rw}])) > 0)"},
        # The GPUs that would run the same work at the target busy share (0 when there is none).
        {"record": f"{SERVICE_DESIRED_GPUS}{rw}",
         "expr": f"ceil({busy} / {c.scaling_target_busy_share:g})"},
        # The last time a GPU was busy (idle less than 1 - idle_threshold of rate_window). A GPU never
        # seen busy counts from when these rules first saw it; the rule reads its own last value,
        # so a Prometheus restart within its lookback keeps the count. Dropped with the GPU.
        # The idle share is computed here, not read from the gpuphase.recording group's record:
        # groups run concurrently, and reading it would lag one evaluation at random.
        {"record": GPU_LAST_BUSY,
         "expr": "(\n"
                 f"  time() + 0 * (\n    (\n{_indent(idle_share(c, c.rate_window), 6)}\n    ) < {1 - c.idle_threshold:g}\n  )\n"
                 f"  or\n  {GPU_LAST_BUSY}\n"
                 "  or\n  time() + 0 * gpu_up\n"
                 ")\nand\ngpu_up"},
        {"record": GPU_IDLE_FOR, "expr": f"time() - {GPU_LAST_BUSY}"},
    ]


# --------------------------------------------------------------------------------------------
# Report pre-aggregation (`gpuphase report`, docs/report.md): every report_step, in a group of that
# interval, what each GPU did during the step just ended. Summing a record over a range with
# sum_over_time() gives the range's total, with the same result in Prometheus, Thanos, Mimir and
# VictoriaMetrics (unlike increase() over a range, whose extrapolation differs between them).
# Names end in the step ("...:increase5m"); the report finds the step from them.
# --------------------------------------------------------------------------------------------
REPORT_PHASE_SECONDS = "instance_gpu_phase_service:gpu_phase_seconds:increase"
REPORT_PHASE_TOKENS = "instance_gpu_phase_service:gpu_phase_tokens:increase"
REPORT_PHASE_ENERGY = "instance_gpu_phase_service:gpu_phase_energy_joules:increase"
REPORT_ENERGY = "instance_gpu:gpu_energy_joules:increase"
REPORT_OBSERVED = "instance_gpu:gpu_observed_seconds:sum"
REPORT_IDLE_ALLOCATED = "instance_gpu:gpu_idle_allocated_seconds:sum"
REPORT_UNUSED = "instance_gpu:gpu_unused_seconds:sum"
REPORT_BANDWIDTH_BOUND = "instance_gpu:gpu_bandwidth_bound_seconds:sum"
REPORT_MEMORY_USED = "instance_gpu:gpu_memory_used_bytes:max"
REPORT_MEMORY_TOTAL = "instance_gpu:gpu_memory_total_bytes:max"
REPORT_DRAM = "instance_gpu:gpu_dram_active_ratio:avg"
REPORT_TENSOR = "instance_gpu:gpu_tensor_active_ratio:avg"
REPORT_GROUP = "gpuphase.report"


def step_increase(metric: str, step: int) -> str:
    """How much a counter grew in the step just ended: its latest sample minus the latest sample a
    step ago. Unlike increase(), nothing is extrapolated, so consecutive steps telescope and their
    sum over a range is exactly the counter's growth (across a reset: the value since the reset).
    A series new this step counts from its next step (its first value may hold a history)."""
    s = format_duration(step)
    return (f"(\n  {metric} - {metric} offset {s} >= 0\n  or\n"
            f"  ({metric} and {metric} - {metric} offset {s} < 0)\n)")


def report_rules(c: RuleConfig) -> list[dict[str, Any]]:
    step = c.report_step
    s = format_duration(step)
    idle_phase = step_increase('gpu_phase_seconds_total{phase="idle"}', step)
    idle = (f"sum without (phase, service) {idle_phase}\n"
            f"or\n{step} * ({activity(step)} < bool {c.idle_threshold:g})")
    allocated = f"max_over_time(gpu_processes[{s}]) > 0"
    return [
        {"record": f"{REPORT_PHASE_SECONDS}{s}", "expr": step_increase("gpu_phase_seconds_total", step)},
        {"record": f"{REPORT_PHASE_TOKENS}{s}",
         "expr": step_increase('gpu_phase_tokens_total{phase=~"prefill|decode"}', step)},
        {"record": f"{REPORT_PHASE_ENERGY}{s}", "expr": step_increase("gpu_phase_energy_joules_total", step)},
        {"record": f"{REPORT_ENERGY}{s}", "expr": step_increase("gpu_energy_joules_total", step)},
        # A GPU the agent reported at all during the step (up or lost) was observed for the step.
        {"record": f"{REPORT_OBSERVED}{s}", "expr": f"{step} + 0 * last_over_time(gpu_up[{s}])"},
        # Idle seconds of the step (the idle phase where phases are accounted, the whole step when
        # activity stayed under the idle threshold elsewhere), split by whether a process held the
        # GPU (GpuIdleAllocated) or none did (GpuUnused).
        {"record": f"{REPORT_IDLE_ALLOCATED}{s}", "expr": f"(\n{_indent(idle)}\n)\nand\n{allocated}"},
        {"record": f"{REPORT_UNUSED}{s}", "expr": f"(\n{_indent(idle)}\n)\nunless\n{allocated}"},
        {"record": f"{REPORT_BANDWIDTH_BOUND}{s}",
         "expr": f"{step} + 0 * (\n{_indent(bandwidth_bound(c, step))}\n)"},
        {"record": f"{REPORT_MEMORY_USED}{s}", "expr": f"max_over_time(gpu_memory_used_bytes[{s}])"},
        {"record": f"{REPORT_MEMORY_TOTAL}{s}", "expr": f"max_over_time(gpu_memory_total_bytes[{s}])"},
        {"record": f"{REPORT_DRAM}{s}", "expr": f"avg_over_time(gpu_dram_active_ratio[{s}])"},
        {"record": f"{REPORT_TENSOR}{s}", "expr": f"avg_over_time(gpu_tensor_active_ratio[{s}])"},
    ]


# What each recorded series means, by name without its window suffix (docs/metrics.md is generated
# from this; a test checks every recording rule has its line).
RECORDED_HELP = {
    PHASE_RATE: "phase time per second per GPU (services summed)",
    GPU_STATE: "1 per GPU, label `state` = the phase with the largest share of its last state_window; "
               "`unknown` for GPUs with no phase accounting",
    STATE_COUNT: "GPUs per state",
    "instance_gpu_phase:gpu_phase_sm_active:ratio_rate": "average SM activity within each phase, per GPU",
    "phase:gpu_phase_sm_active:ratio_rate": "average SM activity within each phase, fleet-wide",
    "instance_gpu_phase:gpu_phase_tensor_active:ratio_rate": "average tensor activity within each phase, per GPU",
    "phase:gpu_phase_tensor_active:ratio_rate": "average tensor activity within each phase, fleet-wide",
    "instance_gpu_phase:gpu_phase_dram_active:ratio_rate": "average DRAM activity within each phase, per GPU",
    "phase:gpu_phase_dram_active:ratio_rate": "average DRAM activity within each phase, fleet-wide",
    IDLE_RATIO: "share of time idle: the idle phase where phases are accounted, activity below the idle "
                "threshold elsewhere",
    IDLE_GPUS: "idle GPUs per host (= idle GPU-hours accrued per hour)",
    "instance_gpu_phase:gpu_phase_energy_per_token_joules:ratio_rate": "joules per prompt token (prefill) and per "
                                                                       "output token (decode), per GPU",
    "phase:gpu_phase_energy_per_token_joules:ratio_rate": "joules per prompt token (prefill) and per output token "
                                                          "(decode), fleet-wide",
    SERVICE_GPUS: "scaling: GPUs mapped to each service (label `service`)",
    SERVICE_BUSY_GPUS: "scaling: GPU-equivalents of work per service (two GPUs busy half the time = 1)",
    SERVICE_PHASE_SHARE: "scaling: share of a service's GPU time in each phase (labels `service`, `phase`)",
    SERVICE_DESIRED_GPUS: "scaling: GPUs a service needs to run its work at the target busy share "
                          "(scaling_target_busy_share, default 0.7), rounded up",
    GPU_LAST_BUSY: "scaling: Unix time a GPU was last busy (idle under 95% of rate_window); from when the rules "
                   "first saw it if never",
    GPU_IDLE_FOR: "scaling: seconds since a GPU was last busy (spin-down hooks)",
    REPORT_PHASE_SECONDS: "report: phase seconds of each GPU, phase and service in the report step just ended",
    REPORT_PHASE_TOKENS: "report: prompt (prefill) and output (decode) tokens in the step",
    REPORT_PHASE_ENERGY: "report: joules per phase and service in the step",
    REPORT_ENERGY: "report: joules of each GPU in the step",
    REPORT_OBSERVED: "report: the step's length for every GPU the agent reported (up or lost)",
    REPORT_IDLE_ALLOCATED: "report: idle seconds of the step while a process held the GPU",
    REPORT_UNUSED: "report: idle seconds of the step with no process on the GPU",
    REPORT_BANDWIDTH_BOUND: "report: the step's length when the GPU was bound by memory bandwidth "
                            "(GpuMemoryBandwidthBound's condition over the step)",
    REPORT_MEMORY_USED: "report: peak VRAM used in the step",
    REPORT_MEMORY_TOTAL: "report: VRAM size",
    REPORT_DRAM: "report: average DRAM activity in the step",
    REPORT_TENSOR: "report: average tensor activity in the step",
}


def recorded_help(name: str) -> str:
    """The meaning of a recorded series; KeyError for one without (a test checks there is none)."""
    matches = [prefix for prefix in RECORDED_HELP if name.startswith(prefix)]
    if not matches:
        raise KeyError(name)
    return RECORDED_HELP[max(matches, key=len)]


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def build_groups(config: RuleConfig) -> list[dict[str, Any]]:
    groups = [{"name": "gpuphase.recording", "rules": recording_rules(config)},
              {"name": "gpuphase.scaling", "rules": scaling_rules(config)},
              {"name": REPORT_GROUP, "interval": format_duration(config.report_step), "rules": report_rules(config)}]
    groups += [{"name": name, "rules": make(config)} for name, make in ALERT_GROUPS]
    return groups


def alert_names(config: RuleConfig | None = None) -> list[str]:
    config = config or RuleConfig()
    return [rule["alert"] for _, make in ALERT_GROUPS for rule in make(config)]


def recorded_names(config: RuleConfig | None = None) -> list[str]:
    config = config or RuleConfig()
    return [rule["record"] for make in (recording_rules, scaling_rules, report_rules) for rule in make(config)]


class _Dumper(yaml.SafeDumper):
    """Multi-line PromQL as YAML block scalars, so the generated file stays readable."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)

_HEADER = (
    "# Generated by `python -m gpuphase.alerts.rules` from alerts/rules.py. Do not edit by hand:\n"
    "# change RuleConfig there (or pass --set NAME=VALUE) and regenerate.\n"
)


def render(config: RuleConfig | None = None) -> str:
    body = yaml.dump({"groups": build_groups(config or RuleConfig())}, Dumper=_Dumper,
                     sort_keys=False, width=120, allow_unicode=True)
    return _HEADER + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpuphase.alerts.rules", description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--check", action="store_true", help="exit 1 if OUTPUT is not what would be written")
    parser.add_argument("--for-scale", type=float, default=1.0, metavar="F",
                        help="multiply every alert window by F (e.g. 0.01 for end-to-end tests)")
    parser.add_argument("--scrape-interval", type=window_seconds, default=DEFAULT_SCRAPE_INTERVAL, metavar="D",
                        help=f"scrape interval of the Prometheus that loads the rules (default 15s): with "
                             f"--for-scale, rate ranges keep at least {RANGE_SCRAPES} scrapes")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                        help="override one RuleConfig field (repeatable)")
    args = parser.parse_args(argv)
    try:
        config = RuleConfig().scaled(args.for_scale, args.scrape_interval).with_overrides(args.overrides)
    except ValueError as error:
        parser.error(str(error))
    text = render(config)
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date: run python -m gpuphase.alerts.rules", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
