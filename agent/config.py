"""Configuration: defaults -> YAML file (--config) -> GPUPHASE_* environment -> command-line flags.

Every setting is declared once, as a field of the frozen Config (flag name, default, parser,
help); OPTIONS is read off those fields, and the CLI, the YAML keys and the environment variables
are all derived from it. The layers are merged once into a Config. Errors name where the bad value came from: the file and line,
the environment variable, or the flag.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterable, Mapping

import yaml

from gpuphase.model.addresses import parse_listen_address, push_target
from gpuphase.model.durations import MIN_PUSH_INTERVAL, MIN_SAMPLE_INTERVAL, format_duration, parse_duration
from gpuphase.model.files import (
    MAX_CONFIG_BYTES,
    MAX_SCALAR_CHARS,
    ConfigFileError,
    compose_yaml,
    construct_yaml,
    read_config_bytes,
    read_config_text,
)
from gpuphase.model.metricdefs import collectors

ENV_PREFIX = "GPUPHASE_"

# Bounds on what any source may hand a parser: hostile or mistaken values end in a message, never
# in a traceback (int() refuses more than 4300 digits, float() overflows) or an endless start-up.
MAX_VALUE_CHARS = MAX_SCALAR_CHARS  # one value (PATH_MAX is 4096 too)
MAX_INT = 2**31 - 1  # any whole-number setting; the counts have tighter bounds in _validate
MAX_DURATION = 86400.0  # any duration: a day, far above every sensible period, timeout or window
MAX_REQUEST_BYTES = 64 * 1024 * 1024  # grpc's limits are C ints; 64 MiB is already far above a span batch
MAX_QUEUE_SIZE = 65536  # queued OTLP requests (each up to the request size)
MAX_LABEL_VALUES = 10000  # phase.max-services, process.max-series: series cardinality
_MAX_NODES = 10000  # YAML nodes in one setting's value (lists of GPUs, collectors, phase maps)
_MAX_MESSAGE = 600  # characters of one error message


class ConfigError(ValueError):
    """A setting is wrong. The message says where it came from and why; the agent exits with it.

    Always one line of bounded length: a value quoted in it may be hostile.
    """

    def __init__(self, message: str):
        text = " ".join(str(message).split())
        super().__init__(text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE - 4] + " ...")


def _show(value: Any) -> str:
    """repr() of a value for a message, shortened: it may be a megabyte of junk."""
    if isinstance(value, int) and value.bit_length() > 128:  # repr() refuses more than 4300 digits
        return f"a number of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:48]}... ({len(text)} characters)"


# --- value parsers: each takes a YAML/env/flag value and returns the typed value or raises ValueError


def parse_int(value: Any) -> int:
    """A whole number from 0 to MAX_INT."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"expected a whole number, got {_show(value)}")
    if isinstance(value, int):
        number = value
    else:
        text = value.strip()
        if len(text.lstrip("+-").lstrip("0")) > len(str(MAX_INT)) and text.lstrip("+-").isdecimal():
            raise ValueError(f"expected a whole number of at most {MAX_INT}, got {len(text)} digits")
        try:
            number = int(text)
        except ValueError:
            raise ValueError(f"expected a whole number, got {_show(value)}") from None
    if number < 0:
        raise ValueError(f"expected a number >= 0, got {_show(number)}")
    if number > MAX_INT:
        raise ValueError(f"expected a whole number of at most {MAX_INT}, got {_show(number)}")
    return number


def parse_size(value: Any) -> int:
    """Bytes from 4194304, '4MiB', '512KiB', '1GiB'."""
    if isinstance(value, int) and not isinstance(value, bool):
        return parse_int(value)
    match = re.match(r"^\s*([0-9]{1,20})\s*(B|KiB|MiB|GiB)?\s*$", str(value)) if isinstance(value, str) else None
    if not match:
        raise ValueError(f"expected a size such as 4MiB or 65536, got {_show(value)}")
    scale = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, None: 1}[match.group(2)]
    return int(match.group(1)) * scale  # at most 20 digits: each option's own bound is in _validate


