"""Node / GPU detail: every device metric family the agent exports for the chosen hosts and GPUs,
the processes on them, throttle reasons over time, and the agent's own health."""

from __future__ import annotations

from gpuphase.dashboards.common import GPU, HOST, RULES, gpu_variable, instance_variable, sel
from gpuphase.dashboards.grafana import Dashboard, Query, Threshold, row, stat, table, timeseries

_BY_GPU = "{{instance}} gpu {{gpu}}"
_RATE = "[$__rate_interval]"


def _gauge(title: str, metric: str, unit: str, **options) -> object:
    """One line per GPU of a per-GPU gauge."""
    return timeseries(title, Query(sel(metric), _BY_GPU), unit=unit, **options)


def _ratio(title: str, metric: str, **options) -> object:
    return _gauge(title, metric, "percentunit", min=0, max=1, **options)


def _rate(metric: str, legend: str = _BY_GPU, extra: str = "", sparse: bool = False) -> Query:
    return Query(f"rate({sel(metric, GPU, extra)}{_RATE})", legend, sparse=sparse)


def _activity() -> object:
    return row(
        "Activity",
        _ratio("Utilization (NVML utilization.gpu)", "gpu_utilization_ratio",
               description="Share of time any kernel ran: reads near 100 % in both prefill and decode."),
        _ratio("Memory controller busy (NVML utilization.memory)", "gpu_memory_controller_busy_ratio"),
        _ratio("SM active (GPM)", "gpu_sm_active_ratio",
               thresholds=(Threshold(RULES.idle_threshold, "green"),), base_color="orange",
               description="Hopper and newer. Below the idle threshold (orange) the GPU does nothing useful."),
        _ratio("SM occupancy (GPM)", "gpu_sm_occupancy_ratio"),
        _ratio("Tensor active (GPM)", "gpu_tensor_active_ratio",
               description="High in prefill, low in decode."),
        _ratio("DRAM bandwidth used (GPM)", "gpu_dram_active_ratio",
               thresholds=(Threshold(RULES.bandwidth_dram_min, "red"),),
               description="High in decode: the memory wall."),
        timeseries(
            "FP16 / FP32 / FP64 pipes (GPM)",
            Query(sel("gpu_fp16_active_ratio"), "{{instance}} gpu {{gpu}} fp16"),
            Query(sel("gpu_fp32_active_ratio"), "{{instance}} gpu {{gpu}} fp32"),
            Query(sel("gpu_fp64_active_ratio"), "{{instance}} gpu {{gpu}} fp64"),
            unit="percentunit", min=0, max=1, width=24,
        ),
    )


def _memory_and_power() -> object:
    return row(
        "Memory and power",
        timeseries(
            "VRAM",
            Query(sel("gpu_memory_used_bytes"), "{{instance}} gpu {{gpu}} used"),
            Query(sel("gpu_memory_free_bytes"), "{{instance}} gpu {{gpu}} free"),
            Query(sel("gpu_memory_total_bytes"), "{{instance}} gpu {{gpu}} total"),
            unit="bytes", min=0,
        ),
        timeseries(
            "Power",
            Query(sel("gpu_power_watts"), "{{instance}} gpu {{gpu}}"),
            Query(sel("gpu_power_limit_watts"), "{{instance}} gpu {{gpu}} limit"),
            unit="watt", min=0,
        ),
        timeseries("Energy per interval", Query(f"increase({sel('gpu_energy_joules_total')}{_RATE})", _BY_GPU),
                   unit="joule", min=0, description="From the NVML total-energy counter."),
        timeseries(
            "Temperature",
            Query(sel("gpu_temperature_celsius"), "{{instance}} gpu {{gpu}} core"),
            Query(sel("gpu_memory_temperature_celsius"), "{{instance}} gpu {{gpu}} HBM"),
            unit="celsius", thresholds=(Threshold(85, "orange"), Threshold(95, "red")),
        ),
    )


def _clocks() -> object:
    return row(
        "Clocks and throttling",
        timeseries("Clocks", Query(sel("gpu_clock_hertz"), "{{instance}} gpu {{gpu}} {{clock}}"), unit="hertz", min=0),
        timeseries(
            "Throttle reasons active",
            Query(f"{sel('gpu_clock_event_active')} == 1", "{{instance}} gpu {{gpu}} {{reason}}"),
            unit="none", min=0, max=1,
            description="1 while a clock event reason holds the clocks down; thermal reasons are alerted "
                        "(GpuThermalThrottling), sw_power_cap under full load is normal.",
        ),
        timeseries("Clock event reasons (all)", Query(sel("gpu_clock_event_active"), "{{instance}} gpu {{gpu}} {{reason}}"),
                   unit="none", min=0, max=1, width=24, stacked=True),
    )


def _interconnect() -> object:
    return row(
        "Interconnect",
        timeseries("PCIe", _rate("gpu_pcie_transmit_bytes_total", "{{instance}} gpu {{gpu}} tx"),
                   _rate("gpu_pcie_receive_bytes_total", "{{instance}} gpu {{gpu}} rx"), unit="Bps", min=0),
        timeseries("NVLink", _rate("gpu_nvlink_transmit_bytes_total", "{{instance}} gpu {{gpu}} tx"),
                   _rate("gpu_nvlink_receive_bytes_total", "{{instance}} gpu {{gpu}} rx"), unit="Bps", min=0),
        timeseries("PCIe replays", _rate("gpu_pcie_replay_errors_total"), unit="ops", min=0,
                   thresholds=(Threshold(1, "orange"),), description="Link-level retransmissions: a marginal link."),
    )


