"""The `gpuphase` command line. Flags are generated from gpuphase.agent.config.OPTIONS, so the CLI, the
YAML keys and the GPUPHASE_* environment variables can never drift apart."""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import click

from gpuphase import __version__
from gpuphase.agent.config import (
    OPTIONS,
    Config,
    ConfigError,
    Option,
    Setting,
    build_config,
    defaults_yaml,
    describe_changes,
    format_value,
    parse_duration,
    parse_size,
    read_env_settings,
    read_yaml_settings,
    setting_sources,
    unknown_env_warnings,
)
from gpuphase.model.metricdefs import collectors


def _option_decorators() -> list[Callable]:
    decorators = []
    for option in OPTIONS:
        if option.field == "disabled_collectors":
            continue  # expressed as --collector.NAME / --no-collector.NAME below
        if option.is_flag:
            decorators.append(click.option(f"--{option.flag}/--no-{option.flag}", option.field, default=None,
                                           help=f"{option.help} [default: {_show(option)}; env {option.env}]"))
        else:
            decorators.append(click.option(f"--{option.flag}", option.field, default=None, multiple=option.multiple,
                                           metavar=_metavar(option),
                                           help=f"{option.help} [default: {_show(option)}; env {option.env}]"))
    for name in collectors():
        decorators.append(click.option(f"--collector.{name}/--no-collector.{name}", f"collector_{name}", default=None,
                                       help=f"Enable the {name} collector (default: enabled)."))
    decorators.append(click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                                   envvar="GPUPHASE_CONFIG", help="YAML file of settings (keys are the flag names)."))
    return decorators


def _metavar(option: Option) -> str:
    if option.parse is parse_duration:
        return "DURATION"
    if option.parse is parse_size:
        return "SIZE"
    return {bool: "BOOL", int: "N"}.get(type(option.default), "TEXT")


def _show(option: Option) -> str:
    """The default as the README writes it: 1s, 4MiB, off; 'empty' and 'none' for nothing."""
    if option.default == "":
        return "empty"
    if option.default == ():
        return "none"
    return format_value(option, option.default)


def agent_options(func: Callable) -> Callable:
    for decorator in reversed(_option_decorators()):
        func = decorator(func)
    return func


def config_from_cli(params: dict[str, Any], environ=os.environ) -> Config:
    """Merge defaults -> --config YAML -> GPUPHASE_* env -> flags into one validated Config."""
    return build_config(config_layers(params, environ))


def config_layers(params: dict[str, Any], environ=os.environ) -> list[dict[str, Setting]]:
    """The settings of --config's file, the GPUPHASE_* environment and the flags, in that order
    (for build_config). Reads the file; a ConfigError names what is wrong with it."""
    config_file = params.get("config_file")
    file_layer = read_yaml_settings(config_file) if config_file else {}
    env_layer = read_env_settings(environ)
    flag_layer: dict[str, Setting] = {}
    for option in OPTIONS:
        value = params.get(option.field)
        if value is None or (option.multiple and value == ()):
            continue
        flag_layer[option.flag] = Setting(list(value) if option.multiple else value, f"flag --{option.flag}")
    toggles = {name: params.get(f"collector_{name}") for name in collectors()}
    if any(value is not None for value in toggles.values()):
        disabled = set(_disabled_from(file_layer, env_layer))
        disabled |= {name for name, enabled in toggles.items() if enabled is False}
        disabled -= {name for name, enabled in toggles.items() if enabled is True}
        flag_layer["collector.disable"] = Setting(sorted(disabled), "flags --[no-]collector.*")
    return [file_layer, env_layer, flag_layer]


def _disabled_from(*layers: dict[str, Setting]) -> list[str]:
    """The collectors a file or the environment turned off; flags may turn them on again."""
    from gpuphase.agent.config import OPTIONS_BY_FLAG

    parse = OPTIONS_BY_FLAG["collector.disable"].parse
    out: list[str] = []
    for layer in layers:
        if "collector.disable" in layer:
            setting = layer["collector.disable"]
            try:
                out = list(parse(setting.value))
            except ValueError as err:
                raise ConfigError(f"{setting.source}: collector.disable: {err}") from None
    return out