def format_size(size: int) -> str:
    """4194304 -> '4MiB': the largest unit that divides exactly (a bare number otherwise), as
    parse_size reads it back."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def format_seconds(seconds: float) -> str:
    """1.0 -> '1s', 300.0 -> '5m', 0.25 -> '250ms': a duration as the README writes it, which
    parse_duration reads back (a bare number of seconds when no unit fits exactly)."""
    if float(seconds).is_integer():
        return format_duration(int(seconds)) if seconds else "0s"
    milliseconds = seconds * 1000
    if abs(milliseconds - round(milliseconds)) < 1e-6:
        return f"{round(milliseconds)}ms"
    return repr(float(seconds))


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {_show(value)}")


def parse_str(value: Any) -> str:
    """A single-line string (paths, URLs, names); a YAML number or date is taken as written."""
    if isinstance(value, (dict, list, tuple, set, bytes)):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    text = "" if value is None else str(value)
    if len(text) > MAX_VALUE_CHARS:
        raise ValueError(f"expected at most {MAX_VALUE_CHARS} characters, got {len(text)}")
    bad = next((char for char in text if char < " " or char == "\x7f"), None)
    if bad is not None:
        raise ValueError(f"control character {bad!r} in {_show(text)}")
    return text


def choice(*allowed: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = parse_str(value)
        if text not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}, got {_show(text)}")
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
            raise ValueError(f"expected SERVICE=GPUS such as vllm=0,1 or vllm=GPU-xxxx, got {_show(text)}")
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
    otlp_max_spans_per_request: int = option(
        "otlp.max-spans-per-request", 16384, parse_int,
        "Most spans one OTLP request may hold; more is refused (HTTP 413, gRPC RESOURCE_EXHAUSTED) before it is "
        "parsed. Bounds a request's memory: a span costs ~720 bytes parsed and decoded (docs/spans.md).")
    otlp_max_items_per_request: int = option(
        "otlp.max-items-per-request", 262144, parse_int,
        "Most attributes, events, links and other messages besides spans one OTLP request may hold (each ~88 bytes "
        "parsed); OTLP/JSON may also hold at most twice this many JSON values and containers. More is refused "
        "like too many spans.")
    otlp_max_spans_per_second: int = option(
        "otlp.max-spans-per-second", 100000, parse_int,
        "Spans accepted per second over both OTLP receivers (a token bucket holding one second's worth); beyond it "
        "senders are told to retry (HTTP 503, gRPC UNAVAILABLE). 0: no limit.")
    otlp_max_concurrent_parses: int = option(
        "otlp.max-concurrent-parses", 2, parse_int,
        "OTLP requests parsed and decoded at once, over both receivers; others wait up to 1s, then are told to "
        "retry. Peak memory grows by up to this many times one request's worst case (docs/spans.md).")
    otlp_grpc_max_concurrent_rpcs: int = option(
        "otlp.grpc-max-concurrent-rpcs", 16, parse_int,
        "OTLP/gRPC calls in progress at once; grpc refuses more with RESOURCE_EXHAUSTED (not counted).")
    phase_map: tuple[tuple[str, tuple[str, ...]], ...] = option(
        "phase.map", (), parse_phase_map,
        "SERVICE=GPUS: tie a service's spans to GPUs (indices or UUIDs). Repeatable. A GPU the host does not "
        "have is warned about at start and when the GPUs change; that service's spans are dropped meanwhile.",
        multiple=True)
    phase_settle: float = option(
        "phase.settle", 60.0, parse_duration,
        "How long samples wait for late spans before their phase is final: longer than your longest request "
        "plus the sender's batch delay (vLLM sends a span when the request ends, 5s batches).")
    phase_retention: float = option(
        "phase.retention", 300.0, parse_duration,
        "How much sample history is kept per GPU; spans older than this are dropped and counted.")
    phase_max_services: int = option(
        "phase.max-services", 32, parse_int,
        "Service label values shared by services not in --phase.map (those always keep their own); a slot "
        "unused for an hour can be reused, otherwise later services are folded into 'other'.")
    phase_trust_span_gpus: bool = option(
        "phase.trust-span-gpus", False, parse_bool,
        "Let a span place its time on the GPUs it names (gpuphase.gpu.ids) when its service has no --phase.map "
        "entry, pid or pod on them. Off: such claims are refused and counted (gpu_not_permitted).", is_flag=True)
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
    The file must be a regular file of at most MAX_CONFIG_BYTES (gpuphase.model.files); every
    error, YAML's own included, is a ConfigError naming the file and, where known, the line.
    """
    try:
        text = read_config_text(path)
    except ConfigFileError as err:
        raise ConfigError(f"{err.where(path)}: cannot read config file: {err.reason}") from None
    try:
        loader, root = compose_yaml(text)
    except ConfigFileError as err:
        raise ConfigError(f"{err.where(path)}: {err.reason}") from None
    try:
        if root is None:
            return {}
        if not isinstance(root, yaml.MappingNode):
            raise ConfigError(f"{path}:{root.start_mark.line + 1}: the config file must be a mapping of settings")
        out: dict[str, Setting] = {}
        _flatten(loader, root, "", path, out)
        return out
    finally:
        loader.dispose()


