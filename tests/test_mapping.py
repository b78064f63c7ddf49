"""SpanMapper: phase.map, explicit gpu_ids, and pid -> GPU through a fake and the real /proc.

Which claims are permitted (the trust rules) is tested in tests/test_span_trust.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpuphase.agent.spans.mapping import SpanMapper
from gpuphase.model.snapshot import GpuIdentity, GpuSample, ProcessSample, Snapshot
from tests.phase_helpers import decode

GPUS = [GpuIdentity(index=i, uuid=f"GPU-{i}{i}{i}{i}-uuid", name="NVIDIA H100 80GB HBM3") for i in range(4)]
KEYS = [(g.index, g.uuid) for g in GPUS]


def snapshot(holders: dict[int, list[int]] | None = None, gpus=GPUS) -> Snapshot:
    """GPUs with compute processes: {gpu index: [host pids]}."""
    holders = holders or {}
    return Snapshot(timestamp=1.0, gpus=tuple(
        GpuSample(identity=g, up=True, timestamp=1.0,
                  processes=tuple(ProcessSample(pid=pid) for pid in holders.get(g.index, [])))
        for g in gpus))


def fake_proc(root: Path, table: dict[int, tuple[int, tuple[int, ...]]]) -> Path:
    """Write /proc/<pid>/status files with the PPid and NSpid lines of {pid: (ppid, nspids)}."""
    for pid, (ppid, nspids) in table.items():
        (root / str(pid)).mkdir(parents=True, exist_ok=True)
        (root / str(pid) / "status").write_text(
            f"Name:\tproc{pid}\nState:\tS (sleeping)\nTgid:\t{pid}\nPid:\t{pid}\nPPid:\t{ppid}\n"
            f"NSpid:\t{chr(9).join(map(str, nspids))}\nThreads:\t1\n")
    return root


# A host with a container running vLLM (API server is the container's PID 1; EngineCore 12;
# workers 15 and 16 hold GPUs 0 and 1) and a host-level server 900 whose child 901 holds GPU 2.
HOST = {
    1: (0, (1,)),
    500: (1, (500,)),  # containerd-shim
    501: (500, (501, 1)),  # vLLM API server, PID 1 inside the container
    520: (501, (520, 12)),  # EngineCore
    530: (520, (530, 15)),  # worker, GPU 0
    531: (520, (531, 16)),  # worker, GPU 1
    900: (1, (900,)),  # host vLLM API server
    901: (900, (901,)),  # its engine, GPU 2
    950: (1, (950,)),  # some unrelated host process
}
HOLDERS = {0: [530], 1: [531], 2: [901]}


def pid_mapper(tmp_path, table=HOST, holders=HOLDERS, **kw) -> SpanMapper:
    mapper = SpanMapper((), proc_root=str(fake_proc(tmp_path / "proc", table)), **kw)
    mapper.update_gpus(snapshot(holders))
    return mapper


def gpus_of(mapper: SpanMapper, window) -> tuple | str:
    """The GPU keys of one window, or its unmatched reason."""
    mapped, unmatched = mapper.map([window])
    if unmatched:
        (reason,) = unmatched
        return reason
    (placement,) = mapped
    return tuple(sorted(placement))


@pytest.mark.parametrize("pid, expected", [
    (1, (KEYS[0], KEYS[1])),  # container PID of the API server: both workers are its descendants
    (12, (KEYS[0], KEYS[1])),  # EngineCore
    (15, (KEYS[0],)),  # one worker: only its own GPU
    (900, (KEYS[2],)),  # host server, host PIDs: its child's GPU
    (901, (KEYS[2],)),  # the GPU process itself
    (500, "pid_not_on_gpu"),  # the shim is outside the container's PID namespace: no server of it
    (950, "pid_not_on_gpu"),  # alive, holds no GPU and has no GPU descendants
    (4242, "pid_not_on_gpu"),  # no such process
])
def test_pid_maps_through_nspid_and_descendants(tmp_path, pid, expected):
    assert gpus_of(pid_mapper(tmp_path), decode(0, 1, pid=pid)) == expected


def test_same_container_pid_in_two_containers_is_ambiguous_not_guessed(tmp_path):
    table = dict(HOST) | {600: (1, (600,)), 601: (600, (601, 1)), 610: (601, (610, 5))}
    mapper = pid_mapper(tmp_path, table=table, holders=HOLDERS | {3: [610]})
    assert gpus_of(mapper, decode(0, 1, pid=1)) == "ambiguous_pid"
    assert gpus_of(mapper, decode(0, 1, pid=5)) == (KEYS[3],)  # a PID only one container has


def test_phase_map_by_index_and_uuid_wins_over_pid_and_bounds_gpu_ids(tmp_path):
    mapper = SpanMapper([("vllm", ("1", KEYS[3][1].upper())), ("tgi", ("2",))], proc_root=str(tmp_path))
    mapper.update_gpus(snapshot())
    assert gpus_of(mapper, decode(0, 1, service="vllm", pid=1)) == (KEYS[1], KEYS[3])
    assert gpus_of(mapper, decode(0, 1, service="tgi")) == (KEYS[2],)
    # The sender's own GPU ids may narrow its mapping, never leave it.
    assert gpus_of(mapper, decode(0, 1, service="vllm", gpu_ids=(KEYS[3][1],))) == (KEYS[3],)
    assert gpus_of(mapper, decode(0, 1, service="vllm", pid=1, gpu_ids=("0",))) == "gpu_not_permitted"
    assert gpus_of(mapper, decode(0, 1, service="vllm", gpu_ids=("1", "2"))) == "gpu_not_permitted"
    assert mapper.service_map() == {KEYS[1]: ("vllm",), KEYS[3]: ("vllm",), KEYS[2]: ("tgi",)}


def test_gpu_ids_from_the_sender_by_uuid_or_index_when_trusted(tmp_path):
    mapper = SpanMapper((), proc_root=str(tmp_path), trust_span_gpus=True)
    mapper.update_gpus(snapshot())
    assert gpus_of(mapper, decode(0, 1, gpu_ids=(KEYS[2][1], "3"))) == (KEYS[2], KEYS[3])


def test_unknown_gpu_and_no_mapping_are_counted_not_guessed(tmp_path):
    mapper = SpanMapper([("vllm", ("0", "7"))], proc_root=str(tmp_path), trust_span_gpus=True)
    mapper.update_gpus(snapshot())
    mapped, unmatched = mapper.map([decode(0, 1, service="vllm"), decode(0, 1, gpu_ids=("GPU-nope",)),
                                    decode(0, 1), decode(0, 1, pid=123), decode(0, 1, gpu_ids=("1",))])
    assert unmatched == {"unknown_gpu": 2, "no_mapping": 1, "pid_not_on_gpu": 1}
    assert list(mapped) == [(KEYS[1],)]
    assert mapper.service_map() == {}  # a phase.map entry naming a missing GPU ties nothing


def test_windows_are_grouped_by_placement_a_multi_gpu_one_under_its_group(tmp_path):
    mapper = pid_mapper(tmp_path)
    first, second, third, fourth = (decode(0, 1, pid=1), decode(1, 2, pid=15), decode(2, 3, pid=900),
                                    decode(3, 4, pid=1))
    mapped, unmatched = mapper.map([first, second, third, fourth])
    assert unmatched == {}
    assert mapped == {(KEYS[0], KEYS[1]): [first, fourth], (KEYS[0],): [second], (KEYS[2],): [third]}


def test_process_facts_are_cached_for_the_ttl_then_reread(tmp_path):
    now = [100.0]
    mapper = pid_mapper(tmp_path, proc_ttl=2.0, clock=lambda: now[0])
    assert gpus_of(mapper, decode(0, 1, pid=900)) == (KEYS[2],)
    # The GPU process is re-parented to the unrelated process 950.
    fake_proc(tmp_path / "proc", {901: (950, (901,))})
    mapper.update_gpus(snapshot(HOLDERS))
    assert gpus_of(mapper, decode(0, 1, pid=900)) == (KEYS[2],)  # within the TTL: cached facts
    now[0] += 2.5
    mapper.update_gpus(snapshot(HOLDERS))
    assert gpus_of(mapper, decode(0, 1, pid=900)) == "pid_not_on_gpu"
    assert gpus_of(mapper, decode(0, 1, pid=950)) == (KEYS[2],)


def test_no_snapshot_yet_matches_nothing(tmp_path):
    mapper = SpanMapper([("vllm", ("0",))], proc_root=str(tmp_path))
    assert mapper.map([decode(0, 1, service="vllm"), decode(0, 1, pid=os.getpid())])[1] == \
        {"unknown_gpu": 1, "pid_not_on_gpu": 1}


@pytest.fixture
def child_with_grandchild():
    """A real child process that starts a grandchild; yields (child pid, grandchild pid)."""
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys\n"
         "g = subprocess.Popen([sys.executable, '-c', 'import sys; sys.stdin.read()'], stdin=subprocess.PIPE)\n"
         "print(g.pid, flush=True)\n"
         "sys.stdin.read()\n"
         "g.stdin.close(); g.wait()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(child.stdout.readline())
        yield child.pid, grandchild
    finally:
        child.stdin.close()  # the child closes the grandchild's stdin: both exit
        child.wait(timeout=30)


def test_real_proc_maps_a_parent_pid_to_the_gpu_held_by_its_grandchild(child_with_grandchild):
    child, grandchild = child_with_grandchild
    mapper = SpanMapper(())
    mapper.update_gpus(snapshot({1: [grandchild]}))
    assert gpus_of(mapper, decode(0, 1, pid=grandchild)) == (KEYS[1],)
    assert gpus_of(mapper, decode(0, 1, pid=child)) == (KEYS[1],)  # the sender's descendant holds it
    assert gpus_of(mapper, decode(0, 1, pid=os.getpid())) == (KEYS[1],)  # so does ours, one level up


def test_real_proc_sibling_process_is_not_on_the_gpu(child_with_grandchild):
    child, grandchild = child_with_grandchild
    mapper = SpanMapper(())
    mapper.update_gpus(snapshot({0: [grandchild]}))
    sibling = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert gpus_of(mapper, decode(0, 1, pid=sibling.pid)) == "pid_not_on_gpu"
    finally:
        sibling.stdin.close()
        sibling.wait(timeout=30)
