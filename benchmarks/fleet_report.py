"""Figure 9: `gpuphase report` over 30 days of a 100-host × 8-GPU fleet, against one range scan.

A deterministic (seeded) fleet is generated into a real VictoriaMetrics (the `victoria-metrics`
binary, started on a free loopback port with its data in a temporary directory) through its
JSON-lines import API, `/api/v1/import`: the series the report reads, as the `gpuphase.report`
recording rules (alerts/rules.py `report_rules`) would have written them every 300 s, plus
`gpu_info`. Every sample is "what the GPU did in the 300 s step ending at its timestamp", so the
fleet's truth (GPU-hours, phase hours, tokens, energy, idle split) is known exactly and the
report's JSON is checked against it before any time counts.

The fleet: hosts in three regions (a daily load cycle in local time, lighter weekends), laid out
as llama-70b on TP8/TP4/TP2 groups (one TP2 group a low-traffic canary), llama-405b on TP8 (decode
heavy, memory-bandwidth bound), chat-8b on single GPUs (chunked prefill, so mostly `mixed`), batch
jobs holding GPUs that are idle but at night (allocated-but-idle), and GPUs no process holds
(unused). Each GPU-day is drawn from a pool of day profiles, which keeps the generator fast in
pure Python and its memory bounded whatever the fleet size.

Measured: the report as a subprocess (`python -m gpuphase report ... --format json`), wall time
and peak RSS (VmHWM polled every 2 ms), best and median of a few runs, for the whole range and for its last day;
baseline: one instant query through the same HTTP API, from this process, that scans one of the
report's series over the same range (`sum(sum_over_time(instance_gpu:gpu_observed_seconds:sum5m[R]))`).
The ratio is how many such scans the whole report costs.
"""

from __future__ import annotations

import datetime
import gzip
import http.client
import json
import math
import os
import queue
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import psutil

from benchmarks.harness import ROOT, subprocess_env
from benchmarks.results import Figure, Section, Table
from tests.agentproc import free_port

HOSTS, GPUS_PER_HOST, DAYS = 100, 8, 30
STEP = 300  # seconds; the report rules' interval (`...:increase5m`)
STEPS_PER_DAY = 86_400 // STEP
GOAL_SECONDS = 10.0
GOAL_HOSTS, GOAL_DAYS = 100, 30  # the goal is stated for this fleet and range
SELECTOR = '{job="gpuphase"}'
PRICE = 2.50
GPU_NAME = "NVIDIA H100 80GB HBM3"
MEMORY_TOTAL = 85_520_809_984  # 81,559 MiB, what NVML reports for an H100 80GB HBM3
DRIVER, CUDA = "550.54.15", "12.4"
SEED = 20_240_601

OBSERVED = "instance_gpu:gpu_observed_seconds:sum5m"
PHASE_SECONDS = "instance_gpu_phase_service:gpu_phase_seconds:increase5m"
PHASE_TOKENS = "instance_gpu_phase_service:gpu_phase_tokens:increase5m"
PHASE_ENERGY = "instance_gpu_phase_service:gpu_phase_energy_joules:increase5m"
ENERGY = "instance_gpu:gpu_energy_joules:increase5m"
IDLE_ALLOCATED = "instance_gpu:gpu_idle_allocated_seconds:sum5m"
UNUSED = "instance_gpu:gpu_unused_seconds:sum5m"
BANDWIDTH_BOUND = "instance_gpu:gpu_bandwidth_bound_seconds:sum5m"
MEMORY_USED = "instance_gpu:gpu_memory_used_bytes:max5m"
MEMORY_TOTAL_RECORD = "instance_gpu:gpu_memory_total_bytes:max5m"
DRAM = "instance_gpu:gpu_dram_active_ratio:avg5m"
TENSOR = "instance_gpu:gpu_tensor_active_ratio:avg5m"
INFO = "gpu_info"
PHASES = ("prefill", "decode", "mixed", "idle")

