"""Configuration: defaults -> YAML file (--config) -> GPUPHASE_* environment -> command-line flags.

Every setting is declared once, as a field of the frozen Config (flag name, default, parser,
help); OPTIONS is read off those fields, and the CLI, the YAML keys and the environment variables
are all derived from it. The layers are merged once into a Config. Errors name where the bad value came from: the file and line,
the environment variable, or the flag.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterable, Mapping

import yaml

from gpuphase.model.addresses import parse_listen_address, push_target
from gpuphase.model.durations import MIN_PUSH_INTERVAL, MIN_SAMPLE_INTERVAL, parse_duration
from gpuphase.model.metricdefs import collectors

ENV_PREFIX = "GPUPHASE_"


class ConfigError(ValueError):
    """A setting is wrong. The message says where it came from and why; the agent exits with it."""


# --- value parsers: each takes a YAML/env/flag value and returns the typed value or raises ValueError


def parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected a whole number, got {value!r}")
    try:
        number = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise ValueError(f"expected a whole number, got {value!r}") from None
    if number < 0:
        raise ValueError(f"expected a number >= 0, got {number}")
    return number


def parse_size(value: Any) -> int:
    """Bytes from 4194304, '4MiB', '512KiB', '1GiB'."""
    if isinstance(value, int) and not isinstance(value, bool):
        return parse_int(value)
    match = re.match(r"^\s*([0-9]+)\s*(B|KiB|MiB|GiB)?\s*$", str(value))
    if not match:
        raise ValueError(f"expected a size such as 4MiB or 65536, got {value!r}")
    scale = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, None: 1}[match.group(2)]
    return int(match.group(1)) * scale


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def parse_str(value: Any) -> str:
    if isinstance(value, (dict, list)):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return "" if value is None else str(value)


def choice(*allowed: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = parse_str(value)
        if text not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {text!r}")
        return text

    return parse


def parse_phase_map(value: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """SERVICE=GPUS entries; GPUS are indices or UUIDs, comma-separated. A list or one string."""
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        text = parse_str(item).strip()
        service, sep, gpus = text.partition("=")
        gpu_list = tuple(g.strip() for g in gpus.split(",") if g.strip())
        if not sep or not service.strip() or not gpu_list:
            raise ValueError(f"expected SERVICE=GPUS such as vllm=0,1 or vllm=GPU-xxxx, got {text!r}")
        out.append((service.strip(), gpu_list))
    return tuple(out)


# --- the options -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One setting: its flag (without the leading --), Config field, default, parser and help.

    The flag also names the YAML key and, upper-cased with `.` and `-` as `_` behind GPUPHASE_,
    the environment variable.
    """

    flag: str
    field: str
    default: Any
    parse: Callable[[Any], Any]
    help: str
    multiple: bool = False
    is_flag: bool = False

    @property
    def env(self) -> str:
        return ENV_PREFIX + re.sub(r"[.\-]", "_", self.flag).upper()


def option(flag: str, default: Any, parse: Callable[[Any], Any], help: str, *, multiple: bool = False,
           is_flag: bool = False) -> Any:
    """A Config field declared with everything its Option needs; OPTIONS is read off the fields."""
    spec = {"flag": flag, "parse": parse, "help": help, "multiple": multiple, "is_flag": is_flag}
    return field(default=default, metadata={"option": spec})


