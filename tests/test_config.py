"""Config precedence (defaults -> YAML -> env -> flags) and errors that say where and why."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from gpuphase.agent.config import Config, ConfigError, parse_duration, parse_size
from gpuphase.cli import config_from_cli, main


def params(**given):
    return given


def test_defaults_are_the_documented_ones():
    config = config_from_cli({}, environ={})
    assert config == Config()
    assert config.otlp_grpc_listen_address == "127.0.0.1:4317"  # loopback unless told otherwise
    assert config.otlp_http_listen_address == "127.0.0.1:4318"
    assert config.backend == "auto"


def test_precedence_file_then_env_then_flags(tmp_path):
    path = tmp_path / "gpuphase.yaml"
    path.write_text("sample.interval: 2s\nweb:\n  listen-address: ':9000'\nlog.level: debug\n")
    env = {"GPUPHASE_SAMPLE_INTERVAL": "500ms", "GPUPHASE_LOG_FORMAT": "json"}
    config = config_from_cli({"config_file": str(path), "log_level": "warn"}, environ=env)
    assert config.web_listen_address == ":9000"  # file
    assert config.sample_interval == 0.5  # env beats file
    assert config.log_format == "json"  # env
    assert config.log_level == "warn"  # flag beats file


def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("backend: sim\n\nsample.intervall: 1s\n")
    with pytest.raises(ConfigError) as err:
        config_from_cli({"config_file": str(path)}, environ={})
    assert f"{path}:3" in str(err.value)
    assert "sample.intervall" in str(err.value) and "sample.interval" in str(err.value)


def test_wrong_type_in_file_names_line_and_reason(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sim:\n  gpus: many\n")
    with pytest.raises(ConfigError, match=rf"{path}:2: sim.gpus: expected a whole number"):
        config_from_cli({"config_file": str(path)}, environ={})


def test_broken_yaml_names_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("backend: sim\nsample.interval: [1s\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: invalid YAML"):
        config_from_cli({"config_file": str(path)}, environ={})


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        config_from_cli({"config_file": str(tmp_path / "nope.yaml")}, environ={})


def test_env_error_names_the_variable():
    with pytest.raises(ConfigError, match="GPUPHASE_BACKEND: backend: expected one of auto, nvml, sim"):
        config_from_cli({}, environ={"GPUPHASE_BACKEND": "magic"})


def test_sample_interval_minimum_is_enforced():
    with pytest.raises(ConfigError, match="flag --sample.interval: sample.interval: must be at least 0.1s"):
        config_from_cli({"sample_interval": "50ms"}, environ={})


def test_phase_map_parses_indices_and_uuids():
    config = config_from_cli({"phase_map": ("vllm=0,1", "tgi=GPU-abc")}, environ={})
    assert config.phase_map == (("vllm", ("0", "1")), ("tgi", ("GPU-abc",)))
    with pytest.raises(ConfigError, match="SERVICE=GPUS"):
        config_from_cli({"phase_map": ("vllm",)}, environ={})


def test_collector_toggles_from_file_and_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("collector.disable: [processes, mig]\n")
    config = config_from_cli({"config_file": str(path), "collector_mig": True, "collector_gpm": False}, environ={})
    assert set(config.disabled_collectors) == {"processes", "gpm"}
    with pytest.raises(ConfigError, match="unknown collector 'nope'"):
        config_from_cli({}, environ={"GPUPHASE_COLLECTOR_DISABLE": "nope"})


@pytest.mark.parametrize("text,seconds", [("1s", 1.0), ("250ms", 0.25), ("2m", 120.0), ("1h", 3600.0), (3, 3.0)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


def test_sizes():
    assert parse_size("4MiB") == 4 * 1024 * 1024
    with pytest.raises(ValueError):
        parse_size("4 megabytes")


def test_cli_reports_config_errors_with_exit_code_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("nonsense: 1\n")
    result = CliRunner().invoke(main, ["run", "--config", str(path)])
    assert result.exit_code == 2
    assert f"{path}:1: unknown setting 'nonsense'" in result.output


def test_version_and_help():
    runner = CliRunner()
    assert "gpuphase, version" in runner.invoke(main, ["--version"]).output
    help_text = runner.invoke(main, ["run", "--help"]).output
    for flag in ("--web.listen-address", "--web.config.file", "--backend", "--sim.gpus", "--sample.interval",
                 "--otlp.grpc-listen-address", "--otlp.http-listen-address", "--phase.map", "--log.format",
                 "--no-collector.processes", "GPUPHASE_SAMPLE_INTERVAL"):
        assert flag in help_text


def test_rule_between_two_settings_blames_the_one_the_user_set(tmp_path):
    path = tmp_path / "slow.yaml"
    path.write_text("backend: sim\nsample.interval: 10s\n")
    with pytest.raises(ConfigError) as err:
        config_from_cli({"config_file": str(path)}, environ={})
    message = str(err.value)
    assert message.startswith(f"{path}:2: sample.interval:"), message
    assert "sample.timeout" in message and "default" in message


def test_bad_push_endpoint_is_a_config_error():
    with pytest.raises(ConfigError, match="flag --otlp.metrics-endpoint: otlp.metrics-endpoint"):
        config_from_cli({"otlp_metrics_endpoint": "ftp://collector"}, environ={})


def _readme_flag_rows() -> list[tuple[list[str], list[str]]]:
    """(flags, defaults) of each row of README.md's flag table."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    rows = []
    for line in text.splitlines():
        if line.startswith("| `--"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            flags = re.findall(r"`--([^`\s]+)[^`]*`", cells[0])
            rows.append((flags, re.findall(r"`([^`]*)`", cells[1])))
    return rows


def test_readme_flag_table_names_every_option_with_its_default():
    from gpuphase.agent.config import OPTIONS, OPTIONS_BY_FLAG

    rows = _readme_flag_rows()
    documented = {flag for flags, _ in rows for flag in flags}
    # --collector.disable is spelled --[no-]collector.NAME in the table.
    assert documented - {"[no-]collector.NAME"} == {o.flag for o in OPTIONS} - {"collector.disable"}
    for flags, defaults in rows:
        if flags == ["[no-]collector.NAME"]:
            continue
        options = [OPTIONS_BY_FLAG[flag] for flag in flags]
        if not defaults:  # an empty cell: no default
            assert all(o.default in ("", (), False) for o in options), flags
            continue
        assert len(defaults) == len(options), flags
        for option, default in zip(options, defaults):
            value = option.parse(False if default == "off" else default)
            assert value == option.default, (option.flag, default)


# --- hostile input: every error one line naming where and why, never a traceback -------------------

# (flag, value, reason): the same text from a file (as YAML), the environment and a flag.
HOSTILE = [
    ("otlp.max-request-size", "100GiB", r"must be between 1KiB and 64MiB"),
    ("otlp.max-request-size", "9" * 30 + "GiB", r"expected a size"),
    ("sim.seed", "1" * 100_000, r"longer than 4096 characters"),  # int() refuses > 4300 digits
    ("sim.seed", "1" * 4000, r"at most 2147483647"),
    ("sim.gpus", "-1", r">= 0"),
    ("otlp.queue-size", "0", r"between 1 and 65536"),
    ("phase.max-services", "99999999", r"between 1 and 10000"),
    ("process.max-series", "2147483648", r"at most 2147483647"),
    ("sample.timeout", "1" * 400 + "s", r"finite duration"),
    ("phase.settle", "1" * 400, r"finite duration|too large"),  # YAML: an int float() cannot take
    ("phase.retention", "1e309", r"expected a duration"),
    ("sample.interval", "nan", r"expected a duration"),
    ("sample.interval", "-1s", r"expected a duration"),
    ("web.telemetry-path", "metrics", r"must start with '/'"),
    ("log.level", "x" * 5000, r"longer than 4096 characters"),
    ("web.config.file", "/dev/zero", r"not a regular file \(a character device\)"),
    ("phase.map", "vllm", r"SERVICE=GPUS"),
]
BOMB = "[" + ", ".join(f"&a{i} [{', '.join([f'*a{i - 1}' if i else 'x'] * 9)}]" for i in range(10)) + "]"
# YAML only: tags, special floats, dates, nesting, sexagesimal ints, aliases.
HOSTILE_YAML = [
    ("sample.interval", ".nan", r"finite duration"),
    ("phase.retention", ".inf", r"finite duration"),
    ("sample.timeout", "1.0e+309", r"finite duration"),
    ("backend", "!!python/object/apply:os.system [id]", r"could not determine a constructor"),
    ("sim.profile", "2001-13-45", r"invalid value: month must be in 1..12"),
    ("sim.profile", "!!binary AAAA", r"expected a string, got bytes"),
    ("phase.map", "[" * 3000 + "]" * 3000, r"invalid YAML: nested too deeply"),  # while composing
    ("sim.seed", ":".join(["1"] + ["0"] * 3000), r"longer than 4096 characters"),
    ("sim.seed", "0x" + "f" * 4000, r"at most 2147483647, got a number of 16000 bits"),  # repr() would fail
    ("collector.disable", BOMB, r"expected a string, got list"),
    ("sim.profile", "&a [*a]", r"recursive"),
]
HOSTILE_TEXT = [("sim.profile", "a\x01b", r"control character")]  # YAML refuses it itself


@pytest.fixture
def cli(monkeypatch):
    """`gpuphase run` in process, which must stop at the configuration: a config that passed
    would start the agent, so run_agent is replaced by one that says so."""
    import gpuphase.agent.app

    monkeypatch.setattr(gpuphase.agent.app, "run_agent", lambda config: pytest.fail(f"accepted: {config}"))

    def invoke(args, env=None):
        return CliRunner().invoke(main, ["run", "--backend", "sim", *args], env=env)

    return invoke


def assert_one_line_error(result, where: str, flag: str, reason: str) -> None:
    import re

    assert result.exit_code == 2, (result.exit_code, result.output[:500], result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and len(lines[0]) <= 620, lines
    # A YAML error found while composing the file precedes any setting; the rest name theirs.
    prefix = f"gpuphase: {where}: " + ("" if reason.startswith("invalid YAML") else f"{flag}: ")
    assert lines[0].startswith(prefix), lines[0]
    assert re.search(reason, lines[0]), lines[0]


@pytest.mark.parametrize("flag, value, reason", HOSTILE + HOSTILE_YAML, ids=lambda v: str(v)[:30])
def test_hostile_value_in_the_file(cli, tmp_path, flag, value, reason):
    path = tmp_path / "hostile.yaml"
    path.write_text(f"backend: sim\n{flag}: {value}\n")
    assert_one_line_error(cli(["--config", str(path)]), f"{path}:2", flag, reason)


@pytest.mark.parametrize("flag, value, reason", HOSTILE + HOSTILE_TEXT, ids=lambda v: str(v)[:30])
def test_hostile_value_in_the_environment(cli, flag, value, reason):
    from gpuphase.agent.config import OPTIONS_BY_FLAG

    env = OPTIONS_BY_FLAG[flag].env
    assert_one_line_error(cli([], env={env: value}), f"environment variable {env}", flag, reason)


@pytest.mark.parametrize("flag, value, reason", HOSTILE + HOSTILE_TEXT, ids=lambda v: str(v)[:30])
def test_hostile_value_as_a_flag(cli, flag, value, reason):
    assert_one_line_error(cli([f"--{flag}", value]), f"flag --{flag}", flag, reason)


def test_an_alias_bomb_outside_the_settings_is_never_expanded(tmp_path):
    lines = ["backend: sim", "a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=rf"^{path}:2: unknown setting 'a0'$"):
        config_from_cli({"config_file": str(path)}, environ={})


def test_only_a_regular_file_of_at_most_1mib_is_read(tmp_path):
    import os
    import socket

    from gpuphase.agent.config import read_yaml_settings

    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 110_000)
    sock_path = tmp_path / "s.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    try:
        for path, reason in ((tmp_path, "not a regular file (a directory)"), ("/dev/zero", "(a character device)"),
                             (sock_path, "(a socket)"), (fifo, "(a FIFO)"),
                             (big, "larger than 1 MiB, the limit for a config file")):
            with pytest.raises(ConfigError) as err:
                read_yaml_settings(str(path))
            assert str(err.value).startswith(f"{path}: cannot read config file: ") and reason in str(err.value)
    finally:
        server.close()
    junk = tmp_path / "junk.yaml"
    junk.write_bytes(b"backend: sim\nsim.profile: \xff\xfe\n")
    with pytest.raises(ConfigError, match=rf"^{junk}:2: cannot read config file: not UTF-8 text"):
        read_yaml_settings(str(junk))
    control = tmp_path / "control.yaml"
    control.write_bytes(b"backend: sim\n\n\x00\n")
    with pytest.raises(ConfigError, match=rf"^{control}:3: invalid YAML: character 0x0 is not allowed"):
        read_yaml_settings(str(control))


@pytest.mark.parametrize("source", ["file", "env", "flag", "fifo"])
def test_the_real_command_exits_2_with_one_line(tmp_path, source):
    """The agent as started by systemd: 100GiB once ended in grpc's OverflowError traceback, and
    a FIFO as --config waited for a writer forever."""
    import os
    import subprocess
    import sys

    path = tmp_path / "gpuphase.yaml"
    env = {key: value for key, value in os.environ.items() if not key.startswith("GPUPHASE_")}
    args = [sys.executable, "-m", "gpuphase", "run", "--backend", "sim"]
    if source == "file":
        path.write_text("backend: sim\notlp.max-request-size: 100GiB\n")
        args += ["--config", str(path)]
    elif source == "env":
        env["GPUPHASE_OTLP_MAX_REQUEST_SIZE"] = "100GiB"
    elif source == "flag":
        args += ["--otlp.max-request-size", "100GiB"]
    else:
        os.mkfifo(path)
        args += ["--config", str(path)]
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60, check=False)
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    expected = {"file": f"{path}:2: otlp.max-request-size: must be between 1KiB and 64MiB",
                "env": "environment variable GPUPHASE_OTLP_MAX_REQUEST_SIZE: otlp.max-request-size: must be between",
                "flag": "flag --otlp.max-request-size: otlp.max-request-size: must be between",
                "fifo": f"{path}: cannot read config file: not a regular file (a FIFO)"}[source]
    assert lines[0].startswith(f"gpuphase: {expected}"), lines[0]


# --- human forms, the defaults file, unknown variables ------------------------------------------------


@pytest.mark.parametrize("size, text", [(4 * 1024 * 1024, "4MiB"), (1024, "1KiB"), (3 * 1024**3, "3GiB"),
                                        (1536, "1536"), (65536, "64KiB"), (0, "0"), (1000, "1000")])
def test_format_size_is_read_back_by_parse_size(size, text):
    from gpuphase.agent.config import format_size

    assert format_size(size) == text
    assert parse_size(text) == size


@pytest.mark.parametrize("seconds, text", [(1.0, "1s"), (5.0, "5s"), (15.0, "15s"), (60.0, "1m"), (300.0, "5m"),
                                           (0.1, "100ms"), (0.25, "250ms"), (1.5, "1500ms"), (0.0, "0s"),
                                           (3600.0, "1h"), (86400.0, "1d"), (90.0, "90s"), (0.0001, "0.0001")])
def test_format_seconds_is_read_back_by_parse_duration(seconds, text):
    from gpuphase.agent.config import format_seconds

    assert format_seconds(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)


def test_every_default_in_human_form_parses_back_to_itself():
    import yaml

    from gpuphase.agent.config import OPTIONS, format_value, yaml_value

    for option in OPTIONS:
        assert option.parse(yaml.safe_load(yaml_value(option, option.default))) == option.default, option.flag
        if not option.multiple:
            assert option.parse(format_value(option, option.default) if option.default != "" else "") \
                == option.default, option.flag


def test_defaults_yaml_round_trip(tmp_path):
    from gpuphase.agent.config import defaults_yaml

    path = tmp_path / "defaults.yaml"
    path.write_text(defaults_yaml())
    assert config_from_cli({"config_file": str(path)}, environ={}) == Config()


def test_non_default_settings_round_trip_through_their_listing(tmp_path):
    """What `config check` lists is a config file giving the same settings back."""
    from gpuphase.agent.config import describe_changes

    config = config_from_cli({"backend": "sim", "sample_interval": "250ms", "sample_timeout": "90s",
                              "phase_map": ("vllm=0,1", "tgi=GPU-a:b,2"), "otlp_max_request_bytes": "1536",
                              "web_listen_address": ":9000", "sim_profile": "a100-sxm-80gb",
                              "phase_trust_span_gpus": True, "collector_gpm": False, "collector_mig": False},
                             environ={})
    path = tmp_path / "listing.yaml"
    path.write_text("\n".join(describe_changes(config)) + "\n")
    assert config_from_cli({"config_file": str(path)}, environ={}) == config


def test_unknown_environment_variables_are_warnings_with_the_name_meant():
    from gpuphase.agent.config import OPTIONS, unknown_env_warnings

    known = {option.env: "x" for option in OPTIONS}
    assert unknown_env_warnings({**known, "GPUPHASE_ARGS": "", "GPUPHASE_CONFIG": "", "PATH": "/bin",
                                 "NOT_GPUPHASE_X": "1"}) == []
    warnings = unknown_env_warnings({"GPUPHASE_SAMPLE_INTERVL": "2s", "gpuphase_log_level": "debug",
                                     "GPUPHASE_WHATEVER": "1", "GPUPHASE_PHASE_MAPS": "vllm=0"})
    assert warnings == [
        "environment variable GPUPHASE_PHASE_MAPS is not a gpuphase setting and is ignored "
        "(did you mean GPUPHASE_PHASE_MAP?)",
        "environment variable GPUPHASE_SAMPLE_INTERVL is not a gpuphase setting and is ignored "
        "(did you mean GPUPHASE_SAMPLE_INTERVAL?)",
        "environment variable GPUPHASE_WHATEVER is not a gpuphase setting and is ignored",
        "environment variable gpuphase_log_level is not a gpuphase setting and is ignored "
        "(did you mean GPUPHASE_LOG_LEVEL?)",
    ]
    # The variables that are set still count: a warning never changes the configuration.
    assert config_from_cli({}, environ={"GPUPHASE_SAMPLE_INTERVL": "2s"}) == Config()


def test_unknown_environment_variable_warnings_are_bounded():
    from gpuphase.agent.config import unknown_env_warnings

    warnings = unknown_env_warnings({f"GPUPHASE_JUNK_{i:03d}": "" for i in range(500)}
                                    | {"GPUPHASE_\x1b[2J" + "X" * 10_000: ""})
    assert len(warnings) == 21 and warnings[-1] == "... and 481 more unknown GPUPHASE_* environment variables"
    assert all(len(line) < 300 and "\x1b" not in line for line in warnings)