def _flatten(loader, node, prefix: str, path: str, out: dict[str, Setting]) -> None:
    for key_node, value_node in node.value:
        where = f"{path}:{key_node.start_mark.line + 1}"
        if not isinstance(key_node, yaml.ScalarNode):
            raise ConfigError(f"{where}: a setting's name must be a plain word, not a {key_node.id}")
        key = prefix + str(key_node.value)
        if key in OPTIONS_BY_FLAG:
            out[key] = Setting(_construct(loader, value_node, path, key), where)
        elif isinstance(value_node, yaml.MappingNode) and any(f.startswith(key + ".") for f in OPTIONS_BY_FLAG):
            _flatten(loader, value_node, key + ".", path, out)
        else:
            hint = difflib.get_close_matches(key[:100], OPTIONS_BY_FLAG, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"{where}: unknown setting {_show(key)}{suggestion}")


def _construct(loader, node, path: str, flag: str) -> Any:
    """One setting's value, bounded: gpuphase.model.files.construct_yaml."""
    try:
        return construct_yaml(loader, node, _MAX_NODES, MAX_VALUE_CHARS)
    except ConfigFileError as err:
        raise ConfigError(f"{err.where(path)}: {flag}: {err.reason}") from None


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
                _check_length(setting.value)
                values[option.field] = option.parse(setting.value)
            except (ValueError, OverflowError, TypeError, RecursionError) as err:
                raise ConfigError(f"{setting.source}: {flag}: {err}") from None
            sources[option.field] = setting.source
    config = replace(Config(), **values)
    _validate(config, sources)
    return config


def _check_length(value: Any) -> None:
    """Refuse a value (or list item) longer than MAX_VALUE_CHARS before any parser sees it."""
    for item in value if isinstance(value, (list, tuple)) else (value,):
        if isinstance(item, str) and len(item) > MAX_VALUE_CHARS:
            raise ValueError(f"value longer than {MAX_VALUE_CHARS} characters ({len(item)})")


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

    for option in OPTIONS:  # every duration, before the rules below compare them
        seconds = getattr(config, option.field)
        if option.parse is parse_duration and not (math.isfinite(seconds) and seconds <= MAX_DURATION):
            fail(option.field, f"must be a finite duration of at most {MAX_DURATION / 3600:g}h, got {seconds!r}")
    if config.sample_interval < MIN_SAMPLE_INTERVAL:
        fail("sample_interval", f"must be at least {MIN_SAMPLE_INTERVAL}s (NVML GPM needs >= 100ms between samples)")
    if config.sample_timeout < config.sample_interval:
        fail("sample_timeout", "sample.timeout must be at least sample.interval", other="sample_interval")
    if config.phase_retention <= config.phase_settle:
        fail("phase_retention", "phase.retention must be longer than phase.settle", other="phase_settle")
    if config.backend == "sim" and not 1 <= config.sim_gpus <= 64:
        fail("sim_gpus", "must be between 1 and 64")
    if not 1024 <= config.otlp_max_request_bytes <= MAX_REQUEST_BYTES:
        fail("otlp_max_request_bytes", f"must be between 1KiB and {MAX_REQUEST_BYTES // 1024**2}MiB, "
                                       f"got {config.otlp_max_request_bytes} bytes")
    if not 1 <= config.otlp_queue_size <= MAX_QUEUE_SIZE:
        fail("otlp_queue_size", f"must be between 1 and {MAX_QUEUE_SIZE}, got {config.otlp_queue_size}")
    for name in ("otlp_max_spans_per_request", "otlp_max_items_per_request", "otlp_max_concurrent_parses",
                 "otlp_grpc_max_concurrent_rpcs"):
        if getattr(config, name) < 1:
            fail(name, "must be at least 1")
    if not 1 <= config.phase_max_services <= MAX_LABEL_VALUES:
        fail("phase_max_services", f"must be between 1 and {MAX_LABEL_VALUES}, got {config.phase_max_services}")
    if config.process_max_series > MAX_LABEL_VALUES:
        fail("process_max_series", f"must be at most {MAX_LABEL_VALUES}, got {config.process_max_series}")
    if not config.web_listen_address:
        fail("web_listen_address", "cannot be empty")
    if not config.web_telemetry_path.startswith("/"):
        fail("web_telemetry_path", f"must start with '/', got {_show(config.web_telemetry_path)}")
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
        if path:
            try:  # read in full later, by the server; here the same rules, for the same clear exit
                read_config_bytes(path, MAX_CONFIG_BYTES)
            except ConfigFileError as err:
                fail(name, f"file {_show(path)}: {err.reason}")


# --- what an operator reads: values in human form, the defaults file, warnings --------------------------

# GPUPHASE_* variables that are not settings of their own but are ours: no warning for them.
OTHER_ENV = {
    "GPUPHASE_CONFIG": "the --config file",
    "GPUPHASE_ARGS": "more flags, for the systemd unit (packaging/systemd)",
    "GPUPHASE_USER": "packaging/install.sh",
    "GPUPHASE_EXTRAS": "scripts/setup.sh",
    "GPUPHASE_ALERT_SCALE": "scripts/demo-stack.sh",
}
_MAX_ENV_WARNINGS = 20  # the environment is the operator's, but a warning per variable stays bounded
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_]{1,100}")


