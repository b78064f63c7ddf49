"""SpanMapper: which GPUs a phase window belongs to, and which GPUs its service may claim.

A window's service is *entitled* to GPUs in one of two ways (docs/phases.md, "From windows to
GPUs"; the trust model is docs/security.md):

1. `--phase.map SERVICE=GPUS`: the operator said so. A mapped service is entitled to exactly
   those GPUs, whatever its spans say.
2. Otherwise `window.pid`, the sending process. vLLM's spans come from the API server, while the
   GPU is held by its EngineCore / VllmWorker children, so a window matches every GPU on which the
   sender *or one of its descendants* is a compute process. NVML reports host PIDs; a server in a
   container reports its own namespace PID, so PIDs are compared through the `NSpid:` line of
   /proc/<pid>/status (its last entry is the PID as the process itself sees it). The sender is
   also entitled to the other GPUs of its pod: those on which a process of the same pod (cgroup
   pod UID, named through the kubelet's pod-resources API) is a compute process.

`window.gpu_ids` (the sender naming its GPUs) is a claim, never an entitlement: it may narrow a
window to some of the GPUs its service is entitled to, and a claim of any other GPU is refused
(`gpu_not_permitted`). Only with `trust_span_gpus` does a claim place a window of a service that
has no entitlement at all (no phase.map entry, no pid found on a GPU), as before this rule. A GPU
named in phase.map takes windows of the services mapped to it only.

Nothing is guessed: a window that matches nothing, names a GPU that does not exist, claims one it
is not entitled to, or whose PID fits senders on different GPUs (two containers that are both
PID 1) is counted unmatched by reason and dropped.

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
GPU_NOT_PERMITTED = "gpu_not_permitted"  # gpu_ids or the pid name a GPU the service may not claim

PodKey = tuple[str, str]  # (namespace, pod name or UID) of a GPU process

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


class _PidAnswer(NamedTuple):
    """What a pid found: the GPUs its windows go on, and every GPU it may claim (its pod's too)."""

    gpus: tuple[GpuKey, ...]
    allowed: frozenset[GpuKey]


class _GpuState:
    """What one snapshot says about the GPUs, plus pid answers computed against it."""

    def __init__(self, snapshot: Snapshot | None, phase_map: dict[str, tuple[str, ...]] | None = None) -> None:
        gpus = snapshot.gpus if snapshot is not None else ()
        self.by_name: dict[str, GpuKey] = {}
        self.holders: dict[int, set[GpuKey]] = {}  # host pid -> GPUs it is a compute process on
        self.pods: dict[int, set[PodKey]] = {}  # host pid of a GPU process -> its pod(s)
        self.pod_gpus: dict[PodKey, set[GpuKey]] = {}  # pod -> GPUs one of its processes is on
        for sample in gpus:
            key = (sample.identity.index, sample.identity.uuid)
            self.by_name[str(key[0])] = key
            self.by_name[key[1].lower()] = key
            for process in sample.processes:
                self.holders.setdefault(process.pid, set()).add(key)
                if process.pod:  # from the cgroup (a pod UID), named by the kubelet where it can
                    pod = (process.namespace, process.pod)
                    self.pods.setdefault(process.pid, set()).add(pod)
                    self.pod_gpus.setdefault(pod, set()).add(key)
        # GPU -> the services phase.map names for it: such a GPU takes no other service's windows.
        # Per GPU name, so a map entry that also names a missing GPU still reserves the others.
        self.reserved: dict[GpuKey, set[str]] = {}
        for service, names in (phase_map or {}).items():
            for name in names:
                key = self.by_name.get(str(name).strip().lower())
                if key is not None:
                    self.reserved.setdefault(key, set()).add(service)
        self.senders: dict[int, dict[int, set[int]]] | None = None  # own pid -> host pid -> GPU pids
        self.pid_answers: dict[int, _PidAnswer | str] = {}

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
                 proc_ttl: float = 2.0, clock: Callable[[], float] = time.monotonic, *,
                 trust_span_gpus: bool = False,
                 on_mapped: Callable[[frozenset[str]], None] | None = None) -> None:
        """`trust_span_gpus`: let gpu_ids place the windows of a service with no entitlement (the
        behaviour before entitlements; anyone who can send spans can then put time on any GPU not
        in phase.map). `on_mapped`: told, once per map() call, the services whose windows of that
        call were placed by entitlement (phase.map, pid, pod) rather than by a trusted claim; the
        phase accountant gives those label slots priority (PhaseAccountant.mark_mapped)."""
        self._phase_map = {service: tuple(gpus) for service, gpus in phase_map}
        self._trust_span_gpus = trust_span_gpus
        self._on_mapped = on_mapped
        self._procs = ProcTable(proc_root, proc_ttl, clock)
        self._lock = threading.Lock()
        self._state = _GpuState(None, self._phase_map)

    def update_gpus(self, snapshot: Snapshot) -> None:
        """Take the GPUs and their compute processes of the newest snapshot; pid answers reset."""
        state = _GpuState(snapshot, self._phase_map)
        with self._lock:
            self._state = state

    def unknown_mapped_gpus(self) -> list[tuple[str, str]]:
        """(service, GPU name) of each phase.map GPU the newest snapshot does not have, in map order.
        Every window of such a service is counted unknown_gpu (see _gpus_of), so this is worth a warning."""
        with self._lock:
            state = self._state
        out: list[tuple[str, str]] = []
        for service, names in self._phase_map.items():
            for name in names:
                if state.by_name.get(str(name).strip().lower()) is None and (service, name) not in out:
                    out.append((service, name))
        return out

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
        entitled: set[str] = set()  # services placed by entitlement (for on_mapped)
        # The lock only hands over the state: update_gpus() (on the tick thread) must not wait for
        # a whole batch. A state is replaced, never changed, by update_gpus(); its pid caches are
        # filled here only, by the one span worker thread.
        with self._lock:
            state = self._state
        # The answer depends only on (service, gpu_ids, pid), which the windows of one resource
        # share: decide once per run of such windows (one per request, usually), not per window.
        answers: dict[tuple, tuple[tuple[GpuKey, ...], bool] | str] = {}
        for identity, run in groupby(windows, _IDENTITY):
            answer = answers.get(identity)
            if answer is None:
                answer = answers[identity] = self._gpus_of(state, *identity)
            if isinstance(answer, str):
                unmatched[answer] = unmatched.get(answer, 0) + sum(1 for _ in run)
            else:
                gpus, by_entitlement = answer
                mapped.setdefault(gpus, []).extend(run)
                if by_entitlement:
                    entitled.add(identity[0])
        if self._on_mapped is not None:
            self._on_mapped(frozenset(entitled))
        return mapped, unmatched

    # --- entitlement, then the claim ---------------------------------------------------------------

    def _gpus_of(self, state: _GpuState, service: str, gpu_ids: tuple[str, ...],
                 pid: int | None) -> tuple[tuple[GpuKey, ...], bool] | str:
        """(the GPUs a run of windows goes on, whether by entitlement) or why it goes nowhere."""
        configured = self._phase_map.get(service)
        claimed = None
        if gpu_ids:
            claimed = state.resolve(gpu_ids)
            if claimed is None:
                return UNKNOWN_GPU
        if configured:  # the operator's word: the claim may only narrow it
            allowed = state.resolve(configured)
            if allowed is None:
                return UNKNOWN_GPU
            if claimed is None:
                return allowed, True
            return (claimed, True) if set(claimed) <= set(allowed) else GPU_NOT_PERMITTED
        if pid is None:
            answer: _PidAnswer | str = NO_MAPPING
        else:
            answer = state.pid_answers.get(pid)
            if answer is None:
                answer = state.pid_answers[pid] = self._gpus_of_pid(state, pid)
        if isinstance(answer, str):  # no entitlement at all
            if claimed is None:
                return answer
            if not self._trust_span_gpus:
                return GPU_NOT_PERMITTED
            gpus, by_entitlement = claimed, False
        elif claimed is None:
            gpus, by_entitlement = answer.gpus, True
        elif answer.allowed.issuperset(claimed):
            gpus, by_entitlement = claimed, True
        else:
            return GPU_NOT_PERMITTED
        if any(key in state.reserved for key in gpus):  # phase.map gave it to other services
            return GPU_NOT_PERMITTED
        return gpus, by_entitlement

    def _gpus_of_pid(self, state: _GpuState, pid: int) -> _PidAnswer | str:
        if state.senders is None:
            state.senders = self._sender_index(state)
        candidates = state.senders.get(pid)
        if not candidates:
            return PID_NOT_ON_GPU
        gpu_sets = {frozenset(gpu for gpu_pid in gpu_pids for gpu in state.holders[gpu_pid])
                    for gpu_pids in candidates.values()}
        if len(gpu_sets) > 1:
            return AMBIGUOUS_PID
        gpus = gpu_sets.pop()
        allowed = set(gpus)
        for gpu_pids in candidates.values():
            for gpu_pid in gpu_pids:
                for pod in state.pods.get(gpu_pid, ()):
                    allowed |= state.pod_gpus[pod]
        return _PidAnswer(tuple(sorted(gpus)), frozenset(allowed))

    def _sender_index(self, state: _GpuState) -> dict[int, dict[int, set[int]]]:
        """own pid -> {host pid of a possible sender: the GPU processes it is or is an ancestor of}."""
        self._procs.prune()
        index: dict[int, dict[int, set[int]]] = {}
        for gpu_pid in state.holders:
            for host_pid, own_pid in self._procs.sender_candidates(gpu_pid):
                index.setdefault(own_pid, {}).setdefault(host_pid, set()).add(gpu_pid)
        return index
