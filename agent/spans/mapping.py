"""SpanMapper: which GPUs a phase window belongs to.

Tried in order, first answer wins (docs/phases.md, "From windows to GPUs"):

1. `--phase.map SERVICE=GPUS`: the operator said so.
2. `window.gpu_ids`: the model server named its GPUs (UUIDs or indices).
3. `window.pid`: the sending process. vLLM's spans come from the API server, while the GPU is held
   by its EngineCore / VllmWorker children, so a window matches every GPU on which the sender
   *or one of its descendants* is a compute process. NVML reports host PIDs; a server in a
   container reports its own namespace PID, so PIDs are compared through the `NSpid:` line of
   /proc/<pid>/status (its last entry is the PID as the process itself sees it).

Nothing is guessed: a window that matches nothing, names a GPU that does not exist, or whose
PID fits senders on different GPUs (two containers that are both PID 1) is counted unmatched by
reason and dropped.

The walk goes upward from each GPU process through its ancestors in the same PID namespace
(the sender is the GPU process itself or one of its ancestors), so each tick costs a few reads of
/proc/<pid>/status per GPU process, cached for a short TTL, not a scan of all of /proc.
"""

from __future__ import annotations

import os
import threading
import time
from itertools import groupby
from operator import itemgetter
from typing import Callable, Iterable, NamedTuple

from gpuphase.model.phase import PhaseWindow
from gpuphase.model.snapshot import Snapshot

GpuKey = tuple[int, str]  # (index, uuid)

# What decides a window's GPUs: its service, gpu_ids and pid.
_IDENTITY = itemgetter(PhaseWindow._fields.index("service"), PhaseWindow._fields.index("gpu_ids"),
                       PhaseWindow._fields.index("pid"))

NO_MAPPING = "no_mapping"  # no phase.map entry, no gpu_ids and no pid
PID_NOT_ON_GPU = "pid_not_on_gpu"  # neither the pid nor any descendant holds a GPU
UNKNOWN_GPU = "unknown_gpu"  # phase.map or gpu_ids names a GPU this host does not have
AMBIGUOUS_PID = "ambiguous_pid"  # the pid fits senders on different GPUs (several PID namespaces)

_MAX_ANCESTRY = 64  # guards the walk against a corrupt or cyclic process table


class ProcInfo(NamedTuple):
    ppid: int
    nspids: tuple[int, ...]  # outermost (as /proc shows it) first, the process's own view last