def _errors() -> object:
    return row(
        "Errors",
        timeseries("ECC errors (since driver load)", Query(sel("gpu_ecc_errors_total"), "{{instance}} gpu {{gpu}} {{type}}"),
                   unit="none", min=0, width=8),
        timeseries("Remapped HBM rows", Query(sel("gpu_remapped_rows"), "{{instance}} gpu {{gpu}} {{type}}"),
                   unit="none", min=0, width=8),
        timeseries("XID events", Query(f"increase({sel('gpu_xid_errors_total')}{_RATE})",
                                       "{{instance}} gpu {{gpu}} xid {{xid}}", sparse=True),
                   unit="none", min=0, width=8, description="13, 31, 43, 45, 68 are usually application errors."),
    )


def _processes() -> object:
    return row(
        "Processes",
        stat("Processes on the GPUs", Query(f"sum({sel('gpu_processes')})"), unit="none", width=6),
        timeseries("Processes per GPU", Query(sel("gpu_processes"), _BY_GPU), unit="none", min=0, width=18),
        table("Processes", Query(sel("gpu_process_memory_used_bytes"), instant=True), unit="bytes",
              description="Device memory per process, with its container and pod."),
        timeseries("SM share per process",
                   Query(sel("gpu_process_sm_active_ratio"), "{{instance}} gpu {{gpu}} {{process_name}} ({{pid}})"),
                   unit="percentunit", min=0, max=1, width=24),
    )


def _mig() -> object:
    legend = "{{instance}} gpu {{gpu}} gi {{gpu_instance}} {{profile}}"
    return row(
        "MIG instances",
        timeseries("MIG memory",
                   Query(sel("gpu_mig_memory_used_bytes"), legend + " used", sparse=True),
                   Query(sel("gpu_mig_memory_total_bytes"), legend + " total", sparse=True), unit="bytes", min=0),
        timeseries("MIG activity",
                   Query(sel("gpu_mig_sm_active_ratio"), legend + " sm", sparse=True),
                   Query(sel("gpu_mig_tensor_active_ratio"), legend + " tensor", sparse=True),
                   Query(sel("gpu_mig_dram_active_ratio"), legend + " dram", sparse=True),
                   unit="percentunit", min=0, max=1),
    )


def _agent() -> object:
    return row(
        "Agent",
        table("GPUs", Query(sel("gpu_info"), instant=True), unit="none", width=16),
        stat("GPUs up", Query(f"sum({sel('gpu_up')})"), unit="none", width=4),
        stat("Oldest GPU reading", Query(f"max(time() - {sel('gpu_last_sample_timestamp_seconds')})"), unit="s",
             width=4, thresholds=(Threshold(10, "orange"), Threshold(60, "red"))),
        timeseries("Collector success", Query(sel("gpu_scrape_collector_success", HOST), "{{instance}} {{collector}}"),
                   unit="none", min=0, max=1, width=8),
        timeseries("Collector render time",
                   Query(sel("gpu_scrape_collector_duration_seconds", HOST), "{{instance}} {{collector}}"),
                   unit="s", min=0, width=8),
        timeseries("Sampler tick duration",
                   Query(sel("gpu_sampler_tick_duration_seconds", HOST), "{{instance}}"), unit="s", min=0, width=8),
        timeseries(
            "Sampler ticks and overruns",
            Query(f"rate({sel('gpu_sampler_ticks_total', HOST)}{_RATE})", "{{instance}} ticks"),
            Query(f"rate({sel('gpu_sampler_overruns_total', HOST)}{_RATE})", "{{instance}} overruns"),
            unit="ops", min=0, width=8,
        ),
        timeseries(
            "Span intake",
            Query(f"sum by (instance, decoder) (rate({sel('gpu_spans_received_total', HOST)}{_RATE}))",
                  "{{instance}} received {{decoder}}"),
            Query(f"sum by (instance, reason) (rate({sel('gpu_spans_rejected_total', HOST)}{_RATE}))",
                  "{{instance}} rejected {{reason}}", sparse=True),
            Query(f"sum by (instance, reason) (rate({sel('gpu_spans_unmatched_total', HOST)}{_RATE}))",
                  "{{instance}} unmatched {{reason}}", sparse=True),
            unit="ops", min=0, width=16,
        ),
        timeseries("Agent resident memory", Query(sel("process_resident_memory_bytes", HOST), "{{instance}}"),
                   unit="bytes", min=0, width=12,
                   description="The agent's own RSS (process_resident_memory_bytes)."),
        timeseries("Agent CPU",
                   Query(f"rate({sel('process_cpu_seconds_total', HOST)}{_RATE})", "{{instance}}"),
                   unit="percentunit", min=0, width=12,
                   description="The agent's own user + system CPU time per second: 100 % is one core."),
        table("Agent build", Query(sel("gpuphase_build_info", HOST), instant=True), unit="none", width=24),
    )


def build() -> Dashboard:
    return Dashboard(
        uid="gpuphase-node",
        title="gpuphase / Node and GPU detail",
        description="Every device metric of the chosen hosts and GPUs, their processes and the agent's health.",
        rows=(_activity(), _memory_and_power(), _clocks(), _interconnect(), _errors(), _processes(), _mig(), _agent()),
        variables=(instance_variable(), gpu_variable()),
        time_from="now-1h",
    )
