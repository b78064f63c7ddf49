"""ProcessResolver: host PID -> name, container, pod, against fake /proc trees and the real /proc."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from gpuphase.agent.processes import (
    MAX_NAME_LENGTH,
    ProcessResolver,
    container_id_from_cgroup,
    host_to_namespace_pid,
    namespace_pids,
    pod_uid_from_cgroup,
    process_start_time,
)
from gpuphase.model.snapshot import ProcessReading, ProcessSample

CID = "3f4e2a1b9c8d7e6f" + "0123456789abcdef" * 3  # 64 hex characters
SHORT = CID[:12]
POD_UID = "0d6b8b5e-6c7f-4f5a-9a1e-2b3c4d5e6f70"
POD_UID_SYSTEMD = POD_UID.replace("-", "_")


def make_process(
    root: Path,
    pid: int,
    *,
    comm: str | None = "python3",
    cmdline: bytes | None = b"/usr/bin/python3\0-m\0vllm.entrypoints\0",
    cgroup: str | None = "0::/user.slice\n",
    start_time: int = 1000,
    nspid: str | None = None,
) -> Path:
    """A /proc/<pid> directory holding the files the resolver reads; None leaves a file out."""
    directory = root / str(pid)
    directory.mkdir(parents=True, exist_ok=True)
    stat_comm = (comm or "x")[:15]
    fields_after_comm = ["S"] + ["0"] * 18 + [str(start_time)] + ["0"] * 30
    (directory / "stat").write_text(f"{pid} ({stat_comm}) " + " ".join(fields_after_comm) + "\n")
    if comm is not None:
        (directory / "comm").write_text(comm + "\n")
    if cmdline is not None:
        (directory / "cmdline").write_bytes(cmdline)
    if cgroup is not None:
        (directory / "cgroup").write_text(cgroup)
    status = f"Name:\t{stat_comm}\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t{pid}\n"
    if nspid is not None:
        status += f"NSpid:\t{nspid}\n"
    (directory / "status").write_text(status + "VmRSS:\t1000 kB\n")
    return directory


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def resolve_one(resolver: ProcessResolver, pid: int) -> ProcessSample:
    (sample,) = resolver.resolve([ProcessReading(pid=pid, memory_used_bytes=1.0)])
    return sample


# --- cgroup layouts -------------------------------------------------------------------------

CGROUP_LAYOUTS = {
    "docker cgroup v1 (cgroupfs), multi-line": (
        f"12:pids:/docker/{CID}\n11:memory:/docker/{CID}\n1:name=systemd:/docker/{CID}\n0::/\n",
        SHORT,
        "",
    ),
    "docker cgroup v2 (systemd)": (f"0::/system.slice/docker-{CID}.scope\n", SHORT, ""),
    "docker seen from inside a cgroup namespace": (f"0::/../../system.slice/docker-{CID}.scope\n", SHORT, ""),
    "podman cgroup v2 (rootless, systemd)": (
        f"0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{CID}.scope/container\n",
        SHORT,
        "",
    ),
    "podman cgroup v1 (cgroupfs)": (f"5:memory:/libpod_parent/libpod-{CID}\n", SHORT, ""),
    "kubernetes containerd, systemd driver, cgroup v2": (
        "0::/kubepods.slice/kubepods-burstable.slice/"
        f"kubepods-burstable-pod{POD_UID_SYSTEMD}.slice/cri-containerd-{CID}.scope\n",
        SHORT,
        POD_UID,
    ),
    "kubernetes cri-o, systemd driver, cgroup v1": (
        "11:devices:/kubepods.slice/kubepods-besteffort.slice/"
        f"kubepods-besteffort-pod{POD_UID_SYSTEMD}.slice/crio-{CID}.scope\n"
        "1:name=systemd:/kubepods.slice/kubepods-besteffort.slice/"
        f"kubepods-besteffort-pod{POD_UID_SYSTEMD}.slice/crio-{CID}.scope\n",
        SHORT,
        POD_UID,
    ),
    "kubernetes guaranteed pod, systemd driver (no QoS slice)": (
        f"0::/kubepods.slice/kubepods-pod{POD_UID_SYSTEMD}.slice/cri-containerd-{CID}.scope\n",
        SHORT,
        POD_UID,
    ),
    "kubernetes cgroupfs driver, cgroup v1": (
        f"4:memory:/kubepods/burstable/pod{POD_UID}/{CID}\n3:cpu,cpuacct:/kubepods/burstable/pod{POD_UID}/{CID}\n",
        SHORT,
        POD_UID,
    ),
    "kubernetes cgroupfs driver, guaranteed pod, cgroup v2": (
        f"0::/kubepods/pod{POD_UID}/{CID}\n",
        SHORT,
        POD_UID,
    ),
    "kubernetes static pod (hash UID), docker via cri-dockerd": (
        "0::/kubepods.slice/kubepods-besteffort.slice/"
        f"kubepods-besteffort-pod2b6d8e9f0c3a4b5e8f2c1a0b9d8e7f6a.slice/docker-{CID}.scope\n",
        SHORT,
        "2b6d8e9f0c3a4b5e8f2c1a0b9d8e7f6a",
    ),
    "nerdctl (containerd without kubernetes), systemd": (f"0::/system.slice/nerdctl-{CID}.scope\n", SHORT, ""),
    "host process, cgroup v2": ("0::/system.slice/vllm.service\n", "", ""),
    "host process, v1 with a 32-hex job id (not a container)": (
        "4:memory:/process_api/286cd150933cdbdfadf06882b5dd2406\n0::/\n",
        "",
        "",
    ),
    "cri-o conmon is the monitor, not the container": (f"0::/system.slice/crio-conmon-{CID}.scope\n", "", ""),
    "empty file": ("", "", ""),
}


@pytest.mark.parametrize("layout", CGROUP_LAYOUTS, ids=list(CGROUP_LAYOUTS))
def test_cgroup_layouts_give_container_and_pod(tmp_path: Path, layout: str) -> None:
    cgroup, container, pod = CGROUP_LAYOUTS[layout]
    make_process(tmp_path, 4242, cgroup=cgroup)

    sample = resolve_one(ProcessResolver(proc_root=str(tmp_path)), 4242)

    assert (sample.container, sample.pod, sample.namespace) == (container, pod, "")


def test_cgroup_v2_line_wins_over_v1_lines() -> None:
    other = "a" * 64
    cgroup = f"11:memory:/docker/{other}\n0::/system.slice/docker-{CID}.scope\n"
    assert container_id_from_cgroup(cgroup) == SHORT


def test_innermost_container_wins_when_nested() -> None:
    inner = "b" * 64
    assert container_id_from_cgroup(f"0::/docker/{CID}/docker/{inner}\n") == inner[:12]


def test_pod_segment_outside_kubepods_is_not_a_pod() -> None:
    assert pod_uid_from_cgroup(f"0::/system.slice/pod{POD_UID}.slice\n") == ""


# --- names ----------------------------------------------------------------------------------


def test_name_comes_from_comm(tmp_path: Path) -> None:
    make_process(tmp_path, 10, comm="VllmWorker", cmdline=b"/usr/bin/python3\0-m\0vllm\0")
    assert resolve_one(ProcessResolver(proc_root=str(tmp_path)), 10).process_name == "VllmWorker"


@pytest.mark.parametrize("comm", [None, ""], ids=["comm missing", "comm empty"])
def test_name_falls_back_to_basename_of_argv0(tmp_path: Path, comm: str | None) -> None:
    make_process(tmp_path, 11, comm=comm, cmdline=b"/opt/tgi/bin/text-generation-launcher\0--port\0")
    name = resolve_one(ProcessResolver(proc_root=str(tmp_path)), 11).process_name
    assert name == "text-generation-launcher"


def test_name_is_empty_when_neither_comm_nor_cmdline_tell(tmp_path: Path) -> None:
    make_process(tmp_path, 12, comm=None, cmdline=b"")
    assert resolve_one(ProcessResolver(proc_root=str(tmp_path)), 12).process_name == ""


def test_name_is_sanitized_and_bounded(tmp_path: Path) -> None:
    argv0 = b"/tmp/evil\x1b[31mname\n\xff" + b"x" * 200
    make_process(tmp_path, 13, comm=None, cmdline=argv0 + b"\0arg\0")

    name = resolve_one(ProcessResolver(proc_root=str(tmp_path)), 13).process_name

    assert name.startswith("evil?[31mname??xxx")
    assert len(name) == MAX_NAME_LENGTH
    assert name.isprintable()


# --- unreadable and vanished processes ------------------------------------------------------


def test_vanished_process_still_gets_a_sample(tmp_path: Path) -> None:
    reading = ProcessReading(pid=999, memory_used_bytes=2e9, sm_active_ratio=0.25)

    (sample,) = ProcessResolver(proc_root=str(tmp_path)).resolve([reading])

    assert sample == ProcessSample(pid=999, memory_used_bytes=2e9, sm_active_ratio=0.25)


def test_unreadable_files_give_empty_labels_not_errors(tmp_path: Path) -> None:
    # Tests may run as root, where file modes do not deny reads; a directory in place of each
    # file makes open() fail with an OSError the same way EACCES would.
    directory = make_process(tmp_path, 20, comm=None, cmdline=None, cgroup=None)
    for name in ("comm", "cmdline", "cgroup", "status"):
        if (directory / name).exists():
            (directory / name).unlink()
        (directory / name).mkdir()

    sample = resolve_one(ProcessResolver(proc_root=str(tmp_path)), 20)

    assert (sample.process_name, sample.container, sample.pod) == ("", "", "")
    assert namespace_pids(20, str(tmp_path)) == ()


def test_garbled_stat_means_unknown_start_time(tmp_path: Path) -> None:
    directory = make_process(tmp_path, 21)
    (directory / "stat").write_text("21 (python3) S 1 2\n")
    assert process_start_time(21, str(tmp_path)) is None
    assert resolve_one(ProcessResolver(proc_root=str(tmp_path)), 21).process_name == ""


def test_start_time_parsing_survives_parentheses_and_spaces_in_comm(tmp_path: Path) -> None:
    directory = make_process(tmp_path, 22, start_time=777)
    fields = " ".join(["S"] + ["0"] * 18 + ["777"] + ["0"] * 30)
    (directory / "stat").write_text(f"22 (evil) 1 2 (x) {fields}\n")
    assert process_start_time(22, str(tmp_path)) == 777


# --- NSpid ----------------------------------------------------------------------------------


def test_nspid_of_a_host_process(tmp_path: Path) -> None:
    make_process(tmp_path, 300, nspid="300")
    assert namespace_pids(300, str(tmp_path)) == (300,)
    assert host_to_namespace_pid(300, str(tmp_path)) == 300


def test_nspid_of_nested_namespaces_lists_host_first_innermost_last(tmp_path: Path) -> None:
    make_process(tmp_path, 48211, nspid="48211\t371\t7")
    assert namespace_pids(48211, str(tmp_path)) == (48211, 371, 7)
    assert host_to_namespace_pid(48211, str(tmp_path)) == 7


def test_nspid_missing_or_process_gone(tmp_path: Path) -> None:
    make_process(tmp_path, 301, nspid=None)  # kernels before 4.1 have no NSpid line
    assert namespace_pids(301, str(tmp_path)) == ()
    assert host_to_namespace_pid(301, str(tmp_path)) is None
    assert namespace_pids(302, str(tmp_path)) == ()


# --- caching --------------------------------------------------------------------------------


def test_stable_process_is_served_from_cache_until_ttl(tmp_path: Path) -> None:
    clock = FakeClock()
    resolver = ProcessResolver(proc_root=str(tmp_path), cache_ttl=30.0, clock=clock)
    directory = make_process(tmp_path, 50, comm="vllm", cgroup=f"0::/docker/{CID}\n", start_time=5)
    assert resolve_one(resolver, 50).process_name == "vllm"

    # Same process (same start time) renamed and moved: within the TTL only stat is read.
    (directory / "comm").write_text("renamed\n")
    (directory / "cgroup").write_text("0::/\n")
    clock.now += 29.0
    assert (resolve_one(resolver, 50).process_name, resolve_one(resolver, 50).container) == ("vllm", SHORT)

    clock.now += 1.0
    assert (resolve_one(resolver, 50).process_name, resolve_one(resolver, 50).container) == ("renamed", "")


def test_recycled_pid_is_resolved_again(tmp_path: Path) -> None:
    resolver = ProcessResolver(proc_root=str(tmp_path), clock=FakeClock())
    make_process(tmp_path, 60, comm="old-job", cgroup=f"0::/docker/{CID}\n", start_time=100)
    assert resolve_one(resolver, 60).process_name == "old-job"

    make_process(tmp_path, 60, comm="new-job", cgroup="0::/system.slice/x.service\n", start_time=200)
    sample = resolve_one(resolver, 60)

    assert (sample.process_name, sample.container) == ("new-job", "")


def test_pid_recycled_while_being_read_is_not_labelled_or_cached(tmp_path: Path) -> None:
    make_process(tmp_path, 65, comm="old-job", cgroup=K8S_CGROUP, start_time=100)

    def recycle_pid_mid_read(uid: str) -> tuple[str, str]:
        # The hook runs between reading the files and re-checking the start time: the old
        # process exits and a new one takes its PID right there.
        make_process(tmp_path, 65, comm="new-job", cgroup="0::/\n", start_time=200)
        return ("pod", "ns")

    resolver = ProcessResolver(proc_root=str(tmp_path), pod_lookup=recycle_pid_mid_read)
    sample = resolve_one(resolver, 65)

    assert (sample.process_name, sample.container, sample.pod) == ("", "", "")
    assert resolver.cache_size == 0
    assert resolve_one(resolver, 65).process_name == "new-job"  # next tick labels the new process


def test_exited_process_leaves_the_cache(tmp_path: Path) -> None:
    resolver = ProcessResolver(proc_root=str(tmp_path), clock=FakeClock())
    directory = make_process(tmp_path, 70)
    resolve_one(resolver, 70)
    assert resolver.cache_size == 1

    shutil.rmtree(directory)

    assert resolve_one(resolver, 70).process_name == ""
    assert resolver.cache_size == 0


def test_cache_is_bounded_and_expired_entries_are_swept(tmp_path: Path) -> None:
    clock = FakeClock()
    resolver = ProcessResolver(proc_root=str(tmp_path), cache_ttl=10.0, max_cache_entries=5, clock=clock)
    for pid in range(100, 120):
        make_process(tmp_path, pid, comm=f"p{pid}")
        resolve_one(resolver, pid)
        clock.now += 0.1
    assert resolver.cache_size == 5
    # The newest entries survive: they still answer from the cache after their files change.
    (tmp_path / "119" / "comm").write_text("changed\n")
    assert resolve_one(resolver, 119).process_name == "p119"

    clock.now += 10.0
    resolve_one(resolver, 119)  # re-resolved (expired); the sweep drops every other expired entry
    assert resolver.cache_size == 1


# --- cardinality ----------------------------------------------------------------------------


def test_cap_keeps_largest_memory_first_ties_by_pid(tmp_path: Path) -> None:
    readings = [
        ProcessReading(pid=5, memory_used_bytes=100.0),
        ProcessReading(pid=3, memory_used_bytes=None),
        ProcessReading(pid=9, memory_used_bytes=300.0),
        ProcessReading(pid=2, memory_used_bytes=100.0),
        ProcessReading(pid=7, memory_used_bytes=200.0),
    ]
    resolver = ProcessResolver(proc_root=str(tmp_path), max_series_per_gpu=4)

    assert [s.pid for s in resolver.resolve(readings)] == [9, 7, 2, 5]
    assert [s.pid for s in ProcessResolver(proc_root=str(tmp_path)).resolve(readings)] == [9, 7, 2, 5, 3]
    assert ProcessResolver(proc_root=str(tmp_path), max_series_per_gpu=0).resolve(readings) == ()


def test_duplicate_pids_are_merged_into_one_sample(tmp_path: Path) -> None:
    readings = [
        ProcessReading(pid=8, memory_used_bytes=1e9, sm_active_ratio=0.7),
        ProcessReading(pid=8, memory_used_bytes=2e9, sm_active_ratio=0.5),
        ProcessReading(pid=4, memory_used_bytes=2.5e9),
    ]
    samples = ProcessResolver(proc_root=str(tmp_path)).resolve(readings)
    merged = [(s.pid, s.memory_used_bytes, s.sm_active_ratio) for s in samples]
    assert merged == [(8, 3e9, 1.0), (4, 2.5e9, None)]  # summed, the ratio capped at 1


# --- pod_lookup hook ------------------------------------------------------------------------

K8S_CGROUP = CGROUP_LAYOUTS["kubernetes containerd, systemd driver, cgroup v2"][0]


def test_pod_lookup_names_the_pod_and_namespace(tmp_path: Path) -> None:
    make_process(tmp_path, 80, cgroup=K8S_CGROUP)
    asked: list[str] = []

    def lookup(uid: str) -> tuple[str, str]:
        asked.append(uid)
        return ("vllm-llama-7b-5d9f8-abcde", "inference")

    resolver = ProcessResolver(proc_root=str(tmp_path), pod_lookup=lookup)
    sample = resolve_one(resolver, 80)
    resolve_one(resolver, 80)

    assert (sample.pod, sample.namespace, sample.container) == ("vllm-llama-7b-5d9f8-abcde", "inference", SHORT)
    assert asked == [POD_UID]  # once: the second tick came from the cache


@pytest.mark.parametrize(
    "lookup",
    [lambda uid: None, lambda uid: ("", ""), lambda uid: 1 / 0],
    ids=["unknown pod", "empty answer", "hook raises"],
)
def test_pod_lookup_without_an_answer_keeps_the_uid(tmp_path: Path, lookup) -> None:
    make_process(tmp_path, 81, cgroup=K8S_CGROUP)
    sample = resolve_one(ProcessResolver(proc_root=str(tmp_path), pod_lookup=lookup), 81)
    assert (sample.pod, sample.namespace) == (POD_UID, "")


def test_pod_lookup_is_not_asked_for_processes_outside_pods(tmp_path: Path) -> None:
    make_process(tmp_path, 82, cgroup=f"0::/system.slice/docker-{CID}.scope\n")
    resolver = ProcessResolver(proc_root=str(tmp_path), pod_lookup=lambda uid: pytest.fail("asked"))
    assert resolve_one(resolver, 82).pod == ""


# --- the real /proc -------------------------------------------------------------------------

PROBE_NAME = "gpuphase-probe"  # < 16 bytes, so comm holds it whole


@pytest.fixture
def probe_child(tmp_path: Path):
    """A running child whose comm we chose: a copy of `sleep` named PROBE_NAME.

    comm is the basename of the executed file (not argv[0]), hence a copy rather than exec -a.
    """
    sleep = shutil.which("sleep")
    assert sleep, "coreutils sleep is needed to spawn a named child"
    binary = tmp_path / PROBE_NAME
    shutil.copy(os.path.realpath(sleep), binary)
    binary.chmod(0o755)
    child = subprocess.Popen([str(binary), "60"])
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def test_real_child_process_is_named_and_shares_our_container(probe_child) -> None:
    resolver = ProcessResolver()
    me, child = resolver.resolve(
        [
            ProcessReading(pid=os.getpid(), memory_used_bytes=2.0),
            ProcessReading(pid=probe_child.pid, memory_used_bytes=1.0),
        ]
    )

    assert child.process_name == PROBE_NAME
    assert me.process_name == Path(f"/proc/{os.getpid()}/comm").read_text().strip()
    assert (child.container, child.pod) == (me.container, me.pod)
    assert len(me.container) in (0, 12) and all(c in "0123456789abcdef" for c in me.container)


def test_real_process_that_exited_gets_empty_labels(probe_child) -> None:
    resolver = ProcessResolver()
    assert resolve_one(resolver, probe_child.pid).process_name == PROBE_NAME

    probe_child.kill()
    probe_child.wait()

    assert resolve_one(resolver, probe_child.pid).process_name == ""
    assert host_to_namespace_pid(probe_child.pid) is None


def test_real_nspid_of_ourselves_and_of_a_child(probe_child) -> None:
    # This /proc belongs to our PID namespace, so both ends of NSpid are our own PIDs.
    assert namespace_pids(os.getpid())[0] == os.getpid()
    assert host_to_namespace_pid(os.getpid()) == os.getpid()
    assert host_to_namespace_pid(probe_child.pid) == probe_child.pid


def test_real_start_time_tells_two_processes_apart(probe_child) -> None:
    ours = process_start_time(os.getpid())
    theirs = process_start_time(probe_child.pid)
    assert ours is not None and theirs is not None
    assert theirs >= ours
    assert process_start_time(os.getpid()) == ours  # stable for the life of the process
