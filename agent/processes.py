"""Who is this GPU process? Host PID -> process name, container, Kubernetes pod.

NVML reports compute processes by host PID and nothing else. An operator wants to read
"vllm in pod X" on a dashboard, so the sampler passes each GPU's ProcessReadings through a
ProcessResolver, which labels them from /proc:

- process_name: /proc/<pid>/comm (what `ps -o comm` and `top` show, at most 15 bytes), or the
  basename of argv[0] from /proc/<pid>/cmdline when comm cannot be read. Non-printable
  characters become "?" (as `ps` prints them) and the name is cut to MAX_NAME_LENGTH, so a
  hostile argv can neither break the exposition format nor blow up label size.
- container: the container ID found in /proc/<pid>/cgroup (cgroup v1 and v2; Docker, containerd,
  CRI-O, Podman, nerdctl; systemd and cgroupfs drivers), shortened to its first 12 hex characters
  as `docker ps`, `podman ps` and `nerdctl ps` print it. Every CLI accepts that prefix; to join with
  kube-state-metrics' full `container_id`, cut it with label_replace(..., "(?:.*://)?(.{12}).*").
- pod: the Kubernetes pod UID from the same cgroup path. A `pod_lookup` hook (pod UID ->
  (pod name, namespace)), to be provided by the kubelet pod-resources integration, replaces it
  with the pod name and fills `namespace`; without the hook `pod` holds the UID and `namespace`
  stays empty.

A process that vanished or cannot be read still yields a sample, with empty labels: the memory it
held is real and must stay visible. Nothing here raises on bad or missing /proc data.

Costs: the resolver runs on the sampling thread (never on the scrape path) and caches identities
per (pid, start time). The start time (field 22 of /proc/<pid>/stat) tells a recycled PID apart
from the process that held it before, so a steady set of processes costs one small read of
/proc/<pid>/stat and a dict lookup per tick. Entries expire after `cache_ttl` seconds because
exec() and prctl(PR_SET_NAME) change a process's name without changing its start time, and a
process can be moved to another cgroup.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from gpuphase.model.snapshot import ProcessReading, ProcessSample

MAX_NAME_LENGTH = 64
CONTAINER_ID_LENGTH = 12  # as `docker ps` shows it
DEFAULT_MAX_CACHE_ENTRIES = 4096

PodLookup = Callable[[str], "tuple[str, str] | None"]

# One cgroup path segment that names a container, innermost segment wins:
#   docker (cgroupfs):            /docker/<id>
#   kubelet (cgroupfs driver):    /kubepods/burstable/pod<uid>/<id>
#   podman (cgroupfs):            /libpod_parent/libpod-<id>
#   systemd driver (any runtime): docker-<id>.scope, cri-containerd-<id>.scope, crio-<id>.scope,
#                                 libpod-<id>.scope, nerdctl-<id>.scope
# CRI-O's monitor runs in crio-conmon-<id>.scope: that is the conmon process, not the container,
# and the prefix list deliberately does not match it.
_CONTAINER_SEGMENT = re.compile(
    r"^(?:(?:docker|cri-containerd|crio|libpod|nerdctl)-)?([0-9a-f]{64})(?:\.scope)?$"
)

# A pod's cgroup: kubepods-burstable-pod<uid with "_">.slice (systemd driver), pod<uid> (cgroupfs).
# Guaranteed pods have no QoS level (kubepods-pod<uid>.slice, /kubepods/pod<uid>). Static pods'
# UIDs are a 32-hex config hash without dashes, hence the loose character class.
_POD_SEGMENT = re.compile(r"^(?:kubepods(?:-[a-z]+)*-)?pod([0-9a-f][0-9a-f_-]*)(?:\.slice)?$")


@dataclass(frozen=True)
class ProcessIdentity:
    """The labels of one process, independent of any GPU or tick."""

    process_name: str = ""
    container: str = ""
    pod: str = ""
    namespace: str = ""


UNKNOWN = ProcessIdentity()


@dataclass(frozen=True)
class _CacheEntry:
    start_time: int
    identity: ProcessIdentity
    resolved_at: float


class ProcessResolver:
    """Turns NVML's raw compute processes into labelled ProcessSamples.

    The sampler calls resolve() once per GPU per tick, from its sampling thread. A lock guards
    the cache so that a sampler reading GPUs on several threads may share one resolver.
    `pod_lookup` is called on that thread at most once per process per TTL: it must answer from
    memory (a cache fed by the kubelet), never by a network call.
    """

    def __init__(
        self,
        proc_root: str = "/proc",
        max_series_per_gpu: int = 64,
        cache_ttl: float = 30.0,
        pod_lookup: PodLookup | None = None,
        *,
        max_cache_entries: int = DEFAULT_MAX_CACHE_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_series_per_gpu < 0:
            raise ValueError(f"max_series_per_gpu must be >= 0, got {max_series_per_gpu}")
        if max_cache_entries < 1:
            raise ValueError(f"max_cache_entries must be >= 1, got {max_cache_entries}")
        self.proc_root = proc_root
        self.max_series_per_gpu = max_series_per_gpu
        self.cache_ttl = cache_ttl
        self.pod_lookup = pod_lookup
        self._max_cache_entries = max_cache_entries
        self._clock = clock
        self._cache: dict[int, _CacheEntry] = {}
        self._last_sweep = clock()
        self._lock = threading.Lock()

    @property
    def cache_size(self) -> int:
        """How many processes are cached now (bounded by max_cache_entries)."""
        return len(self._cache)

    def resolve(self, readings: Sequence[ProcessReading]) -> tuple[ProcessSample, ...]:
        """Label one GPU's processes: at most max_series_per_gpu, largest memory first.

        The cap keeps per-process series bounded on a GPU shared by many small processes (MPS,
        notebooks); ties break by pid so the kept set does not flap between ticks.
        """
        kept = sorted(_merge_duplicate_pids(readings), key=_largest_memory_first)
        kept = kept[: self.max_series_per_gpu]
        now = self._clock()
        with self._lock:
            samples = tuple(self._sample(reading, now) for reading in kept)
            self._prune(now)
        return samples

    def identify(self, pid: int) -> ProcessIdentity:
        """The labels of one host PID (cached); UNKNOWN when the process is gone or unreadable."""
        now = self._clock()
        with self._lock:
            identity = self._identify(pid, now)
            self._prune(now)
        return identity

    def _sample(self, reading: ProcessReading, now: float) -> ProcessSample:
        identity = self._identify(reading.pid, now)
        return ProcessSample(
            pid=reading.pid,
            process_name=identity.process_name,
            container=identity.container,
            pod=identity.pod,
            namespace=identity.namespace,
            memory_used_bytes=reading.memory_used_bytes,
            sm_active_ratio=reading.sm_active_ratio,
        )

    def _identify(self, pid: int, now: float) -> ProcessIdentity:
        start_time = process_start_time(pid, self.proc_root)
        if start_time is None:  # gone, or hidden from us (hidepid): nothing is trustworthy
            self._cache.pop(pid, None)
            return UNKNOWN
        cached = self._cache.get(pid)
        if cached and cached.start_time == start_time and now - cached.resolved_at < self.cache_ttl:
            return cached.identity
        identity = self._read_identity(pid)
        # The PID may have exited and been reused while we read its files; only labels read
        # between two equal start times belong to the process we were asked about.
        if process_start_time(pid, self.proc_root) != start_time:
            self._cache.pop(pid, None)
            return UNKNOWN
        self._cache[pid] = _CacheEntry(start_time, identity, now)
        return identity

    def _read_identity(self, pid: int) -> ProcessIdentity:
        cgroup = _read_text(os.path.join(self.proc_root, str(pid), "cgroup"))
        pod_uid = pod_uid_from_cgroup(cgroup)
        pod, namespace = self._pod_labels(pod_uid)
        return ProcessIdentity(
            process_name=self._process_name(pid),
            container=container_id_from_cgroup(cgroup),
            pod=pod,
            namespace=namespace,
        )

    def _process_name(self, pid: int) -> str:
        base = os.path.join(self.proc_root, str(pid))
        name = sanitize_name(_read_text(os.path.join(base, "comm")))
        if name:
            return name
        argv0 = _read_bytes(os.path.join(base, "cmdline")).split(b"\0", 1)[0]
        return sanitize_name(os.path.basename(argv0.decode("utf-8", "replace")))

    def _pod_labels(self, pod_uid: str) -> tuple[str, str]:
        if not pod_uid or self.pod_lookup is None:
            return pod_uid, ""
        try:
            found = self.pod_lookup(pod_uid)
        except Exception:  # a broken hook must not cost us the sample; the UID still identifies it
            found = None
        if not found or not found[0]:
            return pod_uid, ""
        name, namespace = found
        return sanitize_name(name), sanitize_name(namespace or "")

    def _prune(self, now: float) -> None:
        """Drop expired entries once per TTL, and the oldest ones beyond max_cache_entries.

        Entries of exited processes are useless (a new process on that PID has another start
        time) but would pile up; sweeping once per TTL keeps the per-call cost O(1) amortized.
        """
        if now - self._last_sweep >= self.cache_ttl:
            self._last_sweep = now
            expired = [pid for pid, e in self._cache.items() if now - e.resolved_at >= self.cache_ttl]
            for pid in expired:
                del self._cache[pid]
        excess = len(self._cache) - self._max_cache_entries
        if excess > 0:
            oldest = sorted(self._cache, key=lambda pid: self._cache[pid].resolved_at)[:excess]
            for pid in oldest:
                del self._cache[pid]


def namespace_pids(pid: int, proc_root: str = "/proc") -> tuple[int, ...]:
    """The PIDs of one process in each PID namespace it belongs to, outermost first.

    Read from the `NSpid:` line of /proc/<pid>/status: the first number is the PID as this
    /proc sees it (the host PID for a host-mounted /proc), the last is the PID the process sees
    itself as (what a containerised model server reports in its spans). Empty when the process
    is gone, unreadable, or the kernel predates NSpid (< 4.1).
    """
    for line in _read_text(os.path.join(proc_root, str(pid), "status")).splitlines():
        if line.startswith("NSpid:"):
            try:
                return tuple(int(field) for field in line[len("NSpid:") :].split())
            except ValueError:
                return ()
    return ()


def host_to_namespace_pid(pid: int, proc_root: str = "/proc") -> int | None:
    """The PID a process has inside its own (innermost) PID namespace; None when unknown."""
    pids = namespace_pids(pid, proc_root)
    return pids[-1] if pids else None


def process_start_time(pid: int, proc_root: str = "/proc") -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks after boot); None when gone or unreadable.

    comm (field 2) is parenthesised and may itself contain spaces and ")", so fields are
    counted from the last ")".
    """
    stat = _read_text(os.path.join(proc_root, str(pid), "stat"))
    _, paren, rest = stat.rpartition(")")
    fields = rest.split()
    if not paren or len(fields) < 20:
        return None
    try:
        return int(fields[19])  # fields[0] is field 3 (state), so field 22 is fields[19]
    except ValueError:
        return None