def _fail(message: str) -> None:
    click.echo(f"gpuphase: {message}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, "--version", prog_name="gpuphase")
def main() -> None:
    """gpuphase: GPU observability for LLM serving. NVML counters split by serving phase
    (prefill, decode, mixed, idle), exported to Prometheus."""


@main.command()
@agent_options
def run(**params: Any) -> None:
    """Run the agent: sample every GPU, receive model-server spans, serve /metrics."""
    try:
        config = config_from_cli(params)
    except ConfigError as err:
        _fail(str(err))
    from gpuphase.agent.app import run_agent

    sys.exit(run_agent(config))


@main.group("config")
def config_group() -> None:
    """Check the settings, or print every setting with its default."""


@config_group.command("check", short_help="Validate the settings as `run` would, starting nothing.")
@agent_options
def config_check(**params: Any) -> None:
    """Validate --config's file, the GPUPHASE_* environment and the flags exactly as `gpuphase run`
    would, web config files included, without starting anything or touching a GPU. Prints
    `config OK` and the settings that differ from the defaults (exit 0), or the error (exit 2).
    Unknown GPUPHASE_* variables are warned about on stderr, as `run` does at start."""
    for warning in unknown_env_warnings(os.environ):
        click.echo(f"gpuphase: warning: {warning}", err=True)
    try:
        layers = config_layers(params)
        config = build_config(layers)
        _check_web_configs(config)
    except ConfigError as err:
        _fail(str(err))
    changes = describe_changes(config, setting_sources(layers))
    click.echo("config OK" + ("; settings that differ from the defaults:" if changes else
                              " (every setting at its default)"))
    for line in changes:
        click.echo(line)


def _check_web_configs(config: Config) -> None:
    """Load the web config files as the servers would at start (TLS files and all, no socket)."""
    from gpuphase.exporters.webconfig import load_web_config

    for flag, path in (("web.config.file", config.web_config_file),
                       ("otlp.web-config.file", config.otlp_web_config_file)):
        if path:
            try:
                load_web_config(path)
            except (ValueError, OSError) as err:  # WebConfigError is a ValueError
                raise ConfigError(f"{flag}: {err}") from None


@config_group.command("defaults", short_help="Print every setting with its default, as YAML.")
def config_defaults() -> None:
    """Print every setting with its default and help as a commented YAML file for --config."""
    click.echo(defaults_yaml(), nl=False)


@main.command()
@agent_options
@click.option("--demo.scenario", "demo_scenario", default="mixed-fleet", show_default=True,
              help="Synthetic workload: see `gpuphase demo --list-scenarios`.")
@click.option("--demo.duration", "demo_duration", default=None, type=float,
              help="Stop after this many seconds (default: run until interrupted).")
@click.option("--demo.truth-file", "demo_truth_file", default=None, type=click.Path(dir_okay=False),
              help="Write the workload's ground truth (phase seconds and activity per GPU) to this JSON file on exit "
                   "and every 5 seconds.")
@click.option("--list-scenarios", is_flag=True, help="List the demo scenarios and exit.")
def demo(**params: Any) -> None:
    """The agent on simulated GPUs plus a synthetic LLM-serving workload that sends real OTLP spans
    to the agent's own receiver. Everything a user sees on a real node, on a laptop."""
    from gpuphase.demo.run import run_demo
    from gpuphase.demo.scenarios import SCENARIOS

    if params.pop("list_scenarios"):
        for name, scenario in SCENARIOS.items():
            click.echo(f"{name:22} {scenario.description}")
        return
    demo_settings = {key: params.pop(key) for key in list(params) if key.startswith("demo_")}
    if params.get("backend") in (None, "sim"):
        params["backend"] = "sim"
    else:
        _fail("gpuphase demo always runs on simulated GPUs; drop --backend")
    try:
        config = config_from_cli(params)
    except ConfigError as err:
        _fail(str(err))
    if demo_settings["demo_scenario"] not in SCENARIOS:
        _fail(f"unknown scenario {demo_settings['demo_scenario']!r}; known: {', '.join(SCENARIOS)}")
    sys.exit(run_demo(config, **demo_settings))


def _duration_at_least(minimum: float, text: str) -> Callable[[click.Context, click.Parameter, str], float]:
    """A click callback parsing a duration flag (90s, 2m) that must be at least `minimum` seconds."""
    def parse(ctx: click.Context, param: click.Parameter, value: str) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError as err:
            raise click.BadParameter(str(err)) from None
        if seconds < minimum:
            raise click.BadParameter(f"at least {text}, got {value!r}")
        return seconds

    return parse


_parse_interval = _duration_at_least(0.1, "100ms")


@main.command()
@click.option("--url", default="http://127.0.0.1:9842/metrics", show_default=True,
              help="The agent's metrics endpoint; may carry basic auth as https://user:password@host:port/metrics.")
@click.option("--user", default=None, help="Basic auth user (the agent's --web.config.file basic_auth_users).")
@click.option("--password-file", type=click.Path(dir_okay=False), default=None,
              help="File holding the basic auth password (trailing newline ignored).")
@click.option("--ca-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="CA certificate(s) to verify an https:// agent with.")
@click.option("--insecure", is_flag=True, help="Do not verify the https:// agent's certificate.")
@click.option("--interval", default="1s", show_default=True, callback=_parse_interval, metavar="DURATION",
              help="Refresh period (a duration: 1s, 500ms); match the agent's --sample.interval.")
@click.option("--timeout", "scrape_timeout", default="5s", show_default=True, callback=_parse_interval,
              metavar="DURATION",
              help="Give up on one scrape after this long.")
@click.option("--sort", default="gpu", show_default=True,
              type=click.Choice(["gpu", "power", "memory", "activity", "energy/token"]),  # = top.view.SORT_ORDER
              help="First sort order of the GPU rows (`s` cycles it).")
@click.option("--processes", "max_processes", default=10, show_default=True, type=click.IntRange(0),
              help="Rows of the process table.")
@click.option("--once", "run_once", is_flag=True,
              help="Print one frame (two readings --interval apart, for the phase shares) and exit; 1 when the "
                   "agent cannot be scraped.")
@click.option("--plain", is_flag=True, help="ASCII frames without colour even on a terminal.")
def top(url: str, user: str | None, password_file: str | None, ca_file: str | None, insecure: bool, interval: float,
        scrape_timeout: float, sort: str, max_processes: int, run_once: bool, plain: bool) -> None:
    """Live view of one node from an agent's /metrics: per GPU its phase now and over the last
    minute, SM/tensor/DRAM activity, VRAM, power, energy per token; services; top processes.
    Keys: q quits, s cycles the sort order. Plain text frames when stdout is not a terminal."""
    from gpuphase.top.app import run_top
    from gpuphase.top.fetch import make_target

    try:
        target = make_target(url, user=user, password_file=password_file, ca_file=ca_file, insecure=insecure,
                             timeout=scrape_timeout)
    except ValueError as err:
        _fail(str(err))
    sys.exit(run_top(target, interval=interval, run_once=run_once, sort=sort, plain=plain,
                     max_processes=max_processes))


@main.command(short_help="Waste, right-sizing and cost report from a Prometheus-compatible API.")
@click.option("--prometheus.url", "url", required=True, envvar="GPUPHASE_REPORT_PROMETHEUS_URL",
              help="The API's root: Prometheus, Thanos Query, Mimir (…/prometheus) or VictoriaMetrics.")
@click.option("--range", "range_text", default="7d", show_default=True, metavar="DURATION",
              help="How far back from --end (e.g. 24h, 7d, 30d).")
@click.option("--end", "end_text", default="now", show_default=True, metavar="TIME",
              help="End of the range: now, Unix seconds or RFC 3339 (2026-12-01T00:00:00Z).")
@click.option("--selector", default='{job=~".*gpuphase.*"}', show_default=True,
              help="Label matchers choosing the agents' series (the alert rules' agent selector by default).")
@click.option("--price.gpu-hour", "gpu_hour", type=float, default=None, metavar="PRICE",
              help="One price per GPU-hour for every GPU model.")
@click.option("--price.file", "price_file", type=click.Path(dir_okay=False), default=None,
              help="YAML prices per GPU model, with memory bandwidth and an energy price (docs/report.md).")
@click.option("--price.currency", "currency", default="USD", show_default=True,
              help="Currency of --price.gpu-hour (a price file names its own).")
@click.option("--format", "fmt", type=click.Choice(["text", "markdown", "json", "html"]), default="text",
              show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None, help="File to write (default stdout).")
@click.option("--prometheus.timeout", "timeout", default="2m", show_default=True, callback=_duration_at_least(0.001, "1ms"),
              metavar="DURATION", help="Per query.")
@click.option("--prometheus.username", "username", default=None, help="Basic auth user.")
@click.option("--prometheus.password-file", "password_file", type=click.Path(dir_okay=False), default=None,
              help="File holding the basic auth password.")
@click.option("--prometheus.bearer-token-file", "bearer_token_file", type=click.Path(dir_okay=False), default=None,
              help="File holding a bearer token (e.g. a service account token).")
@click.option("--prometheus.ca-file", "ca_file", type=click.Path(dir_okay=False), default=None,
              help="CA bundle verifying an https:// API.")
@click.option("--prometheus.cert-file", "cert_file", type=click.Path(dir_okay=False), default=None,
              help="Client certificate (mutual TLS).")
@click.option("--prometheus.key-file", "key_file", type=click.Path(dir_okay=False), default=None,
              help="Client certificate's key.")
@click.option("--prometheus.insecure-skip-verify", "insecure_skip_verify", is_flag=True,
              help="Do not verify the API's certificate.")
def report(url: str, range_text: str, end_text: str, selector: str, gpu_hour: float | None, price_file: str | None,
           currency: str, fmt: str, output: str | None, timeout: float, **auth: Any) -> None:
    """Per GPU and per service over a range: hours by phase, idle GPU-hours (allocated but idle, and
    unused) and their cost, bandwidth-bound hours, VRAM headroom, energy and energy per token; then
    recommendations with their evidence and monthly savings. Reads the recording rules of group
    gpuphase.report (alerts/gpuphase-rules.yaml). docs/report.md."""
    from gpuphase.report.main import run as run_report

    sys.exit(run_report(url=url, range_text=range_text, end_text=end_text, selector=selector, gpu_hour=gpu_hour,
                        price_file=price_file, currency=currency, fmt=fmt, output=output, timeout=timeout, auth=auth))


if __name__ == "__main__":
    main()