def format_value(option: Option, value: Any) -> str:
    """A setting's value as the README and --help write it: 1s, 4MiB, off, vllm=0,1."""
    if option.parse is parse_duration:
        return format_seconds(value)
    if option.parse is parse_size:
        return format_size(value)
    if isinstance(value, bool):
        return "on" if value else "off"
    if option.parse is parse_phase_map:
        return " ".join(f"{service}={','.join(gpus)}" for service, gpus in value)
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def yaml_value(option: Option, value: Any) -> str:
    """A setting's value as one line of YAML in the same human form, which the option's parser
    reads back to the same value (a list for the repeatable ones)."""
    if isinstance(value, bool):
        return "on" if value else "off"  # YAML 1.1 booleans, as the README writes them
    if option.parse is parse_phase_map:
        data: Any = [f"{service}={','.join(gpus)}" for service, gpus in value]
    elif isinstance(value, tuple):
        data = list(value)
    elif option.parse in (parse_duration, parse_size):
        data = format_value(option, value)
    else:
        data = value
    text = yaml.safe_dump(data, default_flow_style=True, width=1 << 20)
    return text.removesuffix("\n...\n").strip()


def defaults_yaml() -> str:
    """Every setting with its default and help, as a commented YAML file for --config that gives
    the defaults back (`gpuphase config defaults`)."""
    lines = [
        "# gpuphase settings, each at its default (`gpuphase config defaults`).",
        "# Use with `gpuphase run --config FILE` (or GPUPHASE_CONFIG=FILE); keep only what you change.",
        "# Keys are the flag names, flat as here or nested (sample: {interval: 1s}). Precedence:",
        "# defaults < this file < GPUPHASE_* environment variables < flags.",
        "# Durations: 500ms, 1s, 1m30s, 5m, 1h; sizes: 65536, 512KiB, 4MiB; switches: on/off.",
    ]
    for option in OPTIONS:
        lines.append("")
        lines.extend("# " + line for line in _wrap(option.help, 98))
        if option.flag == "collector.disable":
            lines.extend("# " + line for line in _wrap("Collectors: " + ", ".join(collectors()) + ".", 98))
        flag = f"--[no-]{option.flag}" if option.is_flag else f"--{option.flag}"
        lines.append(f"# flag {flag}{' (repeatable)' if option.multiple else ''}, env {option.env}")
        lines.append(f"{option.flag}: {yaml_value(option, option.default)}")
    return "\n".join(lines) + "\n"


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False) or [""]


def setting_sources(layers: Iterable[Mapping[str, Setting]]) -> dict[str, str]:
    """flag -> where its value came from, the last layer winning (as in build_config)."""
    sources: dict[str, str] = {}
    for layer in layers:
        for flag, setting in layer.items():
            sources[flag] = setting.source
    return sources


def describe_changes(config: Config, sources: Mapping[str, str] | None = None) -> list[str]:
    """One YAML line per setting that differs from its default, with where it came from as a comment:
    `sample.interval: 2s  # environment variable GPUPHASE_SAMPLE_INTERVAL`."""
    defaults = Config()
    out = []
    for option in OPTIONS:
        value = getattr(config, option.field)
        if value == getattr(defaults, option.field):
            continue
        shown = yaml_value(option, value)
        if option.flag == "otlp.metrics-endpoint":  # a URL may carry user:password@
            shown = re.sub(r"(//)[^/@\s]*@", r"\1***@", shown)
        where = (sources or {}).get(option.flag)
        out.append(f"{option.flag}: {shown}" + (f"  # {where}" if where else ""))
    return out


def unknown_env_warnings(environ: Mapping[str, str]) -> list[str]:
    """One line per GPUPHASE_* variable (in any case) that is no setting: ignored, and so most
    likely a typo. With the closest known name when there is one."""
    known = sorted({option.env for option in OPTIONS} | set(OTHER_ENV))
    unknown = sorted(name for name in environ
                     if name.upper().startswith(ENV_PREFIX) and name not in known)
    out = []
    for name in unknown[:_MAX_ENV_WARNINGS]:
        shown = name if _PLAIN_NAME.fullmatch(name) else _show(name)
        hint = difflib.get_close_matches(name[:100].upper(), known, n=1, cutoff=0.75)
        suggestion = f" (did you mean {hint[0]}?)" if hint else ""
        out.append(f"environment variable {shown} is not a gpuphase setting and is ignored{suggestion}")
    if len(unknown) > _MAX_ENV_WARNINGS:
        out.append(f"... and {len(unknown) - _MAX_ENV_WARNINGS} more unknown GPUPHASE_* environment variables")
    return out
