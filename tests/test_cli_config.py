"""`gpuphase config check` / `config defaults`, the warnings about unknown GPUPHASE_* variables and
about --phase.map GPUs the host does not have, and --help's defaults in human form.

The commands run for real (`python -m gpuphase ...` in a subprocess), as an operator runs them.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from gpuphase.agent.config import OPTIONS, Config, describe_changes
from gpuphase.cli import config_from_cli, main
from gpuphase.model.snapshot import GpuIdentity, GpuSample, Snapshot
from tests.agentproc import ROOT, AgentProcess, poll


def gpuphase(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """`python -m gpuphase ARGS` with none of the runner's GPUPHASE_* variables, plus `env`."""
    environ = {key: value for key, value in os.environ.items() if not key.startswith("GPUPHASE_")}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH", "")]))
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "gpuphase", *args], capture_output=True, text=True, env=environ,
                          cwd=ROOT, timeout=timeout, check=False)


# --- config check ------------------------------------------------------------------------------------


def test_check_of_the_defaults_says_ok():
    result = gpuphase("config", "check")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "config OK (every setting at its default)\n"
    assert result.stderr == ""


def test_check_lists_what_differs_from_the_defaults_and_where_it_came_from(tmp_path):
    path = tmp_path / "gpuphase.yaml"
    path.write_text("backend: sim\nsample:\n  interval: 2s\n")
    result = gpuphase("config", "check", "--config", str(path), "--phase.map", "vllm=0,1", "--no-collector.gpm",
                      "--otlp.max-request-size", "8MiB", env={"GPUPHASE_SAMPLE_TIMEOUT": "10s",
                                                              "GPUPHASE_NVML_WAIT": "true"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "config OK; settings that differ from the defaults:"
    assert lines[1:] == [
        f"backend: sim  # {path}:1",
        f"sample.interval: 2s  # {path}:3",
        "sample.timeout: 10s  # environment variable GPUPHASE_SAMPLE_TIMEOUT",
        "nvml.wait: on  # environment variable GPUPHASE_NVML_WAIT",
        "otlp.max-request-size: 8MiB  # flag --otlp.max-request-size",
        "phase.map: ['vllm=0,1']  # flag --phase.map",
        "collector.disable: [gpm]  # flags --[no-]collector.*",
    ]
    # The listing is itself a config file giving the same settings.
    listing = tmp_path / "listing.yaml"
    listing.write_text("\n".join(lines[1:]) + "\n")
    assert config_from_cli({"config_file": str(listing)}, environ={}) == config_from_cli(
        {"config_file": str(path), "phase_map": ("vllm=0,1",), "collector_gpm": False,
         "otlp_max_request_bytes": "8MiB"},
        environ={"GPUPHASE_SAMPLE_TIMEOUT": "10s", "GPUPHASE_NVML_WAIT": "true"})


@pytest.mark.parametrize("source", ["file", "env", "flag", "rule"])
def test_check_fails_with_the_very_line_run_prints(tmp_path, source):
    """The same code path as `run`: the same one-line error and exit 2, for every source."""
    path = tmp_path / "gpuphase.yaml"
    args: list[str] = ["--backend", "sim"]
    env: dict[str, str] = {}
    if source == "file":
        path.write_text("backend: sim\n\nsample.intervall: 1s\n")
        args += ["--config", str(path)]
    elif source == "env":
        env["GPUPHASE_OTLP_MAX_REQUEST_SIZE"] = "100GiB"
    elif source == "flag":
        args += ["--log.level", "loud"]
    else:
        path.write_text("sample.interval: 10s\n")  # longer than the default sample.timeout
        env["GPUPHASE_CONFIG"] = str(path)
    check = gpuphase("config", "check", *args, env=env)
    run = gpuphase("run", *args, env=env)
    assert check.returncode == run.returncode == 2, (check.stderr, run.stderr)
    assert check.stdout == ""
    lines = check.stderr.splitlines()
    assert len(lines) == 1 and lines == run.stderr.splitlines(), (check.stderr, run.stderr)
    assert lines[0].startswith("gpuphase: ") and "Traceback" not in check.stderr
    expected = {"file": f"{path}:3: unknown setting 'sample.intervall' (did you mean 'sample.interval'?)",
                "env": "environment variable GPUPHASE_OTLP_MAX_REQUEST_SIZE: otlp.max-request-size: must be",
                "flag": "flag --log.level: log.level: expected one of debug, info, warn, error",
                "rule": f"{path}:1: sample.interval: sample.timeout must be at least sample.interval"}[source]
    assert lines[0].startswith(f"gpuphase: {expected}"), lines[0]


def test_check_starts_no_server_and_touches_no_gpu():
    """A port in use and a host without the NVIDIA driver are `run`'s problems, not the config's."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = gpuphase("config", "check", "--backend", "nvml", "--web.listen-address", f"127.0.0.1:{port}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "config OK; settings that differ from the defaults:",
        f"web.listen-address: 127.0.0.1:{port}  # flag --web.listen-address",  # in --help's order
        "backend: nvml  # flag --backend",
    ]


def test_check_reads_the_web_config_files_as_the_servers_would(tmp_path):
    web = tmp_path / "web.yml"
    web.write_text("tls_server_config:\n  cert_file: /nonexistent/cert.pem\n  key_file: /nonexistent/key.pem\n")
    result = gpuphase("config", "check", "--otlp.web-config.file", str(web))
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gpuphase: otlp.web-config.file: {web}"), lines
    web.write_text("basic_auth_users: {}\n")
    ok = gpuphase("config", "check", "--web.config.file", str(web))
    assert ok.returncode == 0, ok.stderr


def test_check_hides_a_password_in_the_push_endpoint():
    result = gpuphase("config", "check", "--otlp.metrics-endpoint", "https://user:secret@collector:4317")
    assert result.returncode == 0, result.stderr
    assert "secret" not in result.stdout
    assert "otlp.metrics-endpoint: https://***@collector:4317  # flag --otlp.metrics-endpoint" in result.stdout


# --- unknown GPUPHASE_* variables -----------------------------------------------------------------------


def test_check_warns_of_an_unknown_variable_with_the_name_meant():
    result = gpuphase("config", "check", env={"GPUPHASE_SAMPLE_INTERVL": "500ms", "GPUPHASE_ARGS": "",
                                              "GPUPHASE_LOG_LEVEL": "debug"})
    assert result.returncode == 0, result.stderr  # a warning, not an error
    assert result.stderr.splitlines() == [
        "gpuphase: warning: environment variable GPUPHASE_SAMPLE_INTERVL is not a gpuphase setting and is ignored "
        "(did you mean GPUPHASE_SAMPLE_INTERVAL?)"]
    assert result.stdout.splitlines() == ["config OK; settings that differ from the defaults:",
                                          "log.level: debug  # environment variable GPUPHASE_LOG_LEVEL"]


def test_run_logs_the_same_warnings_at_start():
    env = {"GPUPHASE_SAMPLE_INTERVL": "500ms", "GPUPHASE_LOG_FORMAT": "json"}
    with AgentProcess(["--backend", "sim", "--sim.gpus", "1"], env=env) as agent:
        lines = [line for line in agent.stderr_text().splitlines() if "GPUPHASE_SAMPLE_INTERVL" in line]
    assert len(lines) == 1, lines
    assert '"level": "warning"' in lines[0] and "did you mean GPUPHASE_SAMPLE_INTERVAL?" in lines[0]


# --- config defaults ---------------------------------------------------------------------------------------


def test_defaults_file_loads_back_to_the_defaults(tmp_path):
    result = gpuphase("config", "defaults")
    assert result.returncode == 0 and result.stderr == ""
    path = tmp_path / "defaults.yaml"
    path.write_text(result.stdout)
    assert config_from_cli({"config_file": str(path)}, environ={}) == Config()
    check = gpuphase("config", "check", "--config", str(path))
    assert check.returncode == 0 and check.stdout == "config OK (every setting at its default)\n", check.stderr


def test_defaults_file_names_every_setting_with_its_help_in_human_form():
    text = CliRunner().invoke(main, ["config", "defaults"]).output
    data = yaml.safe_load(text)
    assert list(data) == [option.flag for option in OPTIONS]
    lines = text.splitlines()
    for option in OPTIONS:
        assert f"# flag --{'[no-]' if option.is_flag else ''}{option.flag}" in text
        assert f"env {option.env}" in text
        assert option.help.split()[0] in text
    for line in ("sample.interval: 1s", "sample.timeout: 5s", "otlp.metrics-interval: 15s",
                 "otlp.max-request-size: 4MiB", "phase.retention: 5m", "nvml.wait: off",
                 "phase.trust-span-gpus: off", "phase.map: []", "collector.disable: []", "backend: auto"):
        assert line in lines, line
    assert "phase.settle: 1m" in lines or "phase.settle: 60s" in lines
    assert "4194304" not in text and "1.0" not in text


# --- --help ---------------------------------------------------------------------------------------------------


def test_help_shows_defaults_in_human_form():
    help_text = " ".join(CliRunner().invoke(main, ["run", "--help"]).output.split())  # unwrapped
    for shown in ("--sample.interval DURATION", "[default: 1s; env GPUPHASE_SAMPLE_INTERVAL]",
                  "[default: 5s; env GPUPHASE_SAMPLE_TIMEOUT]", "--otlp.max-request-size SIZE",
                  "[default: 4MiB; env GPUPHASE_OTLP_MAX_REQUEST_SIZE]", "[default: 15s; env",
                  "[default: 5m; env GPUPHASE_PHASE_RETENTION]", "[default: off; env GPUPHASE_NVML_WAIT]",
                  "[default: none; env GPUPHASE_PHASE_MAP]", "[default: empty; env GPUPHASE_WEB_CONFIG_FILE]"):
        assert shown in help_text, shown
    for raw in ("4194304", "default: 1.0", "default: 5.0", "default: 300.0", "default: False", "default: ()",
                "default: ''"):
        assert raw not in help_text, raw
    assert "check" in CliRunner().invoke(main, ["config", "--help"]).output


# --- --phase.map naming a GPU the host does not have -----------------------------------------------------


def _snapshot(*uuids: str) -> Snapshot:
    return Snapshot(1.0, tuple(GpuSample(GpuIdentity(index, uuid, "H100"), True, 1.0) for index, uuid in
                               enumerate(uuids)))


def test_phase_map_unknown_gpus_are_warned_once_per_change_of_the_gpus(caplog):
    from gpuphase.agent.app import Agent

    config = config_from_cli({"backend": "sim", "phase_map": ("vllm=0,GPU-bbb", "tgi=7", "ok=1")}, environ={})
    agent = Agent(config)
    caplog.set_level(logging.INFO, logger="gpuphase.agent.app")

    def messages() -> list[str]:
        out = [record.getMessage() for record in caplog.records if "phase.map" in record.getMessage()]
        caplog.clear()
        return out

    agent._on_snapshot(_snapshot("GPU-aaa", "GPU-bbb"))
    first = messages()
    assert first == [f"--phase.map tgi: GPU '7' is not on this host (its GPUs: 0 (GPU-aaa), 1 (GPU-bbb)); "
                     f"spans of tgi are dropped and counted as unknown_gpu"]
    assert all(record.levelno == logging.WARNING for record in caplog.records)
    for _ in range(3):  # every tick: no spam
        agent._on_snapshot(_snapshot("GPU-aaa", "GPU-bbb"))
    assert messages() == []
    agent._on_snapshot(_snapshot("GPU-aaa", "GPU-ccc"))  # GPU 1 came back as another GPU
    again = messages()
    assert len(again) == 2 and all("(its GPUs: 0 (GPU-aaa), 1 (GPU-ccc))" in line for line in again)
    assert again[0].startswith("--phase.map vllm: GPU 'GPU-bbb' is not on this host")
    assert again[1].startswith("--phase.map tgi: GPU '7' is not on this host")


def test_phase_map_all_gpus_back_is_said_once(caplog):
    from gpuphase.agent.app import Agent

    agent = Agent(config_from_cli({"backend": "sim", "phase_map": ("vllm=gpu-BBB",)}, environ={}))
    caplog.set_level(logging.INFO, logger="gpuphase.agent.app")
    agent._on_snapshot(_snapshot("GPU-aaa"))
    agent._on_snapshot(_snapshot("GPU-aaa", "GPU-bbb"))  # UUIDs compare case-insensitively, as the mapper does
    agent._on_snapshot(_snapshot("GPU-aaa", "GPU-bbb", "GPU-ccc"))
    lines = [(record.levelname, record.getMessage()) for record in caplog.records]
    assert [level for level, _ in lines] == ["WARNING", "INFO"], lines
    assert lines[1][1] == "--phase.map: every GPU named is on this host now (its GPUs: 0 (GPU-aaa), 1 (GPU-bbb))"


def test_no_phase_map_no_warning(caplog):
    from gpuphase.agent.app import Agent

    agent = Agent(config_from_cli({"backend": "sim"}, environ={}))
    caplog.set_level(logging.INFO, logger="gpuphase.agent.app")
    agent._on_snapshot(_snapshot("GPU-aaa"))
    assert not [record for record in caplog.records if "phase.map" in record.getMessage()]


def test_mapper_names_the_unknown_mapped_gpus():
    from gpuphase.agent.spans.mapping import SpanMapper

    mapper = SpanMapper([("vllm", ("0", "1", "GPU-AAA")), ("tgi", ("9", "9")), ("ok", ("0",))])
    assert mapper.unknown_mapped_gpus() == [("vllm", "0"), ("vllm", "1"), ("vllm", "GPU-AAA"), ("tgi", "9"),
                                            ("ok", "0")]  # no snapshot yet: no GPU at all
    mapper.update_gpus(_snapshot("GPU-aaa"))
    assert mapper.unknown_mapped_gpus() == [("vllm", "1"), ("tgi", "9")]


def test_the_agent_logs_the_unknown_mapped_gpu():
    with AgentProcess(["--backend", "sim", "--sim.gpus", "2", "--phase.map", "vllm=7"]) as agent:
        line = poll(lambda: next((line for line in agent.stderr_text().splitlines()
                                  if "--phase.map vllm: GPU '7' is not on this host" in line), None),
                    timeout=30, message="the phase.map warning")
        assert "level=WARNING" in line and "(its GPUs: 0 (GPU-" in line and ", 1 (GPU-" in line
        assert "counted as unknown_gpu" in line
        agent.scrape()
        assert sum("--phase.map vllm" in text for text in agent.stderr_text().splitlines()) == 1  # not per tick


def test_describe_changes_of_the_defaults_is_empty():
    assert describe_changes(Config()) == []
