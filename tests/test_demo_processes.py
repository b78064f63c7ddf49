"""`gpuphase demo` as a newcomer sees it: the simulated model servers' GPU processes look like model
servers (fake PIDs no real process can have, vLLM-like names, pod labels where the scenario is a
Kubernetes node), never like the demo process itself; and a port another agent holds is named with
its listener and address, without a traceback."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from gpuphase.demo.run import FAKE_PID_BASE, demo_processes
from gpuphase.demo.scenarios import SCENARIOS
from tests.agentproc import AgentProcess, free_port, poll

PROCESS_SERIES = ("gpu_process_memory_used_bytes", "gpu_process_sm_active_ratio")


def _own_names(agent: AgentProcess) -> set[str]:
    """What /proc calls the demo process: comm, and argv[0]'s basename."""
    process = agent.process()
    return {process.name(), Path(process.cmdline()[0]).name}


def _process_samples(agent: AgentProcess):
    metrics = poll(lambda: (m := agent.scrape()) and all(m.get(name) for name in PROCESS_SERIES) and m, 30,
                   message="per-process series")
    return [sample for name in PROCESS_SERIES for sample in metrics[name]]


@pytest.mark.parametrize("scenario", ["mixed-fleet", "steady"])
def test_demo_processes_are_the_simulated_servers_not_the_demo(scenario):
    with AgentProcess(["--demo.scenario", scenario], command="demo") as agent:
        samples = _process_samples(agent)
        own_pid, own_names = str(agent.pid), _own_names(agent)
    assert samples
    expected = {}
    for load in SCENARIOS[scenario].loads:
        for gpu in load.gpus:
            expected[gpu] = load
    assert {s.labels["gpu"] for s in samples} == {str(g) for g in expected}
    for sample in samples:
        labels = sample.labels
        assert labels["pid"] != own_pid and labels["process_name"] not in own_names, sample
        assert int(labels["pid"]) > FAKE_PID_BASE and not psutil.pid_exists(int(labels["pid"])), sample
        load = expected[int(labels["gpu"])]
        assert labels["process_name"] == f"vllm-{load.service}"[:15], sample
        assert (labels["pod"], labels["namespace"], labels["container"]) == (load.pod, load.namespace,
                                                                             load.container), sample
    if scenario == "mixed-fleet":  # modelled as a Kubernetes node: one vLLM pod per service
        assert all(s.labels["pod"].startswith(expected[int(s.labels["gpu"])].service + "-")
                   and s.labels["namespace"] == "inference" and s.labels["container"] == "vllm" for s in samples)
    else:  # bare metal: no pod, no container
        assert all(not (s.labels["pod"] or s.labels["namespace"] or s.labels["container"]) for s in samples)


def test_fake_pids_are_beyond_every_real_pid_and_one_per_service():
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    assert pid_max <= FAKE_PID_BASE  # the kernel refuses to raise pid_max beyond PID_MAX_LIMIT
    for name, scenario in SCENARIOS.items():
        table = demo_processes(scenario)
        pids = [pid for pid, _ in table.values()]
        assert len(set(pids)) == len(pids) == len(scenario.loads), name
        assert all(pid > FAKE_PID_BASE for pid in pids), name
        assert all(0 < len(who.process_name) <= 15 for _, who in table.values()), name  # comm's limit


@pytest.mark.parametrize(("listener", "flag"), [
    ("web listener", "--web.listen-address"),
    ("OTLP/gRPC", "--otlp.grpc-listen-address"),
    ("OTLP/HTTP receiver", "--otlp.http-listen-address"),
])
def test_a_second_demo_on_a_taken_port_names_the_listener_and_address(listener, flag):
    with AgentProcess(["--demo.scenario", "steady"], command="demo") as first:
        taken = {"--web.listen-address": first.metrics_port, "--otlp.grpc-listen-address": first.otlp_grpc_port,
                 "--otlp.http-listen-address": first.otlp_http_port}
        ports = {name: f"127.0.0.1:{free_port()}" for name in taken}
        ports[flag] = f"127.0.0.1:{taken[flag]}"
        second = AgentProcess(["--demo.scenario", "steady", *(x for item in ports.items() for x in item)],
                              command="demo", wait_ready=False)
        second.start()
        try:
            assert second.wait_exit(60) == 1
        finally:
            second.stop()
        output = second.stderr_text()
        assert first.alive()
    assert f"gpuphase: cannot start: cannot listen for {listener} on {ports[flag]}" in output, output
    assert "another agent or demo may be running" in output
    assert "Traceback" not in output, output