def _parse_collectors(value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return tuple(parse_str(item) for item in items if str(item))


@dataclass(frozen=True)
class Config:
    """Every setting of `gpuphase run` (and `demo`), in --help order. Built by build_config()."""

    web_listen_address: str = option(
        "web.listen-address", ":9842", parse_listen_address,
        "Address for /metrics, /-/healthy and /-/ready (':9842' = all interfaces).")
    web_config_file: str = option(
        "web.config.file", "", parse_str,
        "Exporter-toolkit web config (TLS, basic auth) for /metrics, / and the /-/ probes.")
    otlp_web_config_file: str = option(
        "otlp.web-config.file", "", parse_str,
        "The same format for both OTLP receivers (gRPC and HTTP): TLS and basic auth. Separate from the "
        "metrics one so that turning on TLS for scrapes does not break model servers sending plain OTLP.")
    web_telemetry_path: str = option("web.telemetry-path", "/metrics", parse_str, "Path of the metrics endpoint.")
    backend: str = option(
        "backend", "auto", choice("auto", "nvml", "sim"),
        "Where GPU data comes from. auto = NVML; never falls back to simulated data.")
    sim_gpus: int = option("sim.gpus", 2, parse_int, "Number of simulated GPUs (backend sim).")
    sim_profile: str = option(
        "sim.profile", "h100-sxm-80gb", parse_str,
        "Simulated GPU model: h100-sxm-80gb (GPM) or a100-sxm-80gb (no GPM).")
    sim_seed: int = option("sim.seed", 0, parse_int, "Seed of the simulator's noise (reproducible runs).")
    sample_interval: float = option(
        "sample.interval", 1.0, parse_duration, "Sampling period of the NVML counters (minimum 100ms).")
    sample_timeout: float = option(
        "sample.timeout", 5.0, parse_duration,
        "A GPU whose reading takes longer is reported gpu_up 0 until it answers again.")
    nvml_wait: bool = option(
        "nvml.wait", False, parse_bool,
        "Keep retrying when the NVIDIA driver is not (yet) loaded instead of exiting.", is_flag=True)
    otlp_grpc_listen_address: str = option(
        "otlp.grpc-listen-address", "127.0.0.1:4317", parse_listen_address,
        "OTLP/gRPC trace receiver address; empty disables.")
    otlp_http_listen_address: str = option(
        "otlp.http-listen-address", "127.0.0.1:4318", parse_listen_address,
        "OTLP/HTTP trace receiver address (POST /v1/traces); empty disables.")
    otlp_metrics_endpoint: str = option(
        "otlp.metrics-endpoint", "", parse_str,
        "Also push the /metrics families (same names and units) to an OTLP receiver such as an OpenTelemetry "
        "Collector: host:port or http(s)://host:port for OTLP/gRPC, a URL ending in /v1/metrics for OTLP/HTTP. "
        "Empty: no push.")
    otlp_metrics_interval: float = option(
        "otlp.metrics-interval", 15.0, parse_duration,
        "How often metrics are pushed to --otlp.metrics-endpoint (minimum 1s).")
    otlp_metrics_insecure: bool = option(
        "otlp.metrics-insecure", False, parse_bool,
        "Push metrics in plaintext: a bare host:port then means no TLS, and http:// may name a host that is "
        "not loopback (refused otherwise).", is_flag=True)
    otlp_max_request_bytes: int = option(
        "otlp.max-request-size", 4 * 1024 * 1024, parse_size, "Largest OTLP request accepted (after decompression).")
    otlp_queue_size: int = option(
        "otlp.queue-size", 256, parse_int, "OTLP requests waiting to be decoded before senders are told to retry.")
    phase_map: tuple[tuple[str, tuple[str, ...]], ...] = option(
        "phase.map", (), parse_phase_map,
        "SERVICE=GPUS: tie a service's spans to GPUs (indices or UUIDs). Repeatable.", multiple=True)
    phase_settle: float = option(
        "phase.settle", 60.0, parse_duration,
        "How long samples wait for late spans before their phase is final: longer than your longest request "
        "plus the sender's batch delay (vLLM sends a span when the request ends, 5s batches).")
    phase_retention: float = option(
        "phase.retention", 300.0, parse_duration,
        "How much sample history is kept per GPU; spans older than this are dropped and counted.")
    phase_max_services: int = option(
        "phase.max-services", 32, parse_int, "Distinct service label values kept; later ones are folded into 'other'.")
    process_max_series: int = option(
        "process.max-series", 64, parse_int,
        "Per-process series kept per GPU (largest memory first); the rest are left out.")
    log_format: str = option("log.format", "text", choice("text", "json"), "Log format.")
    log_level: str = option("log.level", "info", choice("debug", "info", "warn", "error"), "Log level.")
    disabled_collectors: tuple[str, ...] = option(
        "collector.disable", (), _parse_collectors, "Collectors to turn off (also --no-collector.NAME).",
        multiple=True)

    def collector_enabled(self, name: str) -> bool:
        return name not in self.disabled_collectors


OPTIONS: tuple[Option, ...] = tuple(
    Option(field=f.name, default=f.default, **f.metadata["option"]) for f in fields(Config))
OPTIONS_BY_FLAG = {option.flag: option for option in OPTIONS}


# --- sources ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """A raw value and where it came from, for error messages."""

    value: Any
    source: str


def read_yaml_settings(path: str) -> dict[str, Setting]:
    """Flatten a YAML config file to {flag: Setting}, keeping file:line for every key.

    Keys are the flag names (`sample.interval: 2s`) or the same nested (`sample: {interval: 2s}`).
    """
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file: {err.strerror or err}") from None
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return {}
        if not isinstance(root, yaml.MappingNode):
            raise ConfigError(f"{path}:{root.start_mark.line + 1}: the config file must be a mapping of settings")
        out: dict[str, Setting] = {}
        _flatten(loader, root, "", path, out)
        return out
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {err.problem or err.context}") from None
    finally:
        loader.dispose()


def _flatten(loader, node, prefix: str, path: str, out: dict[str, Setting]) -> None:
    for key_node, value_node in node.value:
        key = prefix + str(key_node.value)
        where = f"{path}:{key_node.start_mark.line + 1}"
        if key in OPTIONS_BY_FLAG:
            out[key] = Setting(loader.construct_object(value_node, deep=True), where)
        elif isinstance(value_node, yaml.MappingNode) and any(f.startswith(key + ".") for f in OPTIONS_BY_FLAG):
            _flatten(loader, value_node, key + ".", path, out)
        else:
            hint = difflib.get_close_matches(key, OPTIONS_BY_FLAG, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"{where}: unknown setting {key!r}{suggestion}")


def read_env_settings(environ: Mapping[str, str]) -> dict[str, Setting]:
    out = {}
    for option in OPTIONS:
        if option.env in environ:
            out[option.flag] = Setting(environ[option.env], f"environment variable {option.env}")
    return out


def build_config(layers: Iterable[Mapping[str, Setting]]) -> Config:
    """Apply each layer of settings in order over the defaults, parse, validate, freeze."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for layer in layers:
        for flag, setting in layer.items():
            option = OPTIONS_BY_FLAG[flag]
            try:
                values[option.field] = option.parse(setting.value)
            except ValueError as err:
                raise ConfigError(f"{setting.source}: {flag}: {err}") from None
            sources[option.field] = setting.source
    config = replace(Config(), **values)
    _validate(config, sources)
    return config


def _validate(config: Config, sources: Mapping[str, str]) -> None:
    def flag_of(field_name: str) -> str:
        return next(o.flag for o in OPTIONS if o.field == field_name)

    def fail(field_name: str, reason: str, other: str | None = None) -> None:
        """Name where the value came from; for a rule between two settings, where the other came from too."""
        where = sources.get(field_name, "default")
        if other is not None and where == "default" and other in sources:
            field_name, other = other, field_name  # blame the one the user actually set
            where = sources[field_name]
        detail = f" ({flag_of(other)} is {getattr(config, other)!r}, from {sources.get(other, 'default')})" \
            if other else ""
        raise ConfigError(f"{where}: {flag_of(field_name)}: {reason}{detail}")

    if config.sample_interval < MIN_SAMPLE_INTERVAL:
        fail("sample_interval", f"must be at least {MIN_SAMPLE_INTERVAL}s (NVML GPM needs >= 100ms between samples)")
    if config.sample_timeout < config.sample_interval:
        fail("sample_timeout", "sample.timeout must be at least sample.interval", other="sample_interval")
    if config.phase_retention <= config.phase_settle:
        fail("phase_retention", "phase.retention must be longer than phase.settle", other="phase_settle")
    if config.backend == "sim" and not 1 <= config.sim_gpus <= 64:
        fail("sim_gpus", "must be between 1 and 64")
    if config.otlp_max_request_bytes < 1024:
        fail("otlp_max_request_bytes", "must be at least 1KiB")
    if config.phase_max_services < 1:
        fail("phase_max_services", "must be at least 1")
    if not config.web_listen_address:
        fail("web_listen_address", "cannot be empty")
    if config.otlp_metrics_endpoint:
        try:
            push_target(config.otlp_metrics_endpoint, config.otlp_metrics_insecure)
        except ValueError as err:
            fail("otlp_metrics_endpoint", str(err))
        if config.otlp_metrics_interval < MIN_PUSH_INTERVAL:
            fail("otlp_metrics_interval", f"--otlp.metrics-interval must be at least {MIN_PUSH_INTERVAL:g}s, "
                                          f"got {config.otlp_metrics_interval:g}s")
    unknown = sorted(set(config.disabled_collectors) - set(collectors()))
    if unknown:
        fail("disabled_collectors", f"unknown collector {unknown[0]!r}; known: {', '.join(collectors())}")
    for name in ("web_config_file", "otlp_web_config_file"):
        path = getattr(config, name)
        if path and not os.path.isfile(path):
            fail(name, f"file {path!r} does not exist")
