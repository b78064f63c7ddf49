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