def container_id_from_cgroup(cgroup: str) -> str:
    """The short container ID in the contents of a /proc/<pid>/cgroup file; "" when none.

    The cgroup v2 line ("0::/...") is preferred; on a v1 or hybrid host the first controller
    line that names a container answers. Within a path the innermost container wins (nested
    containers).
    """
    for path in _cgroup_paths(cgroup):
        for segment in reversed(path.split("/")):
            match = _CONTAINER_SEGMENT.match(segment)
            if match:
                return match.group(1)[:CONTAINER_ID_LENGTH]
    return ""


def pod_uid_from_cgroup(cgroup: str) -> str:
    """The Kubernetes pod UID (with dashes) in the contents of a /proc/<pid>/cgroup file; "" when none."""
    for path in _cgroup_paths(cgroup):
        segments = path.split("/")
        if not any(segment.startswith("kubepods") for segment in segments):
            continue
        for segment in reversed(segments):
            match = _POD_SEGMENT.match(segment)
            if match:
                return match.group(1).replace("_", "-")
    return ""


def sanitize_name(raw: str) -> str:
    """A label-safe name: trimmed, non-printable characters as "?", at most MAX_NAME_LENGTH."""
    text = raw.strip()[:MAX_NAME_LENGTH]
    return "".join(ch if ch.isprintable() and ch != "\ufffd" else "?" for ch in text)


