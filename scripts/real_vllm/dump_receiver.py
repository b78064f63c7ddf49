"""An OTLP traces receiver that only records: each raw ExportTraceServiceRequest to a file.

    python scripts/real_vllm/dump_receiver.py OUT_DIR [--http HOST:PORT] [--grpc HOST:PORT]

OTLP/HTTP (`POST /v1/traces`, protobuf; a gzipped body is stored inflated) and OTLP/gRPC
(`TraceService/Export`, the message bytes as received, never parsed). Files are
`OUT_DIR/NNNN-http.pb` / `NNNN-grpc.pb` in arrival order; every answer is an empty (all fields
default) ExportTraceServiceResponse. Runs until SIGTERM/SIGINT. Needs only grpcio for --grpc.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class Recorder:
    def __init__(self, out: Path) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        start = 1 + max((int(p.name[:4]) for p in out.glob("[0-9][0-9][0-9][0-9]-*.pb")), default=0)
        self._serial = itertools.count(start)
        self._lock = threading.Lock()

    def write(self, body: bytes, transport: str) -> None:
        with self._lock:
            path = self.out / f"{next(self._serial):04d}-{transport}.pb"
            path.write_bytes(body)
        print(f"recorded {path.name}: {len(body)} bytes", flush=True)


def serve_http(recorder: Recorder, address: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.headers.get("Content-Encoding", "").lower() == "gzip":
                body = gzip.decompress(body)
            if self.path != "/v1/traces" or "protobuf" not in self.headers.get("Content-Type", ""):
                self.send_response(404 if self.path != "/v1/traces" else 415)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            recorder.write(body, "http")
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    host, _, port = address.rpartition(":")
    server = ThreadingHTTPServer((host, int(port)), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="dump-http").start()
    return server


def serve_grpc(recorder: Recorder, address: str):
    from concurrent import futures

    import grpc

    def export(request: bytes, context) -> bytes:
        recorder.write(request, "grpc")
        return b""

    handler = grpc.method_handlers_generic_handler(
        "opentelemetry.proto.collector.trace.v1.TraceService",
        {"Export": grpc.unary_unary_rpc_method_handler(export)})  # no (de)serializers: raw bytes
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(address)
    server.start()
    return server


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--http", help="HOST:PORT for OTLP/HTTP")
    parser.add_argument("--grpc", help="HOST:PORT for OTLP/gRPC")
    args = parser.parse_args(argv)
    if not (args.http or args.grpc):
        parser.error("give --http and/or --grpc")
    recorder = Recorder(args.out)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    servers = []
    if args.http:
        servers.append(serve_http(recorder, args.http))
    if args.grpc:
        servers.append(serve_grpc(recorder, args.grpc))
    print("dump receiver listening", flush=True)
    stop.wait()
    for server in servers:
        (server.shutdown if isinstance(server, ThreadingHTTPServer) else lambda: server.stop(1))()


if __name__ == "__main__":
    main(sys.argv[1:])