# Value text, looked up rather than formatted per sample: seconds in tenths, ratios in thousandths.
TENTHS = [str(i // 10) if i % 10 == 0 else f"{i / 10:.1f}" for i in range(STEP * 10 + 1)]
THOUSANDTHS = ["0", *(f"{i / 1000:.3f}".rstrip("0") for i in range(1, 1000)), "1"]


# --------------------------------------------------------------------------------------------
# The fleet
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Role:
    """How the GPUs of one serving group behave. Utilisation is busy seconds / step."""

    service: str  # "" for GPUs no process holds
    base: float = 0.0  # utilisation off-peak
    amplitude: float = 0.0  # added at the daily peak (16:00 local)
    split: tuple[float, float, float] = (0.3, 0.6, 0.1)  # busy time as prefill, decode, mixed
    token_rates: tuple[float, float] = (0.0, 0.0)  # tokens per GPU-second in prefill, decode
    watts: tuple[float, float, float, float] = (620.0, 430.0, 560.0, 90.0)  # prefill, decode, mixed, idle
    memory_share: float = 0.9  # of MEMORY_TOTAL held
    decode_dram: float = 0.6  # DRAM-active ratio while decoding
    decode_tensor: float = 0.4  # tensor-active ratio while decoding
    nightly_burst: bool = False  # a 1-hour job at 02:00 local on some days, idle otherwise


ROLES = {
    "llama-70b": Role("llama-70b", 0.45, 0.45, (0.22, 0.70, 0.08), (9_000, 420), memory_share=0.92),
    "llama-70b-canary": Role("llama-70b-canary", 0.02, 0.06, (0.25, 0.70, 0.05), (9_000, 420), memory_share=0.92),
    "llama-405b": Role("llama-405b", 0.86, 0.11, (0.07, 0.89, 0.04), (2_600, 150), (650.0, 470.0, 600.0, 100.0),
                       memory_share=0.95, decode_dram=0.92, decode_tensor=0.16),
    "chat-8b": Role("chat-8b", 0.30, 0.55, (0.08, 0.42, 0.50), (32_000, 2_300), (560.0, 380.0, 520.0, 85.0),
                    memory_share=0.55, decode_dram=0.55, decode_tensor=0.30),
    "batch-eval": Role("batch-eval", 0.0, 0.0, (0.5, 0.5, 0.0), (12_000, 600), memory_share=0.48, nightly_burst=True),
    "unused": Role(""),
}
# Host layouts: (role, tensor-parallel size) groups filling 8 GPUs; and how many per 100 hosts.
LAYOUTS = {
    "70b-tp8": ([("llama-70b", 8)], 12),
    "70b-tp4x2": ([("llama-70b", 4)] * 2, 16),
    "70b-tp2x4-canary": ([("llama-70b", 2)] * 3 + [("llama-70b-canary", 2)], 10),
    "405b-tp8": ([("llama-405b", 8)], 12),
    "chat-8b-x8": ([("chat-8b", 1)] * 8, 20),
    "chat-8b-x6-unused2": ([("chat-8b", 1)] * 6 + [("unused", 1)] * 2, 8),
    "70b-tp4-batch-tp4": ([("llama-70b", 4), ("batch-eval", 4)], 10),
    "batch-tp4x2": ([("batch-eval", 4)] * 2, 6),
    "unused-x8": ([("unused", 1)] * 8, 6),
}
REGIONS = (-5, 1, 8)  # UTC offsets of the hosts' users (host index mod 3)
VARIANTS = 6  # day profiles per (role, region, weekday/weekend)
TOKEN_OFFSET = 20_000  # tokens added to the first step of each day, times the group's slot on its host


@dataclass(frozen=True)
class Group:
    host: int
    gpus: tuple[int, ...]
    role: str
    region: int
    slot: int  # the group's place on its host (0 first)


@dataclass
class Gpu:
    instance: str
    gpu: int
    uuid: str
    group: int  # index into the fleet's groups


def layout(hosts: int, seed: int = SEED) -> tuple[list[Group], list[Gpu], list[str]]:
    """Groups, GPUs and each host's layout name. Every layout appears within the first len(LAYOUTS) hosts."""
    rng = random.Random(f"{seed}:layout")
    names = list(LAYOUTS)
    deck: list[str] = []
    while len(deck) < hosts:
        first = names[:]
        rng.shuffle(first)
        rest = [name for name, (_, weight) in LAYOUTS.items() for _ in range(weight - 1)]
        rng.shuffle(rest)
        deck += first + rest
    groups: list[Group] = []
    gpus: list[Gpu] = []
    for host in range(hosts):
        instance = f"host-{host:03d}:9400"
        index = 0
        for slot, (role, size) in enumerate(LAYOUTS[deck[host]][0]):
            groups.append(Group(host, tuple(range(index, index + size)), role, REGIONS[host % len(REGIONS)], slot))
            for gpu in range(index, index + size):
                u = rng.getrandbits(128)
                uuid = (f"GPU-{u >> 96:08x}-{(u >> 80) & 0xFFFF:04x}-{(u >> 64) & 0xFFFF:04x}-"
                        f"{(u >> 48) & 0xFFFF:04x}-{u & 0xFFFFFFFFFFFF:012x}")
                gpus.append(Gpu(instance, gpu, uuid, len(groups) - 1))
            index += size
        assert index == GPUS_PER_HOST, deck[host]
    return groups, gpus, deck[:hosts]


# --------------------------------------------------------------------------------------------
# Day profiles: one GPU's 288 samples of every series for one day
# --------------------------------------------------------------------------------------------
TRUTH_KEYS = ("observed", "prefill", "decode", "mixed", "idle", "tokens_prefill", "tokens_decode", "energy",
              "idle_allocated", "unused", "bandwidth_bound", "samples")


@dataclass
class Profile:
    dense: dict[tuple[str, str], str]  # (metric, phase or "") -> "v,v,...", one value per step
    # Token series as (first value, ",v,v..." for the rest): generate() offsets the first per group.
    tokens: dict[str, tuple[int, str]]
    sparse: dict[tuple[str, str], tuple[str, tuple[int, ...]]]  # values and the steps that have one
    truth: dict[str, float]


def day_profile(role_name: str, region: int, weekend: bool, variant: int, day_start: int, seed: int) -> Profile:
    """`day_start`: Unix seconds of the day's first step (its timestamp); steps follow every STEP s."""
    role = ROLES[role_name]
    rng = random.Random(f"{seed}:{role_name}:{region}:{weekend}:{variant}")
    scale = 0.85 + 0.3 * rng.random()  # this variant's traffic against the role's typical day
    truth = dict.fromkeys(TRUTH_KEYS, 0.0)
    values: dict[str, list[str]] = {key: [] for key in (
        "prefill", "decode", "mixed", "idle", "tok_prefill", "tok_decode", "e_prefill", "e_decode", "e_mixed",
        "e_idle", "energy", "memory", "dram", "tensor", "idle_allocated")}
    bound_steps: list[int] = []
    burst_start = rng.randrange(STEPS_PER_DAY) if role.nightly_burst and rng.random() < 0.4 else -1
    memory = role.memory_share * MEMORY_TOTAL if role.service else 512 * 2**20
    for step in range(STEPS_PER_DAY):
        if not role.service:
            joules = int(STEP * (61.0 + rng.gauss(0, 1.5)))
            values["energy"].append(str(joules))
            values["memory"].append(str(int(memory)))
            truth["energy"] += joules
            truth["unused"] += STEP
            continue
        local_hour = ((day_start + step * STEP) / 3600 + region) % 24
        if role.nightly_burst:
            local_start = ((day_start + burst_start * STEP) / 3600 + region) % 24 if burst_start >= 0 else -1
            in_burst = burst_start >= 0 and 0 <= ((local_hour - local_start) % 24) < 1 and 1 <= local_start < 4
            load = 0.93 if in_burst else 0.0
        else:
            cycle = 0.5 - 0.5 * math.cos(2 * math.pi * (local_hour - 4) / 24)  # 0 at 04:00, 1 at 16:00
            load = (role.base + role.amplitude * cycle) * scale * (0.7 if weekend else 1.0)
            load *= 1 + rng.gauss(0, 0.06)
        busy = max(0, min(int(load * STEP * 10), int(0.985 * STEP * 10)))  # tenths of a second
        share_prefill = role.split[0] * (1 + rng.gauss(0, 0.1))
        share_mixed = role.split[2] * (1 + rng.gauss(0, 0.1))
        prefill = max(0, min(busy, int(busy * share_prefill)))
        mixed = max(0, min(busy - prefill, int(busy * share_mixed)))
        decode = busy - prefill - mixed
        idle = STEP * 10 - busy
        tenths = {"prefill": prefill, "decode": decode, "mixed": mixed, "idle": idle}
        for phase, amount in tenths.items():
            values[phase].append(TENTHS[amount])
            truth[phase] += amount / 10
        tokens_prefill = int(prefill / 10 * role.token_rates[0] * (1 + rng.gauss(0, 0.05)))
        tokens_decode = int(decode / 10 * role.token_rates[1] * (1 + rng.gauss(0, 0.05)))
        values["tok_prefill"].append(str(max(tokens_prefill, 0)))
        values["tok_decode"].append(str(max(tokens_decode, 0)))
        truth["tokens_prefill"] += max(tokens_prefill, 0)
        truth["tokens_decode"] += max(tokens_decode, 0)
        total_joules = 0
        for phase, watts in zip(PHASES, role.watts):
            joules = int(tenths[phase] / 10 * watts * (1 + rng.gauss(0, 0.02)))
            values[f"e_{phase}"].append(str(joules))
            total_joules += joules
        values["energy"].append(str(total_joules))
        truth["energy"] += total_joules
        used = min(MEMORY_TOTAL, int(memory * (1 + rng.gauss(0, 0.004)) + (busy > 0) * 2**30))
        values["memory"].append(str(used))
        dram = (prefill * 0.35 + decode * role.decode_dram + mixed * 0.55 + idle * 0.004) / (STEP * 10)
        tensor = (prefill * 0.72 + decode * role.decode_tensor + mixed * 0.52) / (STEP * 10)
        dram_i, tensor_i = min(1000, int(dram * 1000)), min(1000, int(tensor * 1000))
        values["dram"].append(THOUSANDTHS[dram_i])
        values["tensor"].append(THOUSANDTHS[tensor_i])
        values["idle_allocated"].append(TENTHS[idle])
        truth["idle_allocated"] += idle / 10
        # instance_gpu:gpu_bandwidth_bound_seconds: DRAM ≥ 0.8, tensor ≤ 0.3, decode ≥ half of the busy time.
        if dram_i >= 800 and tensor_i <= 300 and busy and decode * 2 >= busy:
            bound_steps.append(step)
            truth["bandwidth_bound"] += STEP
    truth["observed"] = STEP * STEPS_PER_DAY
    day = STEPS_PER_DAY
    constant = {n: ",".join([n] * day) for n in ("1", str(STEP), str(MEMORY_TOTAL))}
    dense = {(INFO, ""): constant["1"], (OBSERVED, ""): constant[str(STEP)],
             (MEMORY_TOTAL_RECORD, ""): constant[str(MEMORY_TOTAL)],
             (ENERGY, ""): ",".join(values["energy"]), (MEMORY_USED, ""): ",".join(values["memory"])}
    sparse: dict[tuple[str, str], tuple[str, tuple[int, ...]]] = {}
    tokens: dict[str, tuple[int, str]] = {}
    if role.service:
        for phase in PHASES:
            dense[PHASE_SECONDS, phase] = ",".join(values[phase])
            dense[PHASE_ENERGY, phase] = ",".join(values[f"e_{phase}"])
        for phase in ("prefill", "decode"):
            dense[PHASE_TOKENS, phase] = ",".join(values[f"tok_{phase}"])
            tokens[phase] = (int(values[f"tok_{phase}"][0]), "," + ",".join(values[f"tok_{phase}"][1:]))
        dense[DRAM, ""] = ",".join(values["dram"])
        dense[TENSOR, ""] = ",".join(values["tensor"])
        dense[IDLE_ALLOCATED, ""] = ",".join(values["idle_allocated"])
        if bound_steps:
            sparse[BANDWIDTH_BOUND, ""] = (",".join([str(STEP)] * len(bound_steps)), tuple(bound_steps))
    else:
        dense[DRAM, ""] = ",".join(["0"] * day)
        dense[TENSOR, ""] = ",".join(["0"] * day)
        dense[UNUSED, ""] = constant[str(STEP)]
    truth["samples"] = len(dense) * day + len(bound_steps)
    return Profile(dense=dense, tokens=tokens, sparse=sparse, truth=truth)


# --------------------------------------------------------------------------------------------
# Generation: JSON lines for /api/v1/import, in bounded chunks
# --------------------------------------------------------------------------------------------
@dataclass
class Generated:
    samples: int = 0
    series: int = 0
    bytes: int = 0
    by_day: list[dict[str, float]] = field(default_factory=list)  # truth of each day, oldest first
    gpus: int = 0
    hosts: int = 0
    profiles: int = 0

    def truth(self, days: int) -> dict[str, float]:
        """Totals over the last `days` days (GPU-seconds, tokens, joules)."""
        total = dict.fromkeys(TRUTH_KEYS, 0.0)
        for day in self.by_day[-days:]:
            for key, value in day.items():
                total[key] += value
        return total


def _metric_json(name: str, gpu: Gpu, phase: str, service: str) -> str:
    labels = {"__name__": name, "instance": gpu.instance, "job": "gpuphase", "gpu": str(gpu.gpu), "uuid": gpu.uuid}
    if name == INFO:
        labels.update(name=GPU_NAME, pci_bus_id=f"00000000:{0x18 + gpu.gpu * 0x10:02X}:00.0",
                      driver_version=DRIVER, cuda_version=CUDA, gpm_supported="true")
        labels["__name__"] = INFO
    if phase:
        labels.update(phase=phase, service=service)
    return json.dumps(labels, separators=(",", ":"))


def generate(hosts: int, days: int, end: int, chunk_bytes: int = 8 * 2**20, seed: int = SEED,
             stats: Generated | None = None) -> Iterator[bytes]:
    """Bodies for /api/v1/import (JSON lines, one series of one GPU over all `days` per line) of about
    `chunk_bytes` each; the last step of the last day is at `end` (a multiple of STEP). Fills `stats`
    as it goes. The values depend on `end` only through its time of day (the daily cycle)."""
    if end % STEP:
        raise ValueError(f"end {end} is not a multiple of {STEP} s")
    stats = stats if stats is not None else Generated()
    groups, gpus, _ = layout(hosts, seed)
    stats.hosts, stats.gpus = hosts, len(gpus)
    first = end - (days * STEPS_PER_DAY - 1) * STEP
    day_starts = [first + d * 86_400 for d in range(days)]
    day_ms = [",".join(str((start + i * STEP) * 1000) for i in range(STEPS_PER_DAY)) for start in day_starts]
    all_ms = ",".join(day_ms)
    # Two days in seven are lighter, counted back from the end: the data do not depend on the run's date.
    weekend = [(days - 1 - d) % 7 in (3, 4) for d in range(days)]
    stats.by_day = [dict.fromkeys(TRUTH_KEYS, 0.0) for _ in range(days)]
    pool: dict[tuple, Profile] = {}
    rng = random.Random(f"{seed}:days")
    # The day profile each group runs each day (GPUs of one tensor-parallel group run the same).
    picks = [[rng.randrange(VARIANTS) for _ in range(days)] for _ in groups]

    pending: list[str] = []
    size = 0
    for gpu in gpus:
        group = groups[gpu.group]
        service = ROLES[group.role].service
        profiles = []
        for day in range(days):
            key = (group.role, group.region, weekend[day], picks[gpu.group][day])
            if key not in pool:
                # Profiles depend on the time of day of the step, the same for every day (86,400 s apart).
                pool[key] = day_profile(*key, day_starts[0], seed)
            profiles.append(pool[key])
            for name, value in pool[key].truth.items():
                if not name.startswith("tokens_"):
                    stats.by_day[day][name] += value
                elif service and gpu.gpu == group.gpus[0]:  # the report counts a tensor-parallel group's once
                    stats.by_day[day][name] += value + TOKEN_OFFSET * group.slot
        for series, _ in profiles[0].dense.items():
            name, phase = series
            if name == PHASE_TOKENS:
                # Replicas on one host get distinct counts, as real ones do (the report takes equal
                # counts on one host for one tensor-parallel group); the GPUs of one group agree.
                days_text = ",".join(f"{p.tokens[phase][0] + TOKEN_OFFSET * group.slot}{p.tokens[phase][1]}"
                                     for p in profiles)
            else:
                days_text = ",".join(p.dense[series] for p in profiles)
            line = (f'{{"metric":{_metric_json(name, gpu, phase, service)},"values":['
                    f'{days_text}],"timestamps":[{all_ms}]}}\n')
            pending.append(line)
            size += len(line)
            stats.samples += days * STEPS_PER_DAY
            stats.series += 1
        sparse_keys = {key for p in profiles for key in p.sparse}
        for series in sorted(sparse_keys):
            name, phase = series
            vals, stamps = [], []
            for start, p in zip(day_starts, profiles):
                if series in p.sparse:
                    text, steps = p.sparse[series]
                    vals.append(text)
                    stamps.append(",".join(str((start + i * STEP) * 1000) for i in steps))
                    stats.samples += len(steps)
            line = (f'{{"metric":{_metric_json(name, gpu, phase, service)},"values":[{",".join(vals)}],'
                    f'"timestamps":[{",".join(stamps)}]}}\n')
            pending.append(line)
            size += len(line)
            stats.series += 1
        if size >= chunk_bytes:
            body = "".join(pending).encode()
            pending.clear()
            size = 0
            stats.bytes += len(body)
            yield body
    stats.profiles = len(pool)
    if pending:
        body = "".join(pending).encode()
        stats.bytes += len(body)
        yield body


# --------------------------------------------------------------------------------------------
# VictoriaMetrics
# --------------------------------------------------------------------------------------------
class VmError(RuntimeError):
    pass


class VictoriaMetrics:
    """`victoria-metrics` on a free loopback port, its data in `workdir`; stopped on exit."""

    def __init__(self, workdir: Path, binary: str = ""):
        self.binary = binary or shutil.which("victoria-metrics") or ""
        if not self.binary:
            raise VmError("victoria-metrics is not installed (Debian: apt-get install victoria-metrics)")
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "victoria-metrics.log"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [self.binary, f"-storageDataPath={self.workdir / 'data'}", f"-httpListenAddr=127.0.0.1:{self.port}",
                "-retentionPeriod=2y",
                # Imported samples up to the last second are visible (the default hides the last 30 s).
                "-search.latencyOffset=0s",
                # Every report run reads the raw data, not a response cached by the previous one.
                "-search.disableCache",
                "-search.maxQueryDuration=600s", "-search.maxQueueDuration=120s",
                "-loggerLevel=WARN"]

    def __enter__(self) -> "VictoriaMetrics":
        self.process = subprocess.Popen(self.command(), stdout=self.log_path.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise VmError(f"victoria-metrics exited with {self.process.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise VmError(f"victoria-metrics not healthy after 60 s: {self.log_tail()}")
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def rss_bytes(self) -> int:
        return psutil.Process(self.process.pid).memory_info().rss if self.process else 0

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def get(self, path: str, timeout: float = 600) -> bytes:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=timeout) as response:
            return response.read()

    def query(self, expr: str, at: float, timeout: float = 600) -> list[dict]:
        body = urllib.parse.urlencode({"query": expr, "time": f"{at:.3f}"}).encode()
        request = urllib.request.Request(f"{self.url}/api/v1/query", data=body, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as error:
            raise VmError(f"query {expr!r}: HTTP {error.code}: {error.read()[:500]!r}") from error
        if answer.get("status") != "success":
            raise VmError(f"query {expr!r}: {answer}")
        return answer["data"]["result"]

    def scalar(self, expr: str, at: float) -> float:
        result = self.query(expr, at)
        return float(result[0]["value"][1]) if result else float("nan")

    def import_bodies(self, bodies: Iterator[bytes], senders: int = 4, compress: bool = False) -> float:
        """POST every body to /api/v1/import from `senders` threads; seconds until the last answered."""
        work: queue.Queue = queue.Queue(maxsize=senders)  # bounded: the generator waits for the senders
        errors: list[str] = []

        def send() -> None:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
            try:
                while (body := work.get()) is not None:
                    if errors:
                        continue
                    headers = {"Content-Type": "application/json"}
                    if compress:
                        body = gzip.compress(body, compresslevel=1)
                        headers["Content-Encoding"] = "gzip"
                    connection.request("POST", "/api/v1/import", body=body, headers=headers)
                    response = connection.getresponse()
                    answer = response.read()
                    if response.status // 100 != 2:
                        errors.append(f"HTTP {response.status}: {answer[:500]!r}")
            except Exception as error:  # noqa: BLE001 - reported after the join
                errors.append(repr(error))
                while work.get() is not None:  # keep draining so the producer never blocks
                    pass
            finally:
                connection.close()

        started = time.perf_counter()
        threads = [threading.Thread(target=send, name=f"vm-import-{n}", daemon=True) for n in range(senders)]
        for thread in threads:
            thread.start()
        try:
            for body in bodies:
                work.put(body)
                if errors:
                    break
        finally:
            for _ in threads:
                work.put(None)
            for thread in threads:
                thread.join()
        if errors:
            raise VmError(f"/api/v1/import failed: {errors[0]} (log: {self.log_tail(500)})")
        return time.perf_counter() - started


# --------------------------------------------------------------------------------------------
# The report as a subprocess
# --------------------------------------------------------------------------------------------
@dataclass
class ReportRun:
    seconds: float
    max_rss_bytes: int
    cpu_seconds: float  # the report process's own (user + system)
    server_cpu_seconds: float  # VictoriaMetrics' over the same run
    returncode: int
    stderr: str
    report: dict | None


def rfc3339(unix: int) -> str:
    return datetime.datetime.fromtimestamp(unix, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def report_command(url: str, range_: str, end: int, output: Path) -> list[str]:
    return [sys.executable, "-m", "gpuphase", "report", "--prometheus.url", url, "--range", range_,
            "--end", rfc3339(end), "--selector", SELECTOR, "--price.gpu-hour", f"{PRICE:.2f}",
            "--format", "json", "--output", str(output)]


def _high_water(pid: int) -> int:
    """VmHWM of a live process, bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass
class Finished:
    seconds: float  # wall, spawn to exit
    max_rss_bytes: int
    cpu_seconds: float
    returncode: int
    stderr: str


def run_process(command: list[str], workdir: Path, timeout: float = 900) -> Finished:
    """Wall seconds, peak RSS (bytes), CPU seconds, exit status and stderr of `command`.

    Peak RSS is the child's VmHWM, read every 2 ms while it runs (growth in its last 2 ms is missed):
    not wait4's ru_maxrss, which on Linux starts from the parent's own peak RSS (carried over at
    exec after the vfork subprocess uses), here the harness's with its generator."""
    err_path = workdir / "stderr.txt"
    with open(err_path, "w+b") as err, open(os.devnull, "wb") as out:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err, env=subprocess_env(), cwd=ROOT)
        deadline = started + timeout
        peak = 0
        while True:
            peak = max(peak, _high_water(process.pid))
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.002)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    return Finished(seconds, peak, usage.ru_utime + usage.ru_stime, process.returncode, stderr)


def run_report(vm: "VictoriaMetrics", range_: str, end: int, workdir: Path) -> ReportRun:
    output = workdir / f"report-{range_}.json"
    output.unlink(missing_ok=True)
    server_cpu = vm.cpu_seconds()
    done = run_process(report_command(vm.url, range_, end, output), workdir)
    server_cpu = vm.cpu_seconds() - server_cpu
    report, stderr = None, done.stderr
    if done.returncode == 0:
        try:
            report = json.loads(output.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            stderr += f"\n(no readable JSON at {output}: {error})"
    return ReportRun(done.seconds, done.max_rss_bytes, done.cpu_seconds, server_cpu, done.returncode,
                     stderr.strip(), report)


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------
def _relative(value, truth: float) -> float:
    if value is None or not isinstance(value, (int, float)):
        return float("nan")
    if truth == 0:
        return 0.0 if value == 0 else float("inf")
    return (value - truth) / truth


def check_report(report: dict, truth: dict[str, float], gpus: int, hosts: int) -> tuple[list[str], list[list]]:
    """Failures (empty when sane) and a table row per compared quantity: the report against the generated truth."""
    fleet = report.get("fleet", {})
    failures = []
    gpu_hours = truth["observed"] / 3600
    reported_gpus = report.get("gpus", [])
    if fleet.get("gpus") != gpus or len(reported_gpus) != gpus:
        failures.append(f"the report found {fleet.get('gpus')} GPUs ({len(reported_gpus)} in `gpus`), "
                        f"the fleet has {gpus}")
    error = _relative(fleet.get("gpu_hours"), gpu_hours)
    if not (abs(error) <= 0.001):
        failures.append(f"fleet.gpu_hours {fleet.get('gpu_hours')} against {gpu_hours:g} generated "
                        f"({error * 100:+.3f} %, more than 0.1 %)")
    phase = fleet.get("phase_hours") or {}
    tokens = fleet.get("tokens") or {}
    idle = fleet.get("idle_gpu_hours") or {}
    compared = [
        ("hosts", fleet.get("hosts"), hosts),
        ("GPUs", fleet.get("gpus"), gpus),
        ("GPU-hours", fleet.get("gpu_hours"), gpu_hours),
        ("prefill hours", phase.get("prefill"), truth["prefill"] / 3600),
        ("decode hours", phase.get("decode"), truth["decode"] / 3600),
        ("mixed hours", phase.get("mixed"), truth["mixed"] / 3600),
        ("idle hours (phase series)", phase.get("idle"), truth["idle"] / 3600),
        ("idle GPU-hours, allocated", idle.get("allocated"), truth["idle_allocated"] / 3600),
        ("idle GPU-hours, unused", idle.get("unused"), truth["unused"] / 3600),
        ("bandwidth-bound hours", fleet.get("bandwidth_bound_hours"), truth["bandwidth_bound"] / 3600),
        ("prefill tokens", tokens.get("prefill"), truth["tokens_prefill"]),
        ("decode tokens", tokens.get("decode"), truth["tokens_decode"]),
        ("energy kWh", fleet.get("energy_kwh"), truth["energy"] / 3.6e6),
    ]
    rows = []
    for name, value, expected in compared:
        rel = _relative(value, expected)
        shown = "–" if value is None else (f"{value:,.6g}" if isinstance(value, (int, float)) else str(value))
        rows.append([name, f"{expected:,.6g}", shown, "–" if math.isnan(rel) else f"{rel * 100:+.3f} %"])
    return failures, rows


def _report_figures(section: Section, label: str, runs: list[ReportRun], baseline: float, goal: bool,
                    failures: list[str], explain: str) -> None:
    """Best and median wall time of `runs`; with `goal`, each judged against GOAL_SECONDS."""
    best_run = min(runs, key=lambda r: r.seconds)
    median = statistics.median(r.seconds for r in runs)
    explained = False
    for name, value in ((f"best of {len(runs)}", best_run.seconds), ("median", median)):
        met = value <= GOAL_SECONDS and not failures
        note = ""
        if goal and not met:
            if failures:
                note = "The report's answer disagreed with the generated fleet, so its time does not count."
            elif explained:
                note = f"Median of {len(runs)} runs; where the time goes is under the best run."
            else:
                note, explained = explain, True
        section.figures.append(Figure(f"report, {label}, {name}", value, "s", "one range scan (instant query)",
                                      baseline, f"≤ {GOAL_SECONDS:g} s" if goal else "", met if goal else None, note))


def _explain(runs: list[ReportRun], baseline: float, day_runs: list[ReportRun] | None, days: int) -> str:
    """Why the report took as long as it did, from the CPU each side used (for a missed goal)."""
    best = min(runs, key=lambda r: r.seconds)
    text = (f"Runs of {', '.join(f'{r.seconds:.1f}' for r in runs)} s against {GOAL_SECONDS:g} s; the best is "
            f"{best.seconds / baseline:.0f}× one range scan of one series ({baseline:.2f} s), for "
            f"{best.report['source']['queries']} queries. In the best run the report process used "
            f"{best.cpu_seconds:.1f} s of CPU and VictoriaMetrics {best.server_cpu_seconds:.1f} s, on the "
            f"{os.cpu_count()} cores they share")
    if day_runs:
        day = min(day_runs, key=lambda r: r.seconds)
        text += (f"; over 1 day (1/{days} of the samples) it took {day.seconds:.1f} s "
                 f"({day.cpu_seconds:.1f} s report CPU, {day.server_cpu_seconds:.1f} s VictoriaMetrics CPU), so "
                 f"{min(day.seconds / best.seconds, 1) * 100:.0f} % of the time does not grow with the range")
    share = best.server_cpu_seconds / max(best.server_cpu_seconds + best.cpu_seconds, 1e-9)
    side = ("the server's scanning dominates: fewer or cheaper queries (pre-aggregated longer steps, fewer "
            "series per query) would pay" if share >= 0.5 else
            "the report's own Python (parsing answers, analysing) dominates: that is where to cut")
    return text + f"; {side}. More cores would help too: here the two compete for {os.cpu_count()}."


def _baseline(vm: VictoriaMetrics, days: int, end: int, repeats: int) -> tuple[float, float]:
    expr = f"sum(sum_over_time({OBSERVED}{SELECTOR}[{days}d]))"
    times, value = [], float("nan")
    for _ in range(repeats):
        started = time.perf_counter()
        value = vm.scalar(expr, end)
        times.append(time.perf_counter() - started)
    return min(times), value


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def run(hosts: int = HOSTS, days: int = DAYS, repeats: int = 3, senders: int = 4, compress: bool = False,
        seed: int = SEED, keep: str = "") -> Section:
    gpus = hosts * GPUS_PER_HOST
    label = f"{days} d × {gpus} GPUs"
    goal = hosts >= GOAL_HOSTS and days >= GOAL_DAYS
    section = Section(
        "fleet-report", f"`gpuphase report` over {_plural(days, 'day')} of {hosts} hosts × {GPUS_PER_HOST} GPUs",
        f"A seeded fleet of {hosts} hosts × {GPUS_PER_HOST} H100s, {_plural(days, 'day')} at a {STEP} s step, "
        "generated into "
        "VictoriaMetrics (`victoria-metrics`, its rollup cache off: `-search.disableCache`) through "
        f"`/api/v1/import` as the `gpuphase.report` recording rules' outputs plus `gpu_info`; then "
        f"`python -m gpuphase report --range {days}d --selector '{SELECTOR}' --price.gpu-hour {PRICE:.2f} "
        f"--format json` as a subprocess, {_plural(repeats, 'run')}, wall time from spawn to exit (interpreter "
        "start-up included), peak RSS (VmHWM polled every 2 ms) and CPU time of the report and of VictoriaMetrics; and "
        "the same for `--range 1d`. Baseline: one instant query from the harness through the same HTTP API, "
        f"`sum(sum_over_time({OBSERVED}[R]))` over the same range, best of "
        f"{repeats}. The report's totals are checked against the generated truth before its time counts.")
    with tempfile.TemporaryDirectory(prefix="gpuphase-bench-fleet-", dir=keep or None) as tmp:
        workdir = Path(tmp)
        # The last midnight (UTC) at least a step ago: well inside retention, and the same samples every run.
        end = (int(time.time()) - STEP) // 86_400 * 86_400
        generated = Generated()
        with VictoriaMetrics(workdir) as vm:
            # -- ingest ------------------------------------------------------------------------
            started = time.perf_counter()
            posting = vm.import_bodies(generate(hosts, days, end, stats=generated, seed=seed), senders, compress)
            vm.get("/internal/force_flush")
            ingest = time.perf_counter() - started
            generator_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            started = time.perf_counter()
            stored = vm.scalar(f"sum(count_over_time({SELECTOR}[{days}d]))", end)
            count_seconds = time.perf_counter() - started
            series = vm.scalar(f"count(last_over_time({SELECTOR}[{days}d]))", end)
            if stored != generated.samples or series != generated.series:
                raise VmError(f"VictoriaMetrics holds {stored:.0f} samples in {series:.0f} series after the "
                              f"import, {generated.samples} in {generated.series} were sent")
            vm_rss_after_import = vm.rss_bytes()
            section.figures.append(Figure("import into VictoriaMetrics", ingest, "s"))
            section.figures.append(Figure("import rate", generated.samples / ingest, "samples/s"))
            section.figures.append(Figure("samples stored", generated.samples, "samples"))

            # -- the report --------------------------------------------------------------------
            help_run = run_process([sys.executable, "-m", "gpuphase", "report", "--help"], workdir)
            startup = help_run.seconds
            if help_run.returncode != 0:
                raise VmError(f"`gpuphase report --help` exited with {help_run.returncode}: "
                              f"{help_run.stderr[-1000:]}")
            measured: dict[int, tuple[list[ReportRun], float, float]] = {}
            for range_days in dict.fromkeys((days, 1)):
                baseline, scanned = _baseline(vm, range_days, end, repeats)
                runs = []
                for _ in range(repeats):
                    one = run_report(vm, f"{range_days}d", end, workdir)
                    if one.returncode != 0 or one.report is None:
                        raise VmError(f"`gpuphase report --range {range_days}d` exited with {one.returncode}: "
                                      f"{one.stderr[-2000:]}")
                    runs.append(one)
                measured[range_days] = (runs, baseline, scanned)
        truth_rows: list[list] = []
        all_failures: list[str] = []
        for range_days, (runs, baseline, scanned) in measured.items():
            truth = generated.truth(range_days)
            failures, rows = check_report(runs[-1].report, truth, gpus, hosts)
            if abs(scanned - truth["observed"]) > 0.5:
                failures.append(f"the baseline query summed {scanned:g} observed seconds, "
                                f"{truth['observed']:g} were generated")
            all_failures += [f"{range_days} d: {f}" for f in failures]
            this_label = label if range_days == days else f"1 d (last day of {days}) × {gpus} GPUs"
            judged = goal and range_days == days
            explain = _explain(runs, baseline, measured[1][0] if days != 1 else None, days) if judged else ""
            _report_figures(section, this_label, runs, baseline, judged, failures, explain)
            report = runs[-1].report
            section.figures.append(Figure(f"report, {this_label}, queries", report["source"]["queries"], "queries"))
            section.figures.append(Figure(f"report, {this_label}, peak RSS",
                                          max(r.max_rss_bytes for r in runs) / 2**20, "MiB"))
            sanity_goal = "report = generated fleet"
            section.figures.append(Figure(
                f"report, {this_label}, totals checked against the fleet", len(failures), "mismatches", "", None,
                sanity_goal, not failures, "; ".join(failures)))
            if range_days == days:
                truth_rows = rows
            section.notes.append(
                f"`--range {range_days}d`: runs {', '.join(f'{r.seconds:.2f}' for r in runs)} s; CPU of the report "
                f"{', '.join(f'{r.cpu_seconds:.1f}' for r in runs)} s, of VictoriaMetrics "
                f"{', '.join(f'{r.server_cpu_seconds:.1f}' for r in runs)} s; peak RSS "
                f"{', '.join(f'{r.max_rss_bytes / 2**20:.0f}' for r in runs)} MiB; "
                f"{report['source']['queries']} queries at a {report['source'].get('step_seconds')} s step; "
                f"{len(report.get('recommendations', []))} recommendations; "
                f"{len(report.get('services', []))} services; "
                f"{len(report.get('warnings', []))} warnings"
                + (f" ({'; '.join(report['warnings'][:3])})" if report.get("warnings") else "") + ".")
        if all_failures:
            section.notes.insert(0, "**Sanity check failed** (the report disagrees with the generated fleet): "
                                 + "; ".join(all_failures))
        section.notes.append(
            f"Data: {generated.samples:,} samples in {generated.series:,} series ({generated.series / gpus:.1f} per "
            f"GPU) over {days} × {STEPS_PER_DAY} steps ending at {rfc3339(end)} (`--end`), "
            f"{generated.bytes / 2**30:.2f} GiB of JSON lines{' (sent gzip-compressed)' if compress else ''} in "
            f"{generated.bytes / (8 * 2**20):.0f} bodies of about 8 MiB, POSTed by {senders} threads; "
            f"{generated.profiles} distinct day profiles. Posting took {posting:.1f} s and /internal/force_flush "
            f"{ingest - posting:.1f} s; the generator and VictoriaMetrics share the machine's {os.cpu_count()} cores. "
            f"Peak RSS of the harness (generator included) {generator_rss / 2**20:.0f} MiB; VictoriaMetrics "
            f"{vm_rss_after_import / 2**20:.0f} MiB after the import.")
        section.notes.append(
            f"Stored samples checked before timing: `sum(count_over_time({SELECTOR}[{days}d]))` = {stored:,.0f} "
            f"(took {count_seconds:.1f} s, which also warms the page cache as a long-running server's would be).")
        section.notes.append(f"`python -m gpuphase report --help` alone (interpreter and imports) took "
                             f"{startup:.2f} s.")
        _, _, layouts = layout(hosts, seed)
        counts = {name: layouts.count(name) for name in LAYOUTS if layouts.count(name)}
        section.notes.append("Hosts by layout: " + ", ".join(f"{name} {n}" for name, n in counts.items()) + ".")
        if truth_rows:
            section.tables.append(Table([f"--range {days}d", "generated", "report", "difference"], truth_rows))
    return section


def quick_kwargs() -> dict:
    return {"hosts": 10, "days": 3}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.fleet_report", description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", type=int, default=HOSTS)
    parser.add_argument("--days", type=int, default=DAYS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--gzip", action="store_true", help="send the import bodies gzip-compressed")
    args = parser.parse_args(argv)
    section = run(args.hosts, args.days, args.repeats, args.senders, args.gzip)
    print(json.dumps(section.to_dict(), indent=2))
    return 1 if any(f.met is False and f.unit == "mismatches" for f in section.figures) else 0


if __name__ == "__main__":
    sys.exit(main())