class ProcTable:
    """Reads PPid and NSpid of processes under `proc_root`, caching each for `ttl` seconds."""

    def __init__(self, proc_root: str = "/proc", ttl: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._root = proc_root
        self._ttl = ttl
        self._clock = clock
        self._cache: dict[int, tuple[float, ProcInfo | None]] = {}

    def info(self, pid: int) -> ProcInfo | None:
        """None when the process is gone or unreadable."""
        now = self._clock()
        cached = self._cache.get(pid)
        if cached is not None and now - cached[0] < self._ttl:
            return cached[1]
        info = self._read(pid)
        self._cache[pid] = (now, info)
        return info

    def prune(self) -> None:
        """Forget expired entries so the cache tracks only processes still being asked about."""
        now = self._clock()
        self._cache = {pid: entry for pid, entry in self._cache.items() if now - entry[0] < self._ttl}

    def _read(self, pid: int) -> ProcInfo | None:
        try:
            with open(os.path.join(self._root, str(pid), "status"), encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        except OSError:
            return None
        ppid, nspids = None, None
        for line in text.splitlines():
            if line.startswith("PPid:"):
                ppid = int(line.split()[1])
            elif line.startswith("NSpid:"):
                nspids = tuple(int(field) for field in line.split()[1:])
        if ppid is None:
            return None
        return ProcInfo(ppid, nspids or (pid,))  # kernels before 4.1 have no NSpid line

    def sender_candidates(self, gpu_pid: int) -> list[tuple[int, int]]:
        """(pid as /proc shows it, pid as the process sees itself) of the GPU process and each
        ancestor in its PID namespace: the processes whose spans may speak for this GPU process.

        The walk stops at a namespace boundary (a container's parent is no server of it) and never
        takes /proc's PID 1 as an ancestor, since init is everybody's ancestor.
        """
        first = self.info(gpu_pid)
        if first is None:
            return [(gpu_pid, gpu_pid)]  # gone or unreadable: it can still speak for itself
        depth = len(first.nspids)
        out: list[tuple[int, int]] = []
        pid, info = gpu_pid, first
        while info is not None and len(info.nspids) == depth and len(out) < _MAX_ANCESTRY:
            out.append((pid, info.nspids[-1]))
            if info.ppid <= 1 or info.ppid == pid:
                break
            pid = info.ppid
            info = self.info(pid)
        return out


class _GpuState:
    """What one snapshot says about the GPUs, plus pid answers computed against it."""

    def __init__(self, snapshot: Snapshot | None) -> None:
        gpus = snapshot.gpus if snapshot is not None else ()
        self.by_name: dict[str, GpuKey] = {}
        self.holders: dict[int, set[GpuKey]] = {}  # host pid -> GPUs it is a compute process on
        for sample in gpus:
            key = (sample.identity.index, sample.identity.uuid)
            self.by_name[str(key[0])] = key
            self.by_name[key[1].lower()] = key
            for process in sample.processes:
                self.holders.setdefault(process.pid, set()).add(key)
        self.senders: dict[int, dict[int, set[GpuKey]]] | None = None  # own pid -> host pid -> GPUs
        self.pid_answers: dict[int, tuple[GpuKey, ...] | str] = {}

    def resolve(self, names: Iterable[str]) -> tuple[GpuKey, ...] | None:
        """GPUs named by index or UUID; None if any name is not a GPU of this host."""
        keys = []
        for name in names:
            key = self.by_name.get(str(name).strip().lower())
            if key is None:
                return None
            keys.append(key)
        return tuple(sorted(set(keys)))


class SpanMapper:
    """Ties PhaseWindows to GPUs. update_gpus() from the sampler thread, map() from the span worker."""

    def __init__(self, phase_map: Iterable[tuple[str, Iterable[str]]], proc_root: str = "/proc",
                 proc_ttl: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._phase_map = {service: tuple(gpus) for service, gpus in phase_map}
        self._procs = ProcTable(proc_root, proc_ttl, clock)
        self._lock = threading.Lock()
        self._state = _GpuState(None)

    def update_gpus(self, snapshot: Snapshot) -> None:
        """Take the GPUs and their compute processes of the newest snapshot; pid answers reset."""
        state = _GpuState(snapshot)
        with self._lock:
            self._state = state

    def service_map(self) -> dict[GpuKey, tuple[str, ...]]:
        """GPU -> services configured with phase.map (for PhaseAccountant.set_mapping)."""
        with self._lock:
            state = self._state
        out: dict[GpuKey, list[str]] = {}
        for service, names in self._phase_map.items():
            for key in state.resolve(names) or ():
                out.setdefault(key, []).append(service)
        return {key: tuple(services) for key, services in out.items()}

    def map(self, windows: Iterable[PhaseWindow]) -> tuple[dict[tuple[GpuKey, ...], list[PhaseWindow]],
                                                          dict[str, int]]:
        """Windows grouped by placement: the GPUs they belong on (one, or a tensor-parallel group,
        each of whose GPUs gets every window), in the order given; and the windows that found no
        GPU, counted by reason. PhaseAccountant.place() takes a placement as it is."""
        mapped: dict[tuple[GpuKey, ...], list[PhaseWindow]] = {}
        unmatched: dict[str, int] = {}
        # The lock only hands over the state: update_gpus() (on the tick thread) must not wait for
        # a whole batch. A state is replaced, never changed, by update_gpus(); its pid caches are
        # filled here only, by the one span worker thread.
        with self._lock:
            state = self._state
        # The answer depends only on (service, gpu_ids, pid), which the windows of one resource
        # share: decide once per run of such windows (one per request, usually), not per window.
        answers: dict[tuple, tuple[GpuKey, ...] | str] = {}
        for identity, run in groupby(windows, _IDENTITY):
            answer = answers.get(identity)
            if answer is None:
                answer = answers[identity] = self._gpus_of(state, *identity)
            if isinstance(answer, str):
                unmatched[answer] = unmatched.get(answer, 0) + sum(1 for _ in run)
            else:
                mapped.setdefault(answer, []).extend(run)
        return mapped, unmatched

    # --- the three ways, in order ----------------------------------------------------------------

    def _gpus_of(self, state: _GpuState, service: str, gpu_ids: tuple[str, ...],
                 pid: int | None) -> tuple[GpuKey, ...] | str:
        names = self._phase_map.get(service) or gpu_ids
        if names:
            keys = state.resolve(names)
            return keys if keys is not None else UNKNOWN_GPU
        if pid is None:
            return NO_MAPPING
        answer = state.pid_answers.get(pid)
        if answer is None:
            answer = state.pid_answers[pid] = self._gpus_of_pid(state, pid)
        return answer

    def _gpus_of_pid(self, state: _GpuState, pid: int) -> tuple[GpuKey, ...] | str:
        if state.senders is None:
            state.senders = self._sender_index(state)
        candidates = state.senders.get(pid)
        if not candidates:
            return PID_NOT_ON_GPU
        gpu_sets = {frozenset(gpus) for gpus in candidates.values()}
        if len(gpu_sets) > 1:
            return AMBIGUOUS_PID
        return tuple(sorted(gpu_sets.pop()))

    def _sender_index(self, state: _GpuState) -> dict[int, dict[int, set[GpuKey]]]:
        """own pid -> {host pid of a possible sender: GPUs held by it or its descendants}."""
        self._procs.prune()
        index: dict[int, dict[int, set[GpuKey]]] = {}
        for gpu_pid, gpus in state.holders.items():
            for host_pid, own_pid in self._procs.sender_candidates(gpu_pid):
                index.setdefault(own_pid, {}).setdefault(host_pid, set()).update(gpus)
        return index
