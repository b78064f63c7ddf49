"""Wires the agent together: backend -> sampler -> (processes, phases) -> exporter; OTLP -> mapper -> phases.

`Agent` is also the exporter's ViewSource: one call per scrape returns everything rendered.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any

from gpuphase import __version__
from gpuphase.agent import sdnotify
from gpuphase.agent.backends import Backend, BackendUnavailable, create_backend
from gpuphase.agent.config import Config, unknown_env_warnings
from gpuphase.agent.latest import LatestValueWorker
from gpuphase.agent.phases import PhaseAccountant
from gpuphase.agent.processes import ProcessResolver
from gpuphase.agent.sampler import Sampler
from gpuphase.agent.spans.mapping import SpanMapper
from gpuphase.agent.spans.receiver import SpanIntake
from gpuphase.model.phase import PhaseWindow
from gpuphase.model.view import SamplerStats, SpanStats, View

log = logging.getLogger(__name__)

GIL_SWITCH_INTERVAL = 0.001  # seconds; see Agent.start


class Agent:
    def __init__(self, config: Config, backend: Backend | None = None, process_labeller=None):
        """process_labeller: (identity, readings) -> ProcessSamples in place of /proc and the
        kubelet (the demo's simulated servers exist nowhere else)."""
        self.config = config
        self._backend = backend
        self._custom_labeller = process_labeller
        self._stopped = threading.Event()
        self._servers: list[Any] = []
        self._listeners: dict[str, Any] = {}  # HTTP listeners by name, for their counters in the view
        self.metrics_port = 0
        self.otlp_grpc_address = ""
        self.otlp_http_address = ""
        self.accountant = PhaseAccountant(config.phase_settle, config.phase_retention, config.phase_max_services)
        self.mapper = SpanMapper(config.phase_map, on_mapped=self.accountant.mark_mapped,
                                 trust_span_gpus=config.phase_trust_span_gpus)
        self.intake = SpanIntake(self._on_windows, config.otlp_max_request_bytes, config.otlp_queue_size,
                                 max_spans_per_request=config.otlp_max_spans_per_request,
                                 max_items_per_request=config.otlp_max_items_per_request,
                                 max_spans_per_second=config.otlp_max_spans_per_second,
                                 parse_slots=config.otlp_max_concurrent_parses)
        self._accounting = LatestValueWorker("phase-accounting", self._account)
        self.sampler: Sampler | None = None
        self._known_gpus: tuple[tuple[int, str], ...] | None = None  # as last checked against phase.map
        self._unknown_mapped = False  # whether phase.map named a GPU the host did not have then

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the servers, then sampling. Raises BackendUnavailable, ConfigError or OSError."""
        # A thread woken by I/O, a lock or a ctypes call waits for the GIL up to the switch interval
        # for every busy thread ahead of it; a tick takes the GIL dozens of times, so under a span
        # flood the default 5 ms made ticks late (docs/design-figures.md). This is the daemon's own
        # process, so the setting is ours to make.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        self.start_servers()
        self.start_sampling()

    def start_servers(self) -> None:
        """/metrics, the health endpoints and the OTLP receivers. They come first so that
        /-/healthy answers (and /-/ready says 503) while a late driver is awaited (--nvml.wait)."""
        self._start_servers()
        self._accounting.start()
        threading.Thread(target=self._notify_when_ready, name="readiness", daemon=True).start()

    def start_sampling(self) -> None:
        """Discover the GPUs and start the sampler. Raises BackendUnavailable (may be retried)."""
        config = self.config
        if self._backend is None:
            self._backend = create_backend(config)
        resolve = None
        if config.collector_enabled("processes"):
            resolve = self._custom_labeller or self._process_labeller()
        sampler = Sampler(
            self._backend,
            interval=config.sample_interval,
            timeout=config.sample_timeout,
            resolve_processes=resolve,
            on_sample=[self.accountant.add_sample],
            on_snapshot=[self._on_snapshot],
        )
        try:
            identities = sampler.start()
        except BackendUnavailable:
            self._backend = None  # a fresh backend on the next attempt
            raise
        self.sampler = sampler
        log.info("gpuphase %s: %d GPU(s) on backend %s: %s; metrics %s; OTLP gRPC %s, HTTP %s", __version__,
                 len(identities), self._backend.name, ", ".join(f"{i.index}={i.name}" for i in identities) or "none",
                 self.metrics_url, self.otlp_grpc_address or "off", self.otlp_http_address or "off")

    def _process_labeller(self):
        """pid -> name/container/pod from /proc; on Kubernetes, pod names from the kubelet's
        pod-resources API (refreshed in the background; nothing happens where the socket is absent)."""
        import os

        from gpuphase.agent.podresources import DEFAULT_SOCKET, PodResourcesWatcher, label_with_owner

        resolver = ProcessResolver(max_series_per_gpu=self.config.process_max_series)
        if not os.path.exists(DEFAULT_SOCKET):
            return lambda identity, readings: resolver.resolve(readings)
        watcher = PodResourcesWatcher()
        watcher.start()
        self._servers.append(watcher)
        return lambda identity, readings: label_with_owner(resolver.resolve(readings), watcher.lookup(identity.uuid))

    def _start_servers(self) -> None:
        from gpuphase.exporters.http import MetricsServer
        from gpuphase.exporters.registry import build_registry
        from gpuphase.exporters.webconfig import load_web_config

        config = self.config
        registry = build_registry(self, config.disabled_collectors)
        metrics = MetricsServer(registry, config.web_listen_address,
                                telemetry_path=config.web_telemetry_path, ready=self.ready,
                                web_config=load_web_config(config.web_config_file)).start()
        self._servers.append(metrics)
        self._listeners["web"] = metrics
        self.metrics_port = metrics.port
        self._metrics_scheme = metrics.scheme
        self.intake.start()
        otlp_web = load_web_config(config.otlp_web_config_file)  # one file for both OTLP receivers
        auth = otlp_web.auth.check_header if otlp_web.auth else None
        if config.otlp_grpc_listen_address:
            from gpuphase.agent.spans.grpc_server import start_grpc_server
            from gpuphase.exporters.webconfig import grpc_server_credentials

            grpc_server = start_grpc_server(self.intake, config.otlp_grpc_listen_address,
                                            grpc_server_credentials(otlp_web), auth,
                                            max_concurrent_rpcs=config.otlp_grpc_max_concurrent_rpcs)
            self._servers.append(grpc_server)
            self.otlp_grpc_address = _with_port(config.otlp_grpc_listen_address, grpc_server.port)
        if config.otlp_http_listen_address:
            from gpuphase.agent.spans.http_server import start_http_server

            http_server = start_http_server(self.intake, config.otlp_http_listen_address, otlp_web.ssl_context, auth)
            self._servers.append(http_server)
            self._listeners["otlp_http"] = http_server
            self.otlp_http_address = _with_port(config.otlp_http_listen_address, http_server.port)
        if config.otlp_metrics_endpoint:
            self._start_metrics_push(registry)

    def _start_metrics_push(self, registry) -> None:
        """Push the same registry /metrics serves to an OTLP receiver. Appended last, so stop()
        shuts it down first, while the sampler still runs, and its final export has data."""
        from gpuphase.exporters.otlp_push import start_metrics_push

        config = self.config
        self._servers.append(start_metrics_push(registry, config.otlp_metrics_endpoint, config.otlp_metrics_interval,
                                                config.otlp_metrics_insecure, config.disabled_collectors))

    @property
    def metrics_url(self) -> str:
        scheme = getattr(self, "_metrics_scheme", "http")
        host = _with_port(self.config.web_listen_address, self.metrics_port).rpartition(":")[0] or "127.0.0.1"
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1"
        return f"{scheme}://{host}:{self.metrics_port}{self.config.web_telemetry_path}"

    def _notify_when_ready(self) -> None:
        while not self.wait_stopped(0 if self.sampler else 0.5):
            if self.sampler and self.sampler.wait_ready(0.5):
                sdnotify.ready("sampling")
                log.info("ready: first complete sample taken; serving %s", self.metrics_url)
                return

    def ready(self) -> bool:
        return bool(self.sampler and self.sampler.ready())

    def wait_stopped(self, timeout: float) -> bool:
        return self._stopped.wait(timeout)

    def request_stop(self) -> None:
        self._stopped.set()

    def stop(self) -> None:
        self._stopped.set()
        sdnotify.stopping()
        for server in reversed(self._servers):
            try:
                (server.shutdown if hasattr(server, "shutdown") else server.stop)()
            except Exception:
                log.exception("stopping %r failed", server)
        self.intake.stop()
        if self.sampler:
            self.sampler.stop()
        self._accounting.stop()
        if self._backend:
            self._backend.close()

    # -- data flow -------------------------------------------------------------------------------
    def _on_snapshot(self, snapshot) -> None:
        """Tick thread: refresh the GPU/process view of the mapper, have settled time finalised.
        Nothing here may wait on span work (see agent/latest.py)."""
        self.mapper.update_gpus(snapshot)
        if self.config.phase_map:
            self._check_phase_map(snapshot)
        self._accounting.post(snapshot.timestamp)
        sdnotify.watchdog()  # systemd's WatchdogSec: proof that the tick loop is alive

    def _check_phase_map(self, snapshot) -> None:
        """Warn, at the first snapshot and whenever the GPUs change (a GPU back with another UUID),
        of each --phase.map GPU this host does not have: that service's spans would all be dropped."""
        gpus = tuple((sample.identity.index, sample.identity.uuid) for sample in snapshot.gpus)
        if gpus == self._known_gpus:
            return
        self._known_gpus = gpus
        known = ", ".join(f"{index} ({uuid})" for index, uuid in gpus) or "none"
        unknown = self.mapper.unknown_mapped_gpus()
        for service, name in unknown:
            log.warning("--phase.map %s: GPU %r is not on this host (its GPUs: %s); spans of %s are dropped "
                        "and counted as unknown_gpu", service, name, known, service)
        if not unknown and self._unknown_mapped:
            log.info("--phase.map: every GPU named is on this host now (its GPUs: %s)", known)
        self._unknown_mapped = bool(unknown)

    def _account(self, timestamp: float) -> None:
        """Accounting thread: the configured services per GPU, then finalise up to timestamp."""
        for gpu_key, services in self.mapper.service_map().items():
            self.accountant.set_mapping(gpu_key, services)
        self.accountant.advance(timestamp)

    def _on_windows(self, windows: list[PhaseWindow]) -> None:
        """Span intake worker: windows -> GPUs -> accountant; what can't be placed is counted."""
        placements, unmatched = self.mapper.map(windows)
        for reason, count in unmatched.items():
            self.intake.count_unmatched(reason, count)
        for gpus, placed in placements.items():
            self.accountant.place(gpus, placed)

    def view(self) -> View:
        from gpuphase.exporters.collectors.process import read_self

        stats = self.intake.stats()
        rejected = dict(stats.rejected)
        for reason, count in self.accountant.rejected().items():
            rejected[reason] = rejected.get(reason, 0) + count
        return View(
            snapshot=self.sampler.latest() if self.sampler else None,
            backend=self._backend.name if self._backend else "",
            phases=self.accountant.series(),
            last_span=self.accountant.last_span(),
            spans=SpanStats(stats.received, rejected, stats.unmatched, self.accountant.clipped()),
            sampler=self.sampler.stats() if self.sampler else SamplerStats(),
            listeners={name: listener.stats() for name, listener in self._listeners.items()},
            process=read_self() if self.config.collector_enabled("process") else None,
        )


def _with_port(address: str, port: int) -> str:
    host = address.rpartition(":")[0]
    return f"{host or '0.0.0.0'}:{port}"


def handle_signals(agent: Agent) -> None:
    """SIGTERM and SIGINT ask the agent to stop cleanly, SIGHUP is logged and ignored (`run` and
    `demo` alike). Installed explicitly even for SIGINT: a background job of a non-interactive
    shell starts with SIGINT ignored, and Python then never raises KeyboardInterrupt for it."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.request_stop())
    # SIGHUP's default would end the agent: a closed terminal, or an operator used to daemons
    # that reload on it. There is nothing to reload in place, so it is said and ignored.
    signal.signal(signal.SIGHUP, lambda *_: log.warning(
        "SIGHUP received: the agent does not reload its configuration; restart it to apply changes"))


def run_agent(config: Config) -> int:
    """`gpuphase run`: start, serve until SIGTERM/SIGINT, stop cleanly. Returns the exit code."""
    from gpuphase.agent.logs import setup_logging

    setup_logging(config.log_format, config.log_level)
    for warning in unknown_env_warnings(os.environ):
        log.warning("%s", warning)
    agent = Agent(config)
    handle_signals(agent)
    try:
        agent.start_servers()
        _start_sampling_with_wait(agent, config)
    except BackendUnavailable as err:
        print(f"gpuphase: {err}", file=sys.stderr)
        agent.stop()
        return 1
    except (OSError, ValueError) as err:  # address in use, bad web config (WebConfigError), ...
        print(f"gpuphase: cannot start: {err}", file=sys.stderr)
        agent.stop()
        return 1
    while not agent.wait_stopped(1.0):
        pass
    log.info("stopping")
    agent.stop()
    return 0


def _start_sampling_with_wait(agent: Agent, config: Config) -> None:
    """With --nvml.wait, a host whose driver is not loaded yet is retried instead of failing."""
    delay = 1.0
    while True:
        try:
            agent.start_sampling()
            return
        except BackendUnavailable as err:
            if not config.nvml_wait or agent.wait_stopped(0):
                raise
            log.warning("%s; retrying in %.0fs (--nvml.wait)", err, delay)
            if agent.wait_stopped(delay):
                return  # asked to stop while waiting: a clean exit
            delay = min(delay * 2, 30.0)