def _cgroup_paths(cgroup: str) -> list[str]:
    """Paths of a /proc/<pid>/cgroup file ("id:controllers:path" lines), the v2 line first."""
    unified: list[str] = []
    legacy: list[str] = []
    for line in cgroup.splitlines():
        hierarchy, sep1, rest = line.partition(":")
        _controllers, sep2, path = rest.partition(":")
        if sep1 and sep2:
            (unified if hierarchy == "0" else legacy).append(path)
    return unified + legacy


def _merge_duplicate_pids(readings: Iterable[ProcessReading]) -> list[ProcessReading]:
    """One reading per PID: a PID listed twice would be two samples with the same label set.

    NVML can list a PID more than once on one device (e.g. once per MIG instance); both figures
    are shares of this one GPU, so they add up.
    """
    merged: dict[int, ProcessReading] = {}
    for reading in readings:
        seen = merged.get(reading.pid)
        if seen is None:
            merged[reading.pid] = reading
        else:
            merged[reading.pid] = ProcessReading(
                pid=reading.pid,
                memory_used_bytes=_add(seen.memory_used_bytes, reading.memory_used_bytes),
                sm_active_ratio=_capped_ratio(_add(seen.sm_active_ratio, reading.sm_active_ratio)),
            )
    return list(merged.values())


def _add(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _capped_ratio(ratio: float | None) -> float | None:
    return None if ratio is None else min(ratio, 1.0)


def _largest_memory_first(reading: ProcessReading) -> tuple[bool, float, int]:
    memory = reading.memory_used_bytes
    return (memory is None, -(memory or 0.0), reading.pid)


def _read_bytes(path: str) -> bytes:
    """A /proc file's bytes; b"" on any OS error (exited process, hidepid, LSM denial, race)."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def _read_text(path: str) -> str:
    return _read_bytes(path).decode("utf-8", "replace")
