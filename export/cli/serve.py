"""`python -m export serve DIR [DIR ...]`: export directories served on Ray Serve over the Open
Inference Protocol (KServe v2, what Triton speaks), until Ctrl-C or SIGTERM.

Each directory's files are checked against its manifest (sha256) before Ray starts: a changed
directory is refused with one line. Ray is imported only here, after the checks.
"""

import argparse
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Sequence

from export.cli.options import check_option
from export.errors import ExportError
from export.runtime.base import ENGINES, check_engine
from export.serving.config import check_directories, config_yaml, parse_versions_policy, serve_config
from export.store.versions import record_deployed


def serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export serve",
        description="Serve export directories on Ray Serve with the Open Inference Protocol "
                    "(KServe v2): GET /v2/health/ready, GET /v2/models/NAME, POST /v2/models/NAME[/versions/N]/infer "
                    "(JSON tensors or the binary tensor extension). One deployment per directory, "
                    "named after its backbone; the returnt mode follows the outputs a request asks "
                    "for (logits, features, stage_i) or parameters.returnt.",
        epilog="Examples: python -m export serve artifacts/resnet; python -m export serve artifacts/resnet "
               "artifacts/mnistmlp --replicas 2 --port 8000; python -m export serve artifacts/resnet "
               "--print-config > serve.yaml && serve deploy serve.yaml")
    p.add_argument("directories", nargs="+", type=Path, metavar="DIR", help="export directories")
    p.add_argument("--replicas", type=int, default=1, help="replicas per model (default: %(default)s)")
    p.add_argument("--max-batch-size", type=int, default=32,
                   help="requests batched into one inference call; 1 turns batching off (default: %(default)s)")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long a batch waits to fill (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="inference threads per replica (default: cores / replicas, at least 1)")
    p.add_argument("--engine", default="onnxruntime", choices=list(ENGINES), help="(default: %(default)s)")
    p.add_argument("--precision", default="fp32", help="fp32, bf16 or int8, as the engine allows (default: fp32)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    p.add_argument("--grpc-port", type=int, default=None,
                   help="also serve KServe v2 gRPC (inference.GRPCInferenceService, what tritonclient.grpc "
                        "speaks) on this port through Ray Serve's gRPC proxy, which listens on all interfaces "
                        "(default: HTTP only)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="join this Ray cluster (host:port of its head, or 'auto'; default: $RAY_ADDRESS, "
                        "else start a local Ray instance)")
    p.add_argument("--max-request-mb", type=float, default=64.0,
                   help="largest request accepted, HTTP body or gRPC message; larger ones get 413 / "
                        "RESOURCE_EXHAUSTED (default: %(default)s: about 110 images of 3x224x224 in binary)")
    p.add_argument("--request-timeout-s", type=float, default=30.0,
                   help="a request not answered by then gets 503 (default: %(default)s)")
    p.add_argument("--haproxy", action="store_true",
                   help="HAProxy as the HTTP proxy (Ray Serve's RAY_SERVE_ENABLE_HA_PROXY; local Ray only): "
                        "more requests/s, but its stats page and Prometheus exporter listen on all "
                        "interfaces (on free ports chosen at start)")
    p.add_argument("--versions", default="latest", metavar="POLICY",
                   help="for directories with published weight versions (python -m export publish): latest, "
                        "all (published now; each rollout adds its version), or numbers N,M; served at "
                        "/v2/models/NAME/versions/N/infer, and unversioned requests get the newest of them until "
                        "`python -m export rollout` moves them (default: %(default)s)")
    p.add_argument("--trust-key", type=Path, metavar="PUB",
                   help="serve and roll out only weight versions signed with the private key of this public key "
                        "(publish --sign-key); directories without published versions serve their export's "
                        "weights, checked by sha256 as always")
    p.add_argument("--print-config", action="store_true",
                   help="print the Serve config YAML that `serve deploy` accepts, and exit")
    return p


def check_options(ns: argparse.Namespace) -> None:
    """One line per bad value, before anything starts."""
    check_option("--replicas", ns.replicas, ns.replicas >= 1, "an integer >= 1")
    check_option("--max-batch-size", ns.max_batch_size, ns.max_batch_size >= 1, "an integer >= 1")
    check_option("--max-request-mb", ns.max_request_mb, ns.max_request_mb > 0, "a number > 0")
    check_option("--request-timeout-s", ns.request_timeout_s, ns.request_timeout_s > 0, "a number > 0")
    check_option("--batch-wait-ms", ns.batch_wait_ms, ns.batch_wait_ms >= 0, "a number >= 0")
    check_option("--threads", ns.threads, ns.threads is None or ns.threads >= 1, "an integer >= 1")
    check_option("--port", ns.port, 0 < ns.port < 65536, "1-65535")
    check_option("--grpc-port", ns.grpc_port, ns.grpc_port is None or (0 < ns.grpc_port < 65536
                                                                       and ns.grpc_port != ns.port),
                 "1-65535, not the HTTP --port")
    if ns.haproxy and ns.grpc_port is not None:
        raise ExportError("--haproxy with --grpc-port: Ray Serve 2.60 in HAProxy mode does not start its proxies "
                          "when gRPC is on (\"Proxies not available after 60s\"); use one of the two")
    if ns.haproxy and ns.address is not None:
        raise ExportError("--haproxy applies to a local Ray instance; on a cluster set RAY_SERVE_ENABLE_HA_PROXY=1 "
                          "in its environment")
    check_engine(ns.engine, ns.precision)
    parse_versions_policy(ns.versions)
    if ns.trust_key is not None and not ns.trust_key.is_file():
        raise ExportError(f"--trust-key {ns.trust_key}: no such file")


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ExportError(f"cannot listen on {host}:{port} ({exc.strerror}); "
                              "choose another --port or --host") from None


def _proxy_note() -> str:
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        return ""
    return (f", HAProxy: stats on *:{os.environ.get('RAY_SERVE_HAPROXY_STATS_PORT', '8404')}, metrics on "
            f"*:{os.environ.get('RAY_SERVE_HAPROXY_METRICS_PORT', '9101')}")


def run_serve(argv: Sequence[str]) -> int:
    ns = serve_parser().parse_args(argv)
    check_options(ns)
    if ns.threads is None:
        ns.threads = max(1, (os.cpu_count() or 1) // ns.replicas)
    models = check_directories(ns.directories, ns.engine, ns.precision)
    config = serve_config(ns, models)
    if ns.print_config:
        sys.stdout.write(config_yaml(config))
        return 0
    if ns.address is None:
        _check_port(ns.host, ns.port)
        if ns.grpc_port is not None:
            _check_port("0.0.0.0", ns.grpc_port)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    from export.serving.app import deploy, shut_down

    local, address = deploy(config, ns.address, ns.replicas * ns.threads * len(models), haproxy=ns.haproxy)
    for app in config["applications"]:
        for deployment in app.get("deployments", []):
            record_deployed(Path(app["args"]["directory"]), app["name"],
                            int(deployment["user_config"]["current"]), address)
    try:
        grpc_note = f" and grpc {ns.host}:{ns.grpc_port}" if ns.grpc_port is not None else ""
        print(f"serving {', '.join(models)} at http://{ns.host}:{ns.port}/v2{grpc_note} ({ns.replicas} replica(s) x "
              f"{ns.threads} thread(s), engine {ns.engine} {ns.precision}, ray {address}{_proxy_note()}); Ctrl-C stops",
              flush=True)
        stop.wait()
    finally:
        shut_down(config, local)
        print("stopped", flush=True)
    return 0
