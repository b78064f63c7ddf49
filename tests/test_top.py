"""`gpuphase top`: the model and the frames from hand-written exposition text, then the command for
real: `--once` against a demo agent and a TLS + basic auth agent, plain frames on a pipe while the
agent is unreachable, and the live screen in a real terminal (tmux: the table, `s`, `q`).

In CI a missing tmux or openssl fails (conftest.require_tool); scripts/install-tools.sh installs both.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import bcrypt
import pytest
import yaml
from conftest import require_tool

from gpuphase.top.fetch import ScrapeError, make_target, scrape
from gpuphase.top.model import History, parse
from gpuphase.top.render import Options, frame_text
from gpuphase.top.view import DOWN, NOT_YET, SORT_ORDER, UNKNOWN, next_sort, summarize
from tests.agentproc import ROOT, AgentProcess, free_port, poll
from tests.layout import module_files
from tests.test_layers import imported_modules

GIB = 1024 ** 3
PHASES = ("prefill", "decode", "mixed", "idle")


# --- hand-written exposition ----------------------------------------------------------------------


def exposition(phase: dict | None = None, *, gpus: dict | None = None, processes: list | None = None) -> str:
    """A /metrics page. gpus: index -> gauges (name, gpm, sm, tensor, dram, util, used, total, power, up);
    phase: (gpu, service) -> {phase: (seconds, joules, tokens)}."""
    gpus = gpus if gpus is not None else {0: {}}
    lines = ["# HELP gpu_info Identity of the GPU.", "# TYPE gpu_info gauge"]
    for index, gpu in gpus.items():
        gpm = "true" if gpu.get("gpm", True) else "false"
        lines.append(f'gpu_info{{gpu="{index}",uuid="GPU-{index}",name="{gpu.get("name", "NVIDIA H100 80GB HBM3")}",'
                     f'gpm_supported="{gpm}"}} 1')
    for metric, key, default in (("gpu_up", "up", 1), ("gpu_utilization_ratio", "util", 1.0),
                                 ("gpu_sm_active_ratio", "sm", 0.5), ("gpu_tensor_active_ratio", "tensor", 0.25),
                                 ("gpu_dram_active_ratio", "dram", 0.75), ("gpu_memory_used_bytes", "used", 40 * GIB),
                                 ("gpu_memory_total_bytes", "total", 80 * GIB), ("gpu_power_watts", "power", 300),
                                 ("gpu_power_limit_watts", "limit", 700), ("gpu_temperature_celsius", "temp", 50)):
        lines.append(f"# TYPE {metric} gauge")
        for index, gpu in gpus.items():
            if not gpu.get("gpm", True) and key in ("sm", "tensor", "dram"):
                continue  # absent, not zero
            lines.append(f'{metric}{{gpu="{index}",uuid="GPU-{index}"}} {gpu.get(key, default)}')
    for metric, position in (("gpu_phase_seconds", 0), ("gpu_phase_energy_joules", 1), ("gpu_phase_tokens", 2)):
        lines.append(f"# TYPE {metric} counter")
        for (index, service), values in (phase or {}).items():
            for name in PHASES:
                value = values.get(name, (0.0, 0.0, 0.0))[position]
                lines.append(f'{metric}_total{{gpu="{index}",uuid="GPU-{index}",phase="{name}",'
                             f'service="{service}"}} {value}')
    lines.append("# TYPE gpu_process_memory_used_bytes gauge")
    for index, pid, name, pod, memory in processes or []:
        lines.append(f'gpu_process_memory_used_bytes{{gpu="{index}",uuid="GPU-{index}",pid="{pid}",'
                     f'process_name="{name}",container="vllm",pod="{pod}",namespace="ml"}} {memory}')
    return "\n".join(lines) + "\n"


def history_of(*pages: tuple[float, str], window: float = 60.0) -> History:
    history = History(window)
    for at, text in pages:
        history.add(parse(text, at))
    return history


def row(summary, index):
    return next(r for r in summary.gpus if r.gpu.index == index)


def test_parse_reads_gauges_processes_and_phase_counters():
    text = exposition({(0, "llama"): {"decode": (3.0, 900.0, 300)}},
                      gpus={0: {"sm": 0.9}, 1: {"gpm": False, "util": 0.97, "name": "NVIDIA A100-SXM4-80GB"}},
                      processes=[(0, 42, "vllm", "llama-0", 30 * GIB)])
    reading = parse(text, 10.0)
    h100, a100 = reading.gpus
    assert (h100.index, h100.uuid, h100.name, h100.gpm, h100.sm, h100.tensor, h100.power) == (
        0, "GPU-0", "NVIDIA H100 80GB HBM3", True, 0.9, 0.25, 300)
    assert (a100.gpm, a100.sm, a100.tensor, a100.dram, a100.utilization) == (False, None, None, None, 0.97)
    assert reading.seconds[(0, "GPU-0", "llama", "decode")] == 3.0
    assert reading.energy[(0, "GPU-0", "llama", "decode")] == 900.0
    assert reading.tokens[(0, "GPU-0", "llama", "decode")] == 300
    (process,) = reading.processes
    assert (process.gpu, process.pid, process.name, process.pod, process.namespace) == (0, "42", "vllm", "llama-0",
                                                                                          "ml")


def test_state_is_the_dominant_phase_of_the_last_interval_and_shares_cover_the_window():
    first = {"prefill": (10.0, 0, 0), "decode": (20.0, 0, 0), "mixed": (5.0, 0, 0), "idle": (5.0, 0, 0)}
    second = {"prefill": (12.0, 0, 0), "decode": (20.5, 0, 0), "mixed": (5.0, 0, 0), "idle": (5.5, 0, 0)}
    third = {"prefill": (12.2, 0, 0), "decode": (21.3, 0, 0), "mixed": (5.0, 0, 0), "idle": (5.5, 0, 0)}
    history = history_of((0.0, exposition({(0, "llama"): first})), (1.0, exposition({(0, "llama"): second})),
                         (2.0, exposition({(0, "llama"): third})))
    gpu = row(summarize(history), 0)
    assert gpu.state == "decode"  # 0.8 s decode vs 0.2 s prefill in the last interval
    assert gpu.shares == pytest.approx({"prefill": 2.2 / 4, "decode": 1.3 / 4, "mixed": 0.0, "idle": 0.5 / 4})
    two = history_of((0.0, exposition({(0, "llama"): first})), (1.0, exposition({(0, "llama"): second})))
    assert row(summarize(two), 0).state == "prefill"


def test_an_interval_without_finalised_phase_time_keeps_the_last_known_state():
    a = {"decode": (1.0, 0, 0)}
    b = {"decode": (1.0, 0, 0), "mixed": (1.0, 0, 0)}
    history = history_of(*((t, exposition({(0, "s"): p})) for t, p in ((0, a), (1, b), (2, b), (3, b))))
    assert row(summarize(history), 0).state == "mixed"


def test_a_gpu_without_phase_series_is_unknown_not_idle():
    history = history_of((0.0, exposition(gpus={0: {}, 1: {}}, phase={(0, "llama"): {"idle": (1.0, 0, 0)}})),
                         (1.0, exposition(gpus={0: {}, 1: {}}, phase={(0, "llama"): {"idle": (2.0, 0, 0)}})))
    summary = summarize(history)
    assert row(summary, 0).state == "idle" and row(summary, 0).shares["idle"] == 1.0
    unmapped = row(summary, 1)
    assert (unmapped.state, unmapped.shares, unmapped.tokens_per_second, unmapped.energy_per_token) == (
        UNKNOWN, None, None, None)
    text = frame_text(summary, Options(url="u", plain=True))
    assert re.search(r"\|\s+1 \|[^|]+\| unknown +\| n/a", text), text


def test_one_reading_gives_no_shares_and_says_so():
    summary = summarize(history_of((0.0, exposition({(0, "llama"): {"decode": (5.0, 10.0, 5)}}))))
    gpu = row(summary, 0)
    assert (gpu.state, gpu.shares, gpu.energy_per_token, gpu.tokens_per_second) == (NOT_YET, None, None, None)
    assert "no window yet" in frame_text(summary, Options(url="u", plain=True))


def test_energy_per_token_and_tokens_per_second_over_the_window():
    before = {"prefill": (1.0, 400.0, 1000), "decode": (2.0, 600.0, 100)}
    after = {"prefill": (2.0, 800.0, 3000), "decode": (4.0, 1400.0, 300), "idle": (1.0, 100.0, 0)}
    summary = summarize(history_of((0.0, exposition({(0, "llama"): before})),
                                   (4.0, exposition({(0, "llama"): after}))))
    gpu = row(summary, 0)
    assert gpu.energy_per_token == pytest.approx((400 + 800 + 100) / (2000 + 200))
    assert gpu.tokens_per_second == pytest.approx(2200 / 4)


def test_a_tp_group_counts_its_tokens_once_and_data_parallel_replicas_add_up():
    def page(t: float) -> str:
        same = {"decode": (t, 100.0 * t, 50 * t)}  # TP: both GPUs count every request
        return exposition({(0, "tp"): same, (1, "tp"): same,
                           (2, "dp"): {"decode": (t, 10.0 * t, 10 * t)}, (3, "dp"): {"decode": (t, 10.0 * t, 30 * t)}},
                          gpus={index: {} for index in range(4)})

    summary = summarize(history_of((1.0, page(1.0)), (3.0, page(3.0))))
    tp, dp = sorted(summary.services, key=lambda s: s.service, reverse=True)
    assert (tp.service, tp.gpus, tp.tokens_per_second) == ("tp", (0, 1), pytest.approx(50))
    assert tp.energy_per_token == pytest.approx(2 * 200 / 100)  # both GPUs' energy over the group's tokens
    assert (dp.service, dp.gpus, dp.tokens_per_second) == ("dp", (2, 3), pytest.approx(40))


def test_history_keeps_one_reading_at_or_before_the_window_and_drops_older():
    history = history_of(*((float(t), exposition()) for t in range(0, 121)))
    assert history.readings[0].time == 60.0 and history.newest.time == 120.0
    assert summarize(history).window == 60.0


def test_a_counter_reset_starts_the_history_again():
    history = history_of((0.0, exposition({(0, "s"): {"decode": (100.0, 0, 0)}})),
                         (1.0, exposition({(0, "s"): {"decode": (101.0, 0, 0)}})),
                         (2.0, exposition({(0, "s"): {"decode": (0.5, 0, 0)}})))  # the agent restarted
    assert len(history) == 1
    assert row(summarize(history), 0).state == NOT_YET


def test_a_gpu_that_is_down_says_so():
    summary = summarize(history_of((0.0, exposition({(0, "s"): {}}, gpus={0: {"up": 0}}))))
    assert row(summary, 0).state == DOWN


def test_frame_without_gpm_shows_utilization_and_no_activity_it_does_not_have():
    pages = [(t, exposition(gpus={0: {"gpm": False, "util": 0.97}, 1: {"sm": 0.5}})) for t in (0.0, 1.0)]
    text = frame_text(summarize(history_of(*pages)), Options(url="u", plain=True))
    a100 = next(line for line in text.splitlines() if re.match(r"\|\s+0 \|", line))
    assert "97% util" in a100 and a100.count("| -") == 2, a100  # tensor and DRAM absent, not 0%
    assert "this GPU has no GPM" in text
    h100 = next(line for line in text.splitlines() if re.match(r"\|\s+1 \|", line))
    assert "###...  50%" in h100 and "##....  25%" in h100 and "#####.  75%" in h100, h100


def _order(text: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(r"^\|\s+(\d+) \| H100", text, re.M)]


def test_sort_orders_reorder_the_gpu_rows_and_cycle():
    gpus = {0: {"power": 100, "used": 70 * GIB}, 1: {"power": 600, "used": 10 * GIB}, 2: {"power": 300, "used": 5}}
    summary = summarize(history_of((0.0, exposition(gpus=gpus)), (1.0, exposition(gpus=gpus))))
    assert _order(frame_text(summary, Options(url="u", plain=True))) == [0, 1, 2]
    assert _order(frame_text(summary, Options(url="u", plain=True, sort="power"))) == [1, 2, 0]
    assert _order(frame_text(summary, Options(url="u", plain=True, sort="memory"))) == [0, 1, 2]
    seen = ["gpu"]
    while len(seen) <= len(SORT_ORDER):
        seen.append(next_sort(seen[-1]))
    assert seen[-1] == "gpu" and set(seen) == set(SORT_ORDER)


def test_the_cli_offers_every_sort_order():
    from gpuphase.cli import top as command

    (option,) = [param for param in command.params if param.name == "sort"]
    assert tuple(option.type.choices) == SORT_ORDER


def test_a_full_frame_has_gpus_services_phases_and_processes():
    before = {"prefill": (1.0, 100.0, 1000), "decode": (1.0, 100.0, 10)}
    after = {"prefill": (1.5, 300.0, 2000), "decode": (2.5, 500.0, 110)}
    pages = [(t, exposition({(0, "llama-70b"): p}, processes=[(0, 4242, "vllm-llama", "llama-0", 71 * GIB)]))
             for t, p in ((0.0, before), (1.0, after))]
    text = frame_text(summarize(history_of(*pages)), Options(url="http://node:9842/metrics", plain=True))
    gpu_line = next(line for line in text.splitlines() if re.match(r"\|\s+0 \|", line))
    assert "| decode " in gpu_line
    assert "ppp" in gpu_line and "ddddddd" in gpu_line and "P25 D75" in gpu_line, gpu_line
    assert "40.0/80G" in gpu_line and "300/700W" in gpu_line and "50C" in gpu_line
    assert "0.545" in gpu_line  # (200 + 400) J / 1100 tokens
    assert re.search(r"\| llama-70b \| 0 +\| ppp\S* P25 D75 \| +1,100 \| +0.545 \|", text), text
    assert re.search(r"\| +0 \| +4242 \| vllm-llama +\| ml/llama-0 +\| vllm +\| +71.0G \|", text), text
    assert "http://node:9842/metrics" in text and "last 1s" in text


def test_narrow_terminals_drop_the_name_then_the_bars():
    pages = [(t, exposition({(0, "s"): {"decode": (t, 0, 0)}})) for t in (1.0, 2.0)]
    summary = summarize(history_of(*pages))
    assert "H100" in frame_text(summary, Options(url="u", plain=True, width=160))
    medium = frame_text(summary, Options(url="u", plain=True, width=130))
    assert "H100" not in medium and "###..." in medium
    narrow = frame_text(summary, Options(url="u", plain=True, width=100))
    assert "###" not in narrow and " 50%" in narrow and "D100" in narrow
    assert max(len(line) for line in narrow.splitlines()) <= 100


def test_the_error_line_and_a_stale_reading():
    summary = summarize(history_of((0.0, exposition())))
    text = frame_text(summary, Options(url="u", plain=True, error="cannot reach the agent", stale_for=12.0))
    assert "cannot reach the agent (showing the reading of 12s ago)" in text
    assert "cannot reach" in frame_text(None, Options(url="u", plain=True, error="cannot reach"))


def test_top_imports_nothing_of_the_agent():
    """tests/test_layers.py puts gpuphase.top beside gpuphase.demo; unlike the demo it needs no agent,
    only the model: a user of /metrics like Prometheus."""
    sources = {module: path.read_text() for module, path in module_files().items()}
    for module in (m for m in sources if m.startswith("gpuphase.top")):
        for line, target in imported_modules(sources[module], set(sources)):
            if target.startswith("gpuphase"):
                assert target.startswith(("gpuphase.model", "gpuphase.top")), f"{module}:{line} imports {target}"


# --- targets --------------------------------------------------------------------------------------


def test_targets_take_credentials_from_the_url_or_a_file_and_never_show_them(tmp_path):
    target = make_target("https://ops:s%3Acret@node:9842")
    assert target.url == "https://node:9842/metrics" and target.authorization == "Basic b3BzOnM6Y3JldA=="
    password = tmp_path / "password"
    password.write_text("s:cret\n")
    target = make_target("127.0.0.1:9842/metrics", user="ops", password_file=str(password))
    assert target.url == "http://127.0.0.1:9842/metrics" and target.authorization == "Basic b3BzOnM6Y3JldA=="
    assert target.context is None
    assert make_target("https://[::1]:9842/x", insecure=True).context.check_hostname is False
    for kwargs, message in (({"url": "ftp://x"}, "http:// or https://"),
                            ({"url": "http://x", "insecure": True}, "for https:// URLs"),
                            ({"url": "http://x", "password_file": str(password)}, "needs --user"),
                            ({"url": "http://x", "user": "a", "password_file": str(tmp_path / "no")},
                             "--password-file")):
        with pytest.raises(ValueError, match=re.escape(message)):
            make_target(**kwargs)


def test_an_unreachable_agent_is_a_clear_scrape_error():
    with pytest.raises(ScrapeError, match=r"cannot reach the agent at http://127.0.0.1:\d+/metrics: "
                                          r"Connection refused"):
        scrape(make_target(f"127.0.0.1:{free_port()}", timeout=2))


# --- the command for real -------------------------------------------------------------------------


def top(*args: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("GPUPHASE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env["COLUMNS"] = "160"
    return subprocess.run([sys.executable, "-m", "gpuphase", "top", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout, **kwargs)


def _phase_seconds(agent: AgentProcess, gpu: str) -> float:
    metrics = agent.scrape()
    return sum(s.value for s in metrics.samples("gpu_phase_seconds_total", gpu=gpu) if s.labels["phase"] != "idle")


@pytest.fixture(scope="module")
def demo_agent():
    """mixed-fleet (0-1 llama-70b TP2, 2 chat-8b decode-heavy, 3 allocated idle, 4 unmapped) with a short
    settle, once work phase time has been finalised on GPUs 0 and 2."""
    args = ["--demo.scenario", "mixed-fleet", "--phase.settle", "10s"]
    with AgentProcess(args, env={"OTEL_BSP_SCHEDULE_DELAY": "500"}, command="demo") as agent:
        poll(lambda: _phase_seconds(agent, "0") > 1 and _phase_seconds(agent, "2") > 1, 90, interval=0.5,
             message="finalised work phase time on GPUs 0 and 2")
        yield agent


def _gpu_rows(text: str) -> dict[int, str]:
    """GPU index -> its row, from a frame (plain or not)."""
    return {int(m.group(1)): m.group(0) for m in re.finditer(r"^[|\s]*(\d) [|\s]+H100 80GB HBM3.*$", text, re.M)}


def test_once_against_a_demo_agent(demo_agent):
    result = top("--once", "--url", demo_agent.metrics_url)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    rows = _gpu_rows(text)
    assert sorted(rows) == [0, 1, 2, 3, 4], text
    assert re.search(r"\| (prefill|decode|mixed) ", rows[0]) and re.search(r"\| (decode|mixed) ", rows[2]), text
    assert "| idle " in rows[3] and "| unknown | n/a" in rows[4], text
    for index in range(5):
        assert re.search(r"\d+\.\d/80G \| +\d+/700W \|", rows[index]), rows[index]  # VRAM and power
        assert re.search(r"(#|\.)+ +\d+%", rows[index]), rows[index]  # SM activity bar (GPM)
    assert re.search(r"J/tok", text) and re.search(r"\|\s+[\d.]+ \|$", rows[2]), rows[2]  # energy per token
    for service, gpus in (("llama-70b", "0,1"), ("chat-8b", "2"), ("reserved", "3")):
        assert re.search(rf"\| {service} +\| {gpus} +\|", text), text
    assert "vllm-llama-70b" in text and "inference/" in text  # processes with their pods


def _tmux(server: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("tmux"), "-L", server, *args], capture_output=True, text=True, timeout=30,
                          check=check)


def test_live_view_in_a_real_terminal(demo_agent):
    server = f"gpuphase-top-{uuid.uuid4().hex[:8]}"
    command = (f"PYTHONPATH={ROOT} COLUMNS= {sys.executable} -m gpuphase top --url {demo_agent.metrics_url} "
               f"2>{server}.err")
    _tmux(server, "new-session", "-d", "-x", "160", "-y", "50", "-s", "top", "-c", "/tmp", command)
    try:
        def screen() -> str:
            return _tmux(server, "capture-pane", "-p", "-t", "top").stdout

        def table(sort: str):
            text = screen()
            return text if f"sorted by {sort};" in text and len(_gpu_rows(text)) == 5 else None

        first = poll(lambda: table("gpu"), 30, message="the GPU table in the tmux pane")
        assert [*_gpu_rows(first)] == [0, 1, 2, 3, 4], first
        assert "█" in first and "services" in first and "q quit" in first
        _tmux(server, "send-keys", "-t", "top", "s")
        by_power = poll(lambda: table("power"), 10, message="the power sort after s")
        powers = [int(re.search(r"(\d+)/700W", line).group(1)) for line in _gpu_rows(by_power).values()]
        assert powers == sorted(powers, reverse=True), by_power
        _tmux(server, "send-keys", "-t", "top", "q")
        poll(lambda: _tmux(server, "has-session", "-t", "top", check=False).returncode != 0, 10,
             message="top to exit on q")
    finally:
        _tmux(server, "kill-server", check=False)
        Path("/tmp", f"{server}.err").unlink(missing_ok=True)


def test_unreachable_agent_once_exits_1_and_live_keeps_retrying():
    url = f"http://127.0.0.1:{free_port()}/metrics"
    result = top("--once", "--url", url)
    assert result.returncode == 1 and f"cannot reach the agent at {url}: Connection refused" in result.stderr
    assert result.stdout == ""
    env = {key: value for key, value in os.environ.items() if not key.startswith("GPUPHASE_")}
    env["PYTHONPATH"] = str(ROOT)
    process = subprocess.Popen([sys.executable, "-m", "gpuphase", "top", "--url", url, "--interval", "200ms"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                               env=env)
    try:
        lines = []
        deadline = time.monotonic() + 30
        while sum("retrying every 0.2s" in line for line in lines) < 3 and time.monotonic() < deadline:
            lines.append(process.stdout.readline())
        assert sum("retrying every 0.2s" in line for line in lines) >= 3, lines
        assert process.poll() is None  # still retrying
    finally:
        process.terminate()
        assert process.wait(10) == 0


# --- TLS and basic auth, as the agent's --web.config.file serves them ---------------------------------


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run([require_tool("openssl"), *args], cwd=directory, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def tls_agent(tmp_path_factory):
    directory = tmp_path_factory.mktemp("top-tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(directory, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=ca")
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _openssl(directory, "req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=server")
    _openssl(directory, "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.crt", "-days", "2", "-extfile", "server.ext")
    (directory / "password").write_text("top-secret\n")
    config = directory / "web.yml"
    config.write_text(yaml.safe_dump({
        "tls_server_config": {"cert_file": "server.crt", "key_file": "server.key"},
        "basic_auth_users": {"ops": bcrypt.hashpw(b"top-secret", bcrypt.gensalt(rounds=4)).decode()}}))
    with AgentProcess(["--backend", "sim", "--sim.gpus", "2", "--web.config.file", str(config)],
                      wait_ready=False) as agent:
        target = make_target(f"https://127.0.0.1:{agent.metrics_port}/metrics", user="ops",
                             password_file=str(directory / "password"), ca_file=str(directory / "ca.crt"))

        def answers() -> bool:
            try:
                return "gpu_up{" in scrape(target)
            except ScrapeError:
                return False

        poll(answers, 60, interval=0.2, message="the TLS agent's /metrics")
        yield agent, directory


def test_once_over_tls_with_basic_auth(tls_agent):
    agent, directory = tls_agent
    url = f"https://127.0.0.1:{agent.metrics_port}/metrics"
    result = top("--once", "--url", url, "--user", "ops", "--password-file", str(directory / "password"),
                 "--ca-file", str(directory / "ca.crt"), "--interval", "200ms")
    assert result.returncode == 0, result.stderr
    rows = _gpu_rows(result.stdout)
    assert sorted(rows) == [0, 1] and all("| unknown | n/a" in line for line in rows.values()), result.stdout
    embedded = top("--once", "--insecure", "--interval", "200ms",
                   "--url", f"https://ops:top-secret@127.0.0.1:{agent.metrics_port}/metrics")
    assert embedded.returncode == 0 and "top-secret" not in embedded.stdout, embedded.stderr
    unauthorised = top("--once", "--url", url, "--ca-file", str(directory / "ca.crt"))
    assert unauthorised.returncode == 1
    assert "answered 401" in unauthorised.stderr and "--password-file" in unauthorised.stderr
    untrusted = top("--once", "--url", url, "--user", "ops", "--password-file", str(directory / "password"))
    assert untrusted.returncode == 1 and "certificate not trusted" in untrusted.stderr and "--ca-file" in \
        untrusted.stderr
